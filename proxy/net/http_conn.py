"""The client connection driver: one Trio task per client connection, except while an
SSE stream or a WebSocket tunnel of it is idle and parked (``proxy.net.park``): then it
has none, and ``resume_stream`` carries it on in a new task when the stream wakes.

It reads an optional PROXY header (``proxy.net.proxy_protocol``), then request heads
with h11 under the header and keep-alive timeouts, hands each request to an
``Exchange`` (``proxy.net.exchange``), answers refusals itself, and writes one
access-log line per request.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import h11
import trio

from proxy.admission import connection_cap
from proxy.audit import UsageRecord
from proxy.auth import Identity, ToolDenied
from proxy.conncaps import CapDecision, Lease, ip_scope, tenant_scope
from proxy.mcp_routing import McpRefusal, method_label
from proxy.metrics import LIMIT_BY_STATUS, metrics
from proxy.net import express
from proxy.net.context import WorkerContext
from proxy.net.errors import CLOSED, RECV_SIZE, ClientGone, StreamParked, write_now
from proxy.net.exchange import Exchange
from proxy.net.express import eligible
from proxy.net.proxy_protocol import read_proxy_header
from proxy.protocol.fast_head import NEED_MORE, FastHead, parse_request_head
from proxy.protocol.http1 import error_response, protocol_error_status, reason_phrase
from proxy.protocol.jsonrpc import RequestId
from proxy.routing import Route

if TYPE_CHECKING:
    from proxy.net.response import Relay

_SERVED, _CLOSE, _FALLBACK = object(), object(), object()
_EXPRESS_FIELDS: dict[bool, dict[str, str]] = {True: {"lane": "express"}, False: {}}
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1 << 20


class ClientConnection:
    __slots__ = (
        "_buffer",
        "_kind",
        "_leases",
        "_tenants",
        "conn",
        "ctx",
        "peer_ip",
        "peer_port",
        "stream",
    )

    def __init__(
        self, ctx: WorkerContext, stream: trio.SocketStream, peer: tuple[str, int]
    ) -> None:
        self.ctx = ctx
        self.stream = stream
        self.peer_ip = peer[0]
        self.peer_port = peer[1]
        self.conn = self._new_conn()
        self._buffer = bytearray()
        """Received bytes not yet parsed (express lane only)."""
        self._kind = "http"
        self._leases: list[Lease] = []
        """Global connection-cap leases this connection holds (IP, tenants)."""
        self._tenants: set[str] | None = None
        """Tenants counted against their caps (made on first use: most connections have
        none, and a held stream should not carry an empty set)."""

    async def run(self) -> None:
        ctx = self.ctx
        ctx.stats.active_connections += 1
        m = metrics()
        m.connections.inc()
        m.connections_active.labels("http").inc()
        await self._guarded(self._serve_from_start())

    async def resume_stream(self, x: Exchange, relay: Relay) -> None:
        """A parked event stream woke, in a task of its own: relay on, then do what the
        task that parked it would have done after the relay (finish the exchange, serve
        the connection's next request, close it)."""
        await self._guarded(self._stream_on(x, relay))

    async def _serve_from_start(self) -> None:
        ctx = self.ctx
        if ctx.config.proxy_protocol.enabled:
            peer = await read_proxy_header(
                ctx, self.stream, self.conn, (self.peer_ip, self.peer_port)
            )
            if peer is None:
                return
            self.peer_ip, self.peer_port = peer
        await self._serve(first=True)

    async def _stream_on(self, x: Exchange, relay: Relay) -> None:
        parked = False
        try:
            keep = await x.resume_stream(relay)
        except StreamParked:
            parked = True
            raise
        finally:
            if not parked:
                self._account(x)
        if self._next_cycle(keep):
            await self._serve(first=False)

    async def _guarded(self, serving: Coroutine[Any, Any, None]) -> None:
        """Run the connection's work; close it when that ends, unless a stream was parked
        (the park's task carries the connection on)."""
        parked = False
        try:
            await serving
        except StreamParked:
            parked = True
        except (*CLOSED, ClientGone):
            pass
        except Exception:
            # A bug must cost one connection, never the worker.
            self.ctx.log.exception("connection_failed", client=self.peer_ip, port=self.peer_port)
        finally:
            if not parked:
                await self._close()

    async def _close(self) -> None:
        self.ctx.stats.active_connections -= 1
        metrics().connections_active.labels(self._kind).dec()
        await trio.aclose_forcefully(self.stream)
        if self._leases:
            await self._release_leases()

    async def _release_leases(self) -> None:
        control = self.ctx.control
        caps = control.caps if control is not None else None
        if caps is not None:
            for lease in self._leases:
                await caps.release(lease)  # shielded and bounded inside
        self._leases.clear()

    async def _hold(self, scope: str, limit: int) -> CapDecision | None:
        """Take a lease on a global connection cap; the refusing decision if full."""
        control = self.ctx.control
        caps = control.caps if control is not None else None
        if caps is None or limit <= 0:
            return None
        result = await caps.acquire(scope, limit)
        if isinstance(result, CapDecision):
            kind = scope.split(":", 1)[0]
            metrics().connection_cap_refusals.labels(kind, result.source).inc()
            return result
        self._leases.append(result)
        return None

    async def hold_tenant_lease(self, identity: Identity) -> CapDecision | None:
        """Count this connection against its tenant's cap, once per tenant."""
        tenant = identity.tenant
        control = self.ctx.control
        if tenant is None or control is None or (self._tenants and tenant in self._tenants):
            return None
        refused = await self._hold(
            tenant_scope(tenant), connection_cap(control.config.rate_limits, identity)
        )
        if refused is None:
            if self._tenants is None:
                self._tenants = set()
            self._tenants.add(tenant)
        return refused

    def enter_kind(self, kind: str) -> None:
        """Count this connection as ``kind`` (sse, websocket) in the active gauge."""
        gauge = metrics().connections_active
        gauge.labels(self._kind).dec()
        gauge.labels(kind).inc()
        self._kind = kind

    def leave_kind(self) -> None:
        """Back to a plain HTTP connection in the active gauge."""
        gauge = metrics().connections_active
        gauge.labels(self._kind).dec()
        gauge.labels("http").inc()
        self._kind = "http"

    def _new_conn(self) -> h11.Connection:
        return h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.ctx.config.limits.max_header_bytes
        )

    async def _serve(self, *, first: bool) -> None:
        """Serve requests until the connection should close (``first``: none served yet)."""
        accepted = trio.current_time()
        express = self.ctx.config.server.express
        if express and first:
            # Bytes that came with a PROXY header went into h11; the lane reads them first.
            self._buffer += self.conn.trailing_data[0]
            self.conn = self._new_conn()
        while True:
            if express:
                step = await self._express_step(first, accepted)
                if step is _CLOSE:
                    return
                if step is _SERVED:
                    first = False
                    if self.ctx.draining:
                        return
                    continue
            request = await self._read_request(first, accepted)
            if request is None:
                return
            if first:
                cap = self.ctx.config.rate_limits.max_connections_per_ip
                refused = await self._hold(ip_scope(self.peer_ip), cap)
                if refused is not None:
                    retry = str(self.ctx.config.server.retry_after_seconds).encode()
                    reason = "connection limit reached (ip)"
                    await self.refuse(429, reason, None, extra=[(b"retry-after", retry)])
                    return
            first = False
            if not self._next_cycle(await self._exchange(request)):
                return

    def _next_cycle(self, keep: bool) -> bool:
        """After an exchange on the h11 path: ready for the next request, or False when
        the connection should close."""
        if not keep or self.ctx.draining:
            return False
        conn = self.conn
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        if self.ctx.config.server.express:
            # What arrived past this request (pipelining) goes back to the lane.
            self._buffer += conn.trailing_data[0]
            self.conn = self._new_conn()
        else:
            conn.start_next_cycle()
        return True

    # -- the express lane (proxy.net.express) ----------------------------------------------

    async def _express_step(self, first: bool, accepted: float) -> object:
        """Read the next request head with llhttp and serve it in the express lane if it
        is eligible: _SERVED, _CLOSE, or _FALLBACK with every byte handed to ``self.conn``
        (the h11 path then reads, checks and answers that request)."""
        buf = self._buffer
        limits = self.ctx.config.limits
        deadline: float | None = None
        while True:
            verdict = parse_request_head(bytes(buf), limits.max_header_bytes) if buf else NEED_MORE
            if isinstance(verdict, FastHead):
                route = self.ctx.routes.match(verdict.info.path)
                ip_cap = first and self.ctx.config.rate_limits.max_connections_per_ip
                if ip_cap or not eligible(self, verdict, route):
                    break
                assert route is not None
                end = verdict.consumed + (verdict.info.content_length or 0)
                if len(buf) < end and not await self._receive_body(buf, end):
                    break  # slow or cut short: the h11 path reads and judges it
                body = bytes(buf[verdict.consumed : end])
                del buf[:end]
                return _SERVED if await self._express(verdict, route, body) else _CLOSE
            if verdict is not NEED_MORE:
                break  # unusual or refused: h11 decides, with the same status
            if deadline is None and not buf:
                # Nothing of the next request yet: a fresh connection gets the header
                # timeout, a kept-alive one the idle timeout (which a drain cuts short).
                wait = (
                    accepted + limits.header_timeout
                    if first
                    else trio.current_time() + limits.keepalive_timeout
                )
                data = await self._receive_idle(wait, kept_alive=not first)
                if data is None:
                    return _CLOSE
                started = accepted if first else trio.current_time()
                deadline = started + limits.header_timeout
            else:
                if deadline is None:  # part of a pipelined request already here
                    deadline = trio.current_time() + limits.header_timeout
                got: bytes | None = None
                with trio.move_on_at(deadline):
                    got = await self.stream.receive_some(RECV_SIZE)
                if got is None:
                    self.conn.receive_data(bytes(buf))
                    buf.clear()
                    await self.refuse(408, "timed out reading request head", None)
                    return _CLOSE
                data = got
            if not data:
                break  # EOF: h11 tells a clean close from a truncated head
            buf += data
        self.conn.receive_data(bytes(buf))
        if not buf or verdict is NEED_MORE:
            self.conn.receive_data(b"")  # the client closed
        buf.clear()
        return _FALLBACK

    async def _receive_body(self, buf: bytearray, end: int) -> bool:
        """Receive until ``buf`` holds ``end`` bytes; False on EOF or after a silence of
        ``body_timeout`` (what arrived stays in ``buf``)."""
        timeout = self.ctx.config.limits.body_timeout
        while len(buf) < end:
            data = b""
            with trio.move_on_after(timeout):
                data = await self.stream.receive_some(RECV_SIZE)
            if not data:
                return False
            buf += data
        return True

    async def _express(self, head: FastHead, route: Route, body: bytes) -> bool:
        ctx = self.ctx
        ctx.stats.requests += 1
        x = Exchange(self, head)
        try:
            return await express.serve(self, head, route, body, x)
        finally:
            self._account(x)

    # -- reading the request head -------------------------------------------------------

    async def _receive_idle(self, deadline: float, *, kept_alive: bool) -> bytes | None:
        """Wait for the first bytes of a request; None if the wait ends (timeout, or a
        drain for a kept-alive connection)."""
        if not kept_alive:
            # A new connection may have been queued before the drain began and may have
            # sent its whole request already: serve it (the drain deadline still bounds
            # this), or closing it unread would reset it.
            with trio.move_on_at(deadline):
                return await self.stream.receive_some(RECV_SIZE)
            return None
        if self.ctx.draining:
            return None
        scope = trio.CancelScope(deadline=deadline)
        self.ctx.idle_scopes.add(scope)
        try:
            with scope:
                return await self.stream.receive_some(RECV_SIZE)
        finally:
            self.ctx.idle_scopes.discard(scope)
        return None

    async def _read_request(self, first: bool, accepted: float) -> h11.Request | None:
        """The next request head; None when the connection should close."""
        conn = self.conn
        limits = self.ctx.config.limits
        deadline: float | None = None
        # h11's max_incomplete_event_size only bounds a head that is still incomplete; a
        # whole oversized head arriving in one read would pass, so count what was fed.
        fed = len(conn.trailing_data[0])  # bytes read with a PROXY header count too
        try:
            while True:
                event = conn.next_event()
                if type(event) is h11.Request:
                    if fed - len(conn.trailing_data[0]) > limits.max_header_bytes:
                        await self.refuse(431, "request header section too large", None)
                        return None
                    return event
                if event is not h11.NEED_DATA:
                    return None  # ConnectionClosed
                if deadline is None:
                    if conn.trailing_data[0]:  # part of a pipelined request already here
                        deadline = trio.current_time() + limits.header_timeout
                    else:
                        # Nothing of the next request yet: a fresh connection gets the
                        # header timeout, a kept-alive one the idle timeout (which a
                        # drain cuts short); either way it closes without a word.
                        now = trio.current_time()
                        wait = (
                            accepted + limits.header_timeout
                            if first
                            else (now + limits.keepalive_timeout)
                        )
                        data = await self._receive_idle(wait, kept_alive=not first)
                        if data is None:
                            return None
                        started = accepted if first else trio.current_time()
                        deadline = started + limits.header_timeout
                        fed += len(data)
                        conn.receive_data(data)
                        continue
                with trio.move_on_at(deadline):
                    data = await self.stream.receive_some(RECV_SIZE)
                    fed += len(data)
                    conn.receive_data(data)
                    continue
                await self.refuse(408, "timed out reading request head", None)
                return None
        except h11.RemoteProtocolError as exc:
            status, reason = protocol_error_status(exc)
            await self.refuse(status, reason, None)
            return None

    # -- one exchange ---------------------------------------------------------------------

    async def _exchange(self, request: h11.Request) -> bool:
        """Proxy one request; True if the client connection may carry another."""
        ctx = self.ctx
        ctx.stats.requests += 1
        x = Exchange(self, request)
        parked = False
        try:
            return await x.run()
        except StreamParked:
            parked = True  # accounted for when the stream ends (_stream_on)
            raise
        finally:
            if not parked:
                self._account(x)

    def _account(self, x: Exchange) -> None:
        """Metrics, the access line and the usage record of a finished exchange."""
        ctx = self.ctx
        route = x.route.prefix if x.route is not None else "none"
        elapsed = time.perf_counter() - x.started
        m = metrics()
        latency = None if x.streamed else elapsed
        m.count_request(route, x.status, latency, x.bytes_in, x.bytes_out)
        if x.refused and x.status in LIMIT_BY_STATUS:
            m.refusals.labels(LIMIT_BY_STATUS[x.status]).inc()
        if x.mcp is not None:
            label = method_label(x.mcp, x.method)
            m.mcp_requests.labels(route, label, str(x.status)).inc()
            if latency is not None:
                m.mcp_duration.labels(route, label).observe(latency)
        self._log_access(x, elapsed)
        control = ctx.control
        if x.route is not None and control is not None and control.audit is not None:
            control.audit.record(usage_record(x, elapsed))

    async def send(self, data: bytes) -> None:
        """Write to the client under ``send_timeout``; ClientGone if it is gone or stuck."""
        try:
            written = write_now(self.stream, data)
        except CLOSED:
            raise ClientGone from None
        if written == len(data):
            return
        with trio.move_on_after(self.ctx.config.limits.send_timeout):
            try:
                await self.stream.send_all(memoryview(data)[written:])
            except CLOSED:
                raise ClientGone from None
            return
        raise ClientGone

    # -- answers the proxy gives itself ---------------------------------------------------

    async def refuse_rpc(self, refusal: McpRefusal, x: Exchange) -> bool:
        """Refuse an MCP request with its JSON-RPC error body."""
        body = refusal.body()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"connection", b"close"),
            *refusal.headers,
        ]
        response = h11.Response(
            status_code=refusal.status, headers=headers, reason=reason_phrase(refusal.status)
        )
        return await self.refuse(refusal.status, refusal.message, x, prepared=(response, body))

    async def answer_rpc_error(
        self, denied: ToolDenied, request_id: RequestId | None, x: Exchange
    ) -> bool:
        """Answer an MCP request with 200 and a JSON-RPC error (an authorization refusal
        the protocol expects in-band); the connection stays usable."""
        body = denied.body(request_id)
        x.status = 200
        x.error = denied.message
        x.refused = True
        response = h11.Response(
            status_code=200,
            headers=[
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode("ascii")),
            ],
        )
        conn = self.conn
        data = (conn.send(response) or b"") + (conn.send(h11.Data(data=body)) or b"")
        data += conn.send(h11.EndOfMessage()) or b""
        x.response_started = True
        await self.send(data)
        x.bytes_out = len(body)
        x.response_complete = x.upload_complete = True
        return conn.their_state is h11.DONE

    async def refuse(
        self,
        status: int,
        reason: str,
        x: Exchange | None,
        *,
        prepared: tuple[h11.Response, bytes] | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> bool:
        """Answer with an error status and close (lingering so the client reads it)."""
        if x is not None:
            x.status = status
            x.error = reason
            x.refused = True
        else:
            log_refusal(self.ctx, self.peer_ip, self.peer_port, status, reason)
        conn = self.conn
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return False
        if prepared is None:
            extra = list(extra or ())
            if status == 503 and not any(name == b"retry-after" for name, _ in extra):
                retry = str(self.ctx.config.server.retry_after_seconds).encode()
                extra.append((b"retry-after", retry))
            prepared = error_response(status, reason, extra=extra)
        response, body = prepared
        try:
            data = (conn.send(response) or b"") + (conn.send(h11.Data(data=body)) or b"")
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return False
        try:
            await self.send(data)
        except ClientGone:
            return False
        await linger_close(self.stream)
        return False

    def _log_access(self, x: Exchange, elapsed: float) -> None:
        log = self.ctx.access_log
        if log is None:
            return
        target = x.target
        query_at = target.find(b"?")
        log.info(
            "access",
            client=self.peer_ip,
            port=self.peer_port,
            method=x.method.decode("ascii", "replace"),
            path=(target if query_at < 0 else target[:query_at]).decode("ascii", "replace"),
            status=x.status,
            route=x.route.prefix if x.route is not None else None,
            upstream=x.upstream or None,
            bytes_in=x.bytes_in,
            bytes_out=x.bytes_out,
            duration_ms=round(elapsed * 1000, 3),
            error=x.error,
            **self._mcp_fields(x),
            **_EXPRESS_FIELDS[x.express],
        )

    @staticmethod
    def _mcp_fields(x: Exchange) -> dict[str, object]:
        decision = x.mcp
        if decision is None:
            return {}
        return {
            "mcp_era": decision.era.value,
            "mcp_method": decision.method,
            "mcp_name": decision.name,
            "replica": x.replica or None,
        }


def usage_record(x: Exchange, elapsed: float) -> UsageRecord:
    """What the audit trail keeps of an exchange."""
    identity = x.identity
    decision = x.mcp
    method = decision.method if decision is not None and decision.method else None
    return UsageRecord(
        ts=time.time(),
        key_id=identity.key_id if identity is not None else None,
        tenant_id=identity.tenant_id if identity is not None else None,
        route=x.route.prefix if x.route is not None else "",
        method=method or x.method.decode("ascii", "replace"),
        tool=decision.name if decision is not None and method == "tools/call" else None,
        status=x.status,
        bytes_in=x.bytes_in,
        bytes_out=x.bytes_out,
        duration_ms=round(elapsed * 1000, 3),
    )


def log_refusal(ctx: WorkerContext, ip: str, port: int, status: int, reason: str) -> None:
    """Count and log a refusal that happened before any request head was parsed."""
    m = metrics()
    m.count_request("none", status, 0.0, 0, 0)
    if status in LIMIT_BY_STATUS:
        m.refusals.labels(LIMIT_BY_STATUS[status]).inc()
    if ctx.access_log is not None:
        ctx.access_log.info(
            "access",
            client=ip,
            port=port,
            method=None,
            path=None,
            status=status,
            error=reason,
            bytes_in=0,
            bytes_out=0,
            duration_ms=0.0,
        )


async def linger_close(stream: trio.SocketStream) -> None:
    """Half-close, then read and discard briefly, so that closing with unread request
    bytes does not turn into a RST that destroys the response in the client's buffer."""
    try:
        await stream.send_eof()
        with trio.move_on_after(_LINGER_SECONDS):
            drained = 0
            while drained < _LINGER_BYTES:
                data = await stream.receive_some(RECV_SIZE)
                if not data:
                    break
                drained += len(data)
    except (*CLOSED, OSError):
        pass
