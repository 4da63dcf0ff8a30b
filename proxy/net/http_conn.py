"""The client connection driver: h11 on the client side, pooled h11 to the backend.

One task per client connection. Per request: read the head (with the header timeout),
check it (``proxy.protocol.http1``), route it (``proxy.routing``), read ahead whatever
body bytes already arrived (so a malformed first chunk is refused before any backend
sees the request), then stream the rest of the body up while streaming the response
down. Nothing is buffered beyond one receive: SSE events are written to the client as
soon as they arrive. A 101 turns the connection into a raw relay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import h11
import trio

from proxy.metrics import LIMIT_BY_STATUS, metrics
from proxy.net.context import WorkerContext
from proxy.net.relay import relay
from proxy.net.upstream import UpstreamConnection, UpstreamPool, UpstreamUnavailable
from proxy.protocol.http1 import (
    RequestInfo,
    RequestRejected,
    downstream_response_headers,
    error_response,
    inspect_request,
    is_event_stream,
    protocol_error_status,
    reason_phrase,
    upstream_request_headers,
)
from proxy.protocol.proxy_header import (
    V2_SIGNATURE,
    ProxyHeaderError,
    looks_like_proxy_header,
    parse_proxy_header,
    unmap_ipv4,
)
from proxy.routing import Route

RECV_SIZE = 65536
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1 << 20
_CLOSED = (trio.BrokenResourceError, trio.ClosedResourceError)
V2_SIGNATURE_LENGTH = len(V2_SIGNATURE)


class _ClientGone(Exception):
    """The client closed or reset its connection, or stopped reading."""


class _BackendFailed(Exception):
    """The backend failed before its response head; the client gets ``status``."""

    def __init__(self, status: int, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retryable = retryable


@dataclass(slots=True, eq=False)
class _Exchange:
    """One request/response through the proxy, for the access log and the cleanup."""

    request: h11.Request
    started: float
    route: Route | None = None
    upstream: str = ""
    status: int = 0
    error: str | None = None
    response_started: bool = False
    response_complete: bool = False
    upload_complete: bool = False
    client_gone: bool = False
    upgraded: bool = False
    refused: bool = False
    """The proxy answered itself (a limit, a bad request, no backend)."""
    bytes_in: int = 0
    bytes_out: int = 0

    def fail(self, status: int, reason: str) -> None:
        if self.error is None:
            self.error = reason
            if not self.response_started:
                self.status = status


class ClientConnection:
    __slots__ = ("_idle_scope", "conn", "ctx", "peer_ip", "peer_port", "stream")

    def __init__(
        self, ctx: WorkerContext, stream: trio.SocketStream, peer: tuple[str, int]
    ) -> None:
        self.ctx = ctx
        self.stream = stream
        self.peer_ip = peer[0]
        self.peer_port = peer[1]
        self.conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=ctx.config.limits.max_header_bytes
        )

    async def run(self) -> None:
        stats = self.ctx.stats
        stats.active_connections += 1
        m = metrics()
        m.connections.inc()
        active = m.connections_active.labels("http")
        active.inc()
        try:
            if self.ctx.config.proxy_protocol.enabled and not await self._read_proxy_header():
                return
            await self._serve()
        except (*_CLOSED, _ClientGone):
            pass
        except Exception:
            # A bug must cost one connection, never the worker.
            self.ctx.log.exception("connection_failed", client=self.peer_ip, port=self.peer_port)
        finally:
            stats.active_connections -= 1
            active.dec()
            await trio.aclose_forcefully(self.stream)

    async def _read_proxy_header(self) -> bool:
        """Consume the PROXY protocol header a trusted load balancer sends first, and take
        the client address from it; refuse a header from anyone else. False: close."""
        ctx = self.ctx
        trusted = ctx.is_trusted_proxy(self.peer_ip)
        buf = bytearray()
        reason = "timed out reading the PROXY header"
        with trio.move_on_after(ctx.config.proxy_protocol.timeout):
            while True:
                data = await self.stream.receive_some(RECV_SIZE)
                if not data:
                    return False
                buf += data
                if not trusted:
                    if not looks_like_proxy_header(buf[:V2_SIGNATURE_LENGTH]):
                        self.conn.receive_data(bytes(buf))
                        return True
                    if len(buf) >= V2_SIGNATURE_LENGTH or buf.startswith(b"PROXY "):
                        reason = "PROXY header from an untrusted source"
                        break
                    continue
                try:
                    parsed = parse_proxy_header(buf)
                except ProxyHeaderError as exc:
                    reason = f"malformed PROXY header: {exc}"
                    break
                if parsed is None:
                    continue
                info, consumed = parsed
                if info.command == "PROXY" and info.source is not None:
                    self.peer_ip, self.peer_port = unmap_ipv4(info.source[0]), info.source[1]
                if consumed < len(buf):
                    self.conn.receive_data(bytes(buf[consumed:]))
                return True
        metrics().refusals.labels("proxy_protocol").inc()
        ctx.log.warning(
            "proxy_header_refused", client=self.peer_ip, port=self.peer_port, reason=reason
        )
        return False

    async def _serve(self) -> None:
        accepted = trio.current_time()
        first = True
        while True:
            request = await self._read_request(first, accepted)
            if request is None:
                return
            first = False
            if not await self._exchange(request) or self.ctx.draining:
                return
            conn = self.conn
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    # -- reading the request head -------------------------------------------------------

    async def _receive_idle(self, deadline: float) -> bytes | None:
        """Wait for the first bytes of a request; None if the wait ends (timeout, drain)."""
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
        fed = len(conn.trailing_data[0]) if not first else 0
        try:
            while True:
                event = conn.next_event()
                if type(event) is h11.Request:
                    if fed - len(conn.trailing_data[0]) > limits.max_header_bytes:
                        await self._refuse(431, "request header section too large", None)
                        return None
                    return event
                if event is not h11.NEED_DATA:
                    return None  # ConnectionClosed
                if deadline is None:
                    if conn.trailing_data[0]:  # part of a pipelined request already here
                        deadline = trio.current_time() + limits.header_timeout
                    else:
                        # Nothing of the next request yet: a fresh connection gets the
                        # header timeout, a kept-alive one the idle timeout. Drain
                        # cancels this wait; either way it closes without a word.
                        now = trio.current_time()
                        wait = (
                            accepted + limits.header_timeout
                            if first
                            else (now + limits.keepalive_timeout)
                        )
                        data = await self._receive_idle(wait)
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
                await self._refuse(408, "timed out reading request head", None)
                return None
        except h11.RemoteProtocolError as exc:
            status, reason = protocol_error_status(exc)
            await self._refuse(status, reason, None)
            return None

    # -- one exchange ---------------------------------------------------------------------

    async def _exchange(self, request: h11.Request) -> bool:
        """Proxy one request; True if the client connection may carry another."""
        ctx = self.ctx
        ctx.stats.requests += 1
        ctx.stats.active_requests += 1
        x = _Exchange(request=request, started=time.perf_counter())
        try:
            return await self._proxy(x)
        finally:
            ctx.stats.active_requests -= 1
            route = x.route.prefix if x.route is not None else "none"
            elapsed = time.perf_counter() - x.started
            m = metrics()
            m.count_request(route, x.status, elapsed, x.bytes_in, x.bytes_out)
            if x.refused and x.status in LIMIT_BY_STATUS:
                m.refusals.labels(LIMIT_BY_STATUS[x.status]).inc()
            self._log_access(x, elapsed)

    async def _proxy(self, x: _Exchange) -> bool:
        ctx = self.ctx
        limits = ctx.config.limits
        try:
            info = inspect_request(x.request)
        except RequestRejected as exc:
            return await self._refuse(exc.status, exc.reason, x)
        route = ctx.routes.match(info.path)
        if route is None:
            return await self._refuse(404, "no route for this path", x)
        x.route = route
        if limits.max_body_bytes and (info.content_length or 0) > limits.max_body_bytes:
            return await self._refuse(413, "request body larger than max_body_bytes", x)

        body: list[bytes] = []
        body_done = False
        if not self.conn.client_is_waiting_for_100_continue:
            try:
                body_done = await self._read_body_ahead(body, x)
            except RequestRejected as exc:
                return await self._refuse(exc.status, exc.reason, x)

        backend = route.choose_backend()
        pool = ctx.pools[backend]
        x.upstream = backend.url
        policy = ctx.policy_for(route)
        headers = upstream_request_headers(
            x.request, info, policy, client_ip=self.peer_ip, backend_authority=backend.authority
        )
        upstream_request = h11.Request(
            method=x.request.method,
            target=route.upstream_target(backend, info.target),
            headers=headers,
        )
        try:
            up, first_event = await self._start_upstream(pool, upstream_request, body, body_done)
        except UpstreamUnavailable as exc:
            return await self._refuse(exc.status, exc.reason, x)
        except _BackendFailed as exc:
            return await self._refuse(exc.status, exc.reason, x)

        try:
            if body_done:
                x.upload_complete = True
                await self._respond(up, first_event, info, x)
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._upload, up, x, nursery.cancel_scope)
                    await self._respond(up, first_event, info, x)
                    if not x.upload_complete:
                        nursery.cancel_scope.cancel()
        except BaseException:
            await pool.discard(up)
            raise
        if x.upgraded:
            await pool.discard(up)
            return False
        if x.response_complete and x.upload_complete:
            await pool.release(up)
        else:
            await pool.discard(up)
        if x.error is not None and not x.response_started and not x.client_gone:
            return await self._refuse(x.status, x.error, x)
        return x.response_complete and x.upload_complete and not x.client_gone

    async def _read_body_ahead(self, body: list[bytes], x: _Exchange) -> bool:
        """Collect the body bytes already received (at least one receive if none are);
        True if the whole body is in ``body``."""
        conn = self.conn
        limits = self.ctx.config.limits
        received = False
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if received or body:
                        return False
                    with trio.move_on_after(limits.body_timeout):
                        conn.receive_data(await self.stream.receive_some(RECV_SIZE))
                        received = True
                        continue
                    raise RequestRejected(408, "timed out reading request body")
                if type(event) is h11.Data:
                    x.bytes_in += len(event.data)
                    if limits.max_body_bytes and x.bytes_in > limits.max_body_bytes:
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
        for attempt in (1, 2):
            up = await pool.acquire()
            try:
                out = [up.h11.send(request)]
                out.extend(up.h11.send(h11.Data(data=chunk)) for chunk in body)
                if body_done:
                    out.append(up.h11.send(h11.EndOfMessage()))
                try:
                    await up.stream.send_all(b"".join(o for o in out if o))
                except _CLOSED:
                    raise _BackendFailed(
                        502, "backend closed the connection", retryable=up.reused
                    ) from None
                if not body_done:
                    return up, h11.NEED_DATA
                event = await self._first_upstream_event(up)
                return up, event
            except _BackendFailed as exc:
                await pool.discard(up)
                if not (exc.retryable and body_done and attempt == 1):
                    raise
            except BaseException:
                await pool.discard(up)
                raise
        raise AssertionError("unreachable")

    async def _first_upstream_event(self, up: UpstreamConnection) -> h11.Event:
        """Wait for the response head under the response timeout."""
        timeout = self.ctx.config.upstream.response_timeout
        with trio.move_on_after(timeout):
            try:
                while True:
                    event = up.h11.next_event()
                    if event is not h11.NEED_DATA:
                        assert not isinstance(event, type)
                        return event
                    data = await up.stream.receive_some(RECV_SIZE)
                    if not data and up.reused and up.h11.their_state is h11.SEND_RESPONSE:
                        raise _BackendFailed(502, "backend closed the connection", retryable=True)
                    up.h11.receive_data(data)
            except h11.RemoteProtocolError as exc:
                raise _BackendFailed(502, f"invalid response from backend: {exc}") from None
            except (*_CLOSED, OSError):
                raise _BackendFailed(
                    502, "backend reset the connection", retryable=up.reused
                ) from None
        raise _BackendFailed(504, "backend response timeout")

    async def _upload(self, up: UpstreamConnection, x: _Exchange, scope: trio.CancelScope) -> None:
        """Stream the rest of the request body to the backend; on a client-side failure
        record it and cancel the exchange."""
        conn = self.conn
        limits = self.ctx.config.limits
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                x.fail(*protocol_error_status(exc))
                scope.cancel()
                return
            if event is h11.NEED_DATA:
                with trio.move_on_after(limits.body_timeout):
                    try:
                        data = await self.stream.receive_some(RECV_SIZE)
                    except _CLOSED:
                        x.client_gone = True
                        x.fail(499, "client closed the connection inside the request body")
                        scope.cancel()
                        return
                    conn.receive_data(data)
                    continue
                x.fail(408, "timed out reading request body")
                scope.cancel()
                return
            if type(event) is h11.Data:
                x.bytes_in += len(event.data)
                if limits.max_body_bytes and x.bytes_in > limits.max_body_bytes:
                    x.fail(413, "request body larger than max_body_bytes")
                    scope.cancel()
                    return
                data = up.h11.send(event) or b""
            else:  # EndOfMessage (or PAUSED, after an upgrade request's end)
                data = up.h11.send(h11.EndOfMessage()) or b""
            try:
                await up.stream.send_all(data)
            except (*_CLOSED, OSError):
                # The backend stopped reading; whatever it answered (often an early
                # error status) is still relayed by _respond.
                return
            if type(event) is not h11.Data:
                x.upload_complete = True
                return

    # -- the response ---------------------------------------------------------------------

    async def _send_client(self, data: bytes) -> None:
        with trio.move_on_after(self.ctx.config.limits.send_timeout):
            try:
                await self.stream.send_all(data)
            except _CLOSED:
                raise _ClientGone from None
            return
        raise _ClientGone

    async def _respond(
        self,
        up: UpstreamConnection,
        first_event: h11.Event | type[h11.NEED_DATA],
        info: RequestInfo,
        x: _Exchange,
    ) -> None:
        try:
            await self._relay_response(up, first_event, info, x)
        except _BackendFailed as exc:
            x.fail(exc.status, exc.reason)
        except _ClientGone:
            x.client_gone = True
            x.fail(499, "client closed the connection")

    async def _relay_response(
        self,
        up: UpstreamConnection,
        event: h11.Event | type[h11.NEED_DATA],
        info: RequestInfo,
        x: _Exchange,
    ) -> None:
        conn = self.conn
        ctx = self.ctx
        if event is h11.NEED_DATA:
            event = await self._first_upstream_event(up)
        while type(event) is h11.InformationalResponse:
            if event.status_code == 101:
                await self._switch_protocols(up, event, x)
                return
            if event.status_code == 100 and conn.client_is_waiting_for_100_continue:
                await self._send_client(conn.send(event) or b"")
            event = await self._first_upstream_event(up)
        if type(event) is not h11.Response:
            raise _BackendFailed(502, "backend closed the connection without a response")
        policy = ctx.policy_for(x.route)
        headers = downstream_response_headers(
            event.headers, event.http_version, policy, close=ctx.draining
        )
        x.status = event.status_code
        out = [
            conn.send(
                h11.Response(
                    status_code=event.status_code,
                    headers=headers,
                    reason=reason_phrase(event.status_code, event.reason),
                )
            )
            or b""
        ]
        x.response_started = True
        streaming = is_event_stream(event.headers)
        up_cfg = ctx.config.upstream
        timeout = up_cfg.stream_idle_timeout if streaming else up_cfg.read_timeout
        uh = up.h11
        while True:
            try:
                body_event = uh.next_event()
            except h11.RemoteProtocolError as exc:
                x.fail(502, f"invalid response body from backend: {exc}")
                await self._send_client(b"".join(out))
                return
            if body_event is h11.NEED_DATA:
                if out:
                    await self._send_client(b"".join(out))
                    out.clear()
                with trio.move_on_after(timeout) if timeout > 0 else trio.CancelScope():
                    try:
                        uh.receive_data(await up.stream.receive_some(RECV_SIZE))
                    except (*_CLOSED, OSError):
                        x.fail(502, "backend reset the connection mid-response")
                        return
                    continue
                x.fail(504, "backend went silent mid-response")
                return
            if type(body_event) is h11.Data:
                x.bytes_out += len(body_event.data)
                out.append(conn.send(body_event) or b"")
            elif type(body_event) is h11.EndOfMessage:
                out.append(conn.send(h11.EndOfMessage()) or b"")
                await self._send_client(b"".join(out))
                x.response_complete = True
                return
            else:
                x.fail(502, "backend closed the connection mid-response")
                await self._send_client(b"".join(out))
                return

    async def _switch_protocols(
        self, up: UpstreamConnection, event: h11.InformationalResponse, x: _Exchange
    ) -> None:
        conn = self.conn
        headers = downstream_response_headers(
            event.headers, event.http_version, self.ctx.policy_for(x.route), upgrade=True
        )
        try:
            head = (
                conn.send(
                    h11.InformationalResponse(
                        status_code=101,
                        headers=headers,
                        reason=reason_phrase(event.status_code, event.reason),
                    )
                )
                or b""
            )
        except h11.LocalProtocolError:
            # h11 allows a 101 only after a complete request that asked to upgrade.
            raise _BackendFailed(502, "backend switched protocols unasked") from None
        x.status = 101
        x.response_started = True
        x.upgraded = True
        client_pending = conn.trailing_data[0]
        backend_pending = up.h11.trailing_data[0]
        await self._send_client(head + backend_pending)
        if client_pending:
            await up.stream.send_all(client_pending)
        # The access line is written when the tunnel ends, with its duration.
        up_cfg = self.ctx.config.upstream
        outcome = await relay(
            self.stream,
            up.stream,
            idle_timeout=up_cfg.stream_idle_timeout,
            half_close_timeout=up_cfg.tunnel_half_close_timeout,
        )
        if outcome != "closed":
            x.error = f"tunnel ended: {outcome}"
        x.response_complete = True

    # -- answers the proxy gives itself ---------------------------------------------------

    async def _refuse(self, status: int, reason: str, x: _Exchange | None) -> bool:
        """Answer with an error status and close (lingering so the client reads it)."""
        if x is not None:
            x.status = status
            x.error = reason
            x.refused = True
        else:
            self._log_error(status, reason)
        extra: list[tuple[bytes, bytes]] = []
        if status == 503:
            extra.append((b"retry-after", str(self.ctx.config.server.retry_after_seconds).encode()))
        conn = self.conn
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return False
        response, body = error_response(status, reason, extra=extra)
        try:
            data = (conn.send(response) or b"") + (conn.send(h11.Data(data=body)) or b"")
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return False
        try:
            await self._send_client(data)
        except _ClientGone:
            return False
        await linger_close(self.stream)
        return False

    def _log_error(self, status: int, reason: str) -> None:
        log_refusal(self.ctx, self.peer_ip, self.peer_port, status, reason)

    def _log_access(self, x: _Exchange, elapsed: float) -> None:
        log = self.ctx.access_log
        if log is None:
            return
        request = x.request
        target = request.target
        query_at = target.find(b"?")
        log.info(
            "access",
            client=self.peer_ip,
            port=self.peer_port,
            method=request.method.decode("ascii", "replace"),
            path=(target if query_at < 0 else target[:query_at]).decode("ascii", "replace"),
            status=x.status,
            route=x.route.prefix if x.route is not None else None,
            upstream=x.upstream or None,
            bytes_in=x.bytes_in,
            bytes_out=x.bytes_out,
            duration_ms=round(elapsed * 1000, 3),
            error=x.error,
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
    except (*_CLOSED, OSError):
        pass
