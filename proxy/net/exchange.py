"""One request through the proxy: check, route, read ahead, send up, stream the body.

Per request: check the head (``proxy.protocol.http1``), route it (``proxy.routing``),
read ahead whatever body bytes already arrived (so a malformed first chunk is refused
before any backend sees the request), send head and body-so-far in one write, then
stream the rest of the body up while ``proxy.net.response`` streams the answer down.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import h11
import trio

from proxy.admission import rate_buckets
from proxy.auth import (
    AUTH_FAILED,
    Identity,
    authenticate,
    check_access,
    check_tool_allowed,
    strip_credentials,
)
from proxy.conncaps import CapDecision
from proxy.mcp_routing import (
    SESSION_NOT_FOUND,
    McpDecision,
    McpRefusal,
    check_origin,
    decide,
    with_session,
)
from proxy.metrics import metrics
from proxy.net.errors import CLOSED, RECV_SIZE, BackendFailed, StreamParked
from proxy.net.response import first_upstream_event, respond, resume_relay
from proxy.net.upstream import UpstreamConnection, UpstreamPool, UpstreamUnavailable
from proxy.protocol.fast_head import FastHead
from proxy.protocol.http1 import (
    RequestHead,
    RequestInfo,
    RequestRejected,
    inspect_request,
    protocol_error_status,
    upstream_request_headers,
)
from proxy.protocol.jsonrpc import INTERNAL_ERROR, INVALID_REQUEST, RequestId
from proxy.protocol.session_token import SessionTokens
from proxy.ratelimit import RATE_LIMITED, Decision
from proxy.routing import Backend, Route, replica_id

if TYPE_CHECKING:
    from proxy.net.http_conn import ClientConnection
    from proxy.net.response import Relay

_RETRY_LATER = ((b"retry-after", b"1"),)


class Exchange:
    """A request/response pair; its fields feed the access log, metrics and cleanup."""

    __slots__ = (
        "backend",
        "bytes_in",
        "bytes_out",
        "client",
        "client_gone",
        "error",
        "express",
        "identity",
        "mcp",
        "method",
        "parkable",
        "pool",
        "refused",
        "replica",
        "request",
        "response_complete",
        "response_started",
        "route",
        "started",
        "status",
        "streamed",
        "target",
        "upgraded",
        "upload_complete",
        "upstream",
        "upstream_complete",
        "upstream_target",
    )

    def __init__(self, client: ClientConnection, request: h11.Request | FastHead) -> None:
        self.client = client
        self.request: h11.Request | FastHead | None = request
        """The request head; let go of once a stream is relayed (it is the largest object
        a held stream would keep), the request line staying in ``method`` and ``target``."""
        self.method = request.method
        self.target = request.target
        self.started = time.perf_counter()
        self.route: Route | None = None
        self.upstream = ""
        self.status = 0
        self.error: str | None = None
        self.response_started = False
        self.response_complete = False
        """The client got a complete response."""
        self.upstream_complete = False
        """The backend's response was read to its end (its connection may be reused)."""
        self.upload_complete = False
        self.client_gone = False
        self.upgraded = False
        self.refused = False
        """The proxy answered itself (a limit, a bad request, no backend)."""
        self.bytes_in = 0
        self.bytes_out = 0
        self.mcp: McpDecision | None = None
        """What MCP routing decided (MCP routes only)."""
        self.replica = ""
        """The replica id of the chosen backend (signed into session tokens)."""
        self.backend: Backend | None = None
        self.upstream_target = b""
        self.streamed = False
        """An SSE stream or a tunnel: its duration is the stream's life, not latency."""
        self.express = False
        """Served by the express lane (proxy.net.express)."""
        self.identity: Identity | None = None
        """Who the caller proved to be (routes with auth only)."""
        self.pool: UpstreamPool | None = None
        self.parkable = False
        """An event stream of this exchange may be parked (``proxy.net.park``): its task
        is this connection's only one (no upload still running beside the relay)."""

    def use_backend(
        self, backend: Backend, route: Route, request: RequestHead, info: RequestInfo
    ) -> list[tuple[bytes, bytes]]:
        """Record the chosen backend; the request's headers as it must receive them."""
        self.upstream = backend.url
        self.replica = replica_id(backend.url)
        self.backend = backend
        client = self.client
        return upstream_request_headers(
            request,
            info,
            client.ctx.policy_for(route),
            client_ip=client.peer_ip,
            backend_authority=backend.authority,
        )

    def fail(self, status: int, reason: str) -> None:
        if self.error is None:
            self.error = reason
            if not self.response_started:
                self.status = status

    async def run(self) -> bool:
        """Proxy the request; True if the client connection may carry another."""
        client = self.client
        ctx = client.ctx
        limits = ctx.config.limits
        request = self.request
        assert isinstance(request, h11.Request)  # the express lane never calls run()
        try:
            info = inspect_request(request)
        except RequestRejected as exc:
            return await client.refuse(exc.status, exc.reason, self)
        route = ctx.routes.match(info.path)
        if route is None:
            return await client.refuse(404, "no route for this path", self)
        self.route = route
        if limits.max_body_bytes and (info.content_length or 0) > limits.max_body_bytes:
            return await client.refuse(413, "request body larger than max_body_bytes", self)
        mcp = route.kind == "mcp"
        if ctx.auth_required(route):
            refused = await self._authenticate(route, mcp)
            if refused is not None:
                return refused
        if not mcp:
            refused = await self._rate_limit(None, None)
            if refused is not None:
                return refused

        body: list[bytes] = []
        body_done = False
        if not client.conn.client_is_waiting_for_100_continue or mcp:
            try:
                # An MCP message is routed on its content: read it whole (it is small,
                # and bounded by max_body_bytes like any body).
                body_done = await self._read_body_ahead(body, whole=mcp)
            except RequestRejected as exc:
                return await client.refuse(exc.status, exc.reason, self)

        decision: McpDecision | None = None
        if mcp:
            try:
                check_origin(request.headers, route.allowed_origins, info.host)
                decision = decide(
                    request.method,
                    info.target,
                    request.headers,
                    b"".join(body) if request.method == b"POST" else None,
                    self._tokens(),
                )
            except McpRefusal as exc:
                return await client.refuse_rpc(exc, self)
            self.mcp = decision
            tool = decision.name if decision.method == "tools/call" else None
            if self.identity is not None and decision.method == "tools/call":
                denied = check_tool_allowed(self.identity, tool)
                if denied is not None:
                    metrics().auth_failures.labels("tool").inc()
                    return await client.answer_rpc_error(denied, decision.request_id, self)
            refused = await self._rate_limit(decision, tool)
            if refused is not None:
                return refused
        backend = ctx.choose_backend(route, decision.replica if decision else None)
        if backend is None:
            return await self._no_backend(decision)
        pool = self.pool = ctx.pools[backend]
        headers = self.use_backend(backend, route, request, info)
        if self.identity is not None and not route.forward_credentials:
            assert ctx.control is not None  # an identity comes from the control plane
            headers = strip_credentials(headers, False, ctx.control.auth_header)
        target = info.target
        if decision is not None:
            if decision.backend_session is not None:
                with_session(headers, decision.backend_session)
            target = decision.target or target
        self.upstream_target = route.upstream_target(backend, target)
        upstream_request = h11.Request(
            method=request.method, target=self.upstream_target, headers=headers
        )
        try:
            up, first_event = await self._start_upstream(pool, upstream_request, body, body_done)
        except (UpstreamUnavailable, BackendFailed) as exc:
            pool.record(False)
            return await client.refuse(exc.status, exc.reason, self)

        try:
            if body_done:
                self.upload_complete = True
                self.parkable = True
                await respond(self, up, first_event)
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._upload, up, nursery.cancel_scope)
                    await respond(self, up, first_event)
                    if not self.upload_complete:
                        nursery.cancel_scope.cancel()
        except StreamParked:
            raise  # the upstream connection stays with the parked stream
        except BaseException:
            await pool.discard(up)
            raise
        return await self._after_response(pool, up)

    async def resume_stream(self, relay: Relay) -> bool:
        """``run`` for a parked event stream that woke: the rest of the relay, then what
        ``run`` does after a response. True if the connection may carry another request."""
        pool = self.pool
        assert pool is not None
        up = relay.upstream
        try:
            await resume_relay(self, relay)
        except StreamParked:
            raise
        except BaseException:
            await pool.discard(up)
            raise
        return await self._after_response(pool, up)

    async def _after_response(self, pool: UpstreamPool, up: UpstreamConnection) -> bool:
        """Give the upstream connection back (or close it), count the outcome, answer an
        error the client has not had yet; True if the client connection may go on."""
        client = self.client
        if self.response_started:
            pool.record(self.status < 500)
        if self.upstream_complete and self.upload_complete and not self.upgraded:
            await pool.release(up)
        else:
            await pool.discard(up)
            if self.error is not None and not self.client_gone and not self.upgraded:
                pool.count_failure("timeout" if self.status == 504 else "error")
        if self.error is not None and not self.response_started and not self.client_gone:
            return await client.refuse(self.status, self.error, self)
        return self.response_complete and self.upload_complete and not self.client_gone

    async def _authenticate(self, route: Route, mcp: bool) -> bool | None:
        """Set ``identity``; None to go on, else the refusal's result (401 or 403, with a
        JSON-RPC error body on MCP routes), or 429 when the tenant's connection cap is
        full."""
        client = self.client
        ctx = client.ctx
        control = ctx.control
        assert control is not None
        assert self.request is not None  # still the head: the exchange is being checked
        result = authenticate(
            self.request.headers,
            control.keys,
            control.jwt,
            now=time.time(),
            header_name=control.auth_header,
        )
        if isinstance(result, Identity):
            result = check_access(result, route.tenants) or result
        if not isinstance(result, Identity):
            metrics().auth_failures.labels(str(result.status)).inc()
            # Failed attempts count against the client's IP limit too, so guessing keys
            # (or making the proxy verify signatures) is rate-limited like anything else.
            limited = await self._rate_limit(None, None, mcp=mcp)
            if limited is not None:
                return limited
            if mcp:
                refusal = McpRefusal(
                    result.status,
                    AUTH_FAILED,
                    result.description,
                    None,
                    headers=result.headers(),
                )
                return await client.refuse_rpc(refusal, self)
            return await client.refuse(
                result.status, result.description, self, extra=result.headers()
            )
        self.identity = result
        cap = await client.hold_tenant_lease(result)
        if cap is not None:
            return await self._refuse_limited(cap, mcp, None)
        return None

    async def _rate_limit(
        self, decision: McpDecision | None, tool: str | None, *, mcp: bool = False
    ) -> bool | None:
        """None to go on, else the 429 (or fail-closed 503) refusal's result."""
        control = self.client.ctx.control
        if control is None or not control.rate_limited:
            return None
        buckets = rate_buckets(control.config.rate_limits, self.client.peer_ip, self.identity, tool)
        if not buckets:
            return None
        verdict = await control.rate_limit(buckets)
        if verdict.allowed:
            return None
        return await self._refuse_limited(
            verdict, mcp or decision is not None, decision.request_id if decision else None
        )

    async def _refuse_limited(
        self, verdict: Decision | CapDecision, mcp: bool, request_id: RequestId | None
    ) -> bool:
        if isinstance(verdict, Decision):
            status, headers = verdict.status, verdict.headers()
            reason = "rate limit exceeded" if status == 429 else "rate limits unavailable"
        else:
            retry = str(self.client.ctx.config.server.retry_after_seconds).encode()
            status, headers = 429, [(b"retry-after", retry)]
            reason = f"connection limit reached ({verdict.scope})"
        if mcp:
            code = RATE_LIMITED if status == 429 else INTERNAL_ERROR
            refusal = McpRefusal(status, code, reason, request_id, headers=headers)
            return await self.client.refuse_rpc(refusal, self)
        return await self.client.refuse(status, reason, self, extra=headers)

    def _tokens(self) -> SessionTokens:
        tokens = self.client.ctx.tokens
        if tokens is None:  # the supervisor always provides keys for MCP routes
            raise RuntimeError("an MCP route without session keys")
        return tokens

    async def _no_backend(self, decision: McpDecision | None) -> bool:
        client = self.client
        if decision is None:
            return await client.refuse(503, "no healthy backend for this route", self)
        if decision.replica is not None:
            # The session's replica is gone or out of rotation: the client must start a
            # new session, which the spec signals with 404.
            refusal = McpRefusal(404, INVALID_REQUEST, SESSION_NOT_FOUND, decision.request_id)
        else:
            refusal = McpRefusal(
                503,
                INTERNAL_ERROR,
                "No healthy backend for this route",
                decision.request_id,
                headers=_RETRY_LATER,
            )
        return await client.refuse_rpc(refusal, self)

    async def _read_body_ahead(self, body: list[bytes], *, whole: bool = False) -> bool:
        """Collect the body bytes already received (at least one receive if none are;
        all of it if ``whole``); True if the whole body is in ``body``."""
        conn = self.client.conn
        limits = self.client.ctx.config.limits
        received = False
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if (received or body) and not whole:
                        return False
                    with trio.move_on_after(limits.body_timeout):
                        conn.receive_data(await self.client.stream.receive_some(RECV_SIZE))
                        received = True
                        continue
                    raise RequestRejected(408, "timed out reading request body")
                if type(event) is h11.Data:
                    self.bytes_in += len(event.data)
                    if limits.max_body_bytes and self.bytes_in > limits.max_body_bytes:
                        raise RequestRejected(413, "request body larger than max_body_bytes")
                    body.append(event.data)
                    continue
                if type(event) is h11.EndOfMessage or event is h11.PAUSED:
                    return True
                raise RequestRejected(400, "connection closed inside request body")
        except h11.RemoteProtocolError as exc:
            status, reason = protocol_error_status(exc)
            raise RequestRejected(status, reason) from None

    async def _start_upstream(
        self, pool: UpstreamPool, request: h11.Request, body: list[bytes], body_done: bool
    ) -> tuple[UpstreamConnection, h11.Event | type[h11.NEED_DATA]]:
        """Send the request head (and the body read so far); on a reused connection that
        turns out to be dead, retry once on a fresh one when nothing was lost."""
        timeout = self.client.ctx.config.upstream.response_timeout
        for attempt in (1, 2):
            up = await pool.acquire()
            try:
                out = [up.h11.send(request)]
                out.extend(up.h11.send(h11.Data(data=chunk)) for chunk in body)
                if body_done:
                    out.append(up.h11.send(h11.EndOfMessage()))
                try:
                    await up.stream.send_all(b"".join(o for o in out if o))
                except CLOSED:
                    raise BackendFailed(
                        502, "backend closed the connection", retryable=up.reused
                    ) from None
                if not body_done:
                    return up, h11.NEED_DATA
                return up, await first_upstream_event(up, timeout)
            except BackendFailed as exc:
                await pool.discard(up)
                pool.count_failure("timeout" if exc.status == 504 else "error")
                if not (exc.retryable and body_done and attempt == 1):
                    raise
            except BaseException:
                await pool.discard(up)
                raise
        raise AssertionError("unreachable")

    async def _upload(self, up: UpstreamConnection, scope: trio.CancelScope) -> None:
        """Stream the rest of the request body to the backend; on a client-side failure
        record it and cancel the exchange."""
        conn = self.client.conn
        limits = self.client.ctx.config.limits
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.fail(*protocol_error_status(exc))
                scope.cancel()
                return
            if event is h11.NEED_DATA:
                with trio.move_on_after(limits.body_timeout):
                    try:
                        data = await self.client.stream.receive_some(RECV_SIZE)
                    except CLOSED:
                        self.client_gone = True
                        self.fail(499, "client closed the connection inside the request body")
                        scope.cancel()
                        return
                    conn.receive_data(data)
                    continue
                self.fail(408, "timed out reading request body")
                scope.cancel()
                return
            if type(event) is h11.Data:
                self.bytes_in += len(event.data)
                if limits.max_body_bytes and self.bytes_in > limits.max_body_bytes:
                    self.fail(413, "request body larger than max_body_bytes")
                    scope.cancel()
                    return
                data = up.h11.send(event) or b""
            else:  # EndOfMessage (or PAUSED, after an upgrade request's end)
                data = up.h11.send(h11.EndOfMessage()) or b""
            try:
                await up.stream.send_all(data)
            except (*CLOSED, OSError):
                # The backend stopped reading; whatever it answered (often an early
                # error status) is still relayed by respond().
                return
            if type(event) is not h11.Data:
                self.upload_complete = True
                return
