"""Relaying a ``text/event-stream`` response, following its event boundaries.

Bytes are relayed as they arrive, like any body; what the proxy adds goes only between
two events (``proxy.protocol.sse.EventStreamTracker``):

- on a drain, a ``retry:`` hint, then the end of the body, so the client reconnects
  (to another worker or host) and resumes;
- on MCP routes, a keep-alive comment when the stream has been silent for the route's
  ``keepalive_interval``, so load balancers that cut idle connections (often after
  60 s to 5 min) leave it open;
- on a legacy 2024-11-05 SSE stream, the first ``endpoint`` event rewritten so the
  client posts its messages back through the proxy with a session token.

While it waits, the relay also reads the client: a silent stream writes nothing, so only
reading tells that the client left, and without it the backend stream (and both
sockets) would be held until the backend next sent something. In the 2026-07-28 era the
client leaving is also the cancellation of the request, which closing the upstream
carries out. Both sockets wait in the worker's park (``proxy.net.park``): one suspension
per idle stream, the reads themselves non-blocking.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import h11
import trio

from proxy.mcp_routing import event_payloads, response_id, rewrite_endpoint_block
from proxy.net.errors import CLOSED, RECV_SIZE, StreamParked
from proxy.net.park import BACKEND, CLIENT, ParkedStream
from proxy.net.upstream import UpstreamConnection
from proxy.protocol.mcp import (
    SESSION_HEADER,
    EndpointRewriteError,
    parse_endpoint_event,
    rewrite_endpoint_event,
)
from proxy.protocol.sse import KEEPALIVE_COMMENT, EventStreamTracker, retry_hint

if TYPE_CHECKING:
    from proxy.net.exchange import Exchange

_FOREVER = 1e9
_MAX_EVENT_BYTES = 1 << 20
_FINISH_GRACE = 5.0
"""How long a stream whose client has what it came for may still take to end upstream."""


class _StreamOver(Exception):
    """The client left in a way that ends the relay at once."""


def mcp_response_headers(
    x: Exchange, headers: list[tuple[bytes, bytes]], *, streaming: bool
) -> None:
    """MCP response header changes: the backend's session id becomes the proxy's token,
    and streams ask intermediaries not to buffer them."""
    decision = x.mcp
    tokens = x.client.ctx.tokens
    if decision is not None and decision.issue_session and tokens is not None:
        for i, (name, value) in enumerate(headers):
            if name == SESSION_HEADER:
                token = tokens.issue(x.replica, value.decode("latin-1"))
                headers[i] = (name, token.encode("ascii"))
    if streaming and not any(name == b"x-accel-buffering" for name, _ in headers):
        headers.append((b"x-accel-buffering", b"no"))


class EventStreamRelay:
    __slots__ = (
        "_awaited",
        "_endpoint_block",
        "_finish_by",
        "_last_data",
        "_member",
        "_out",
        "_pending",
        "_tracker",
        "_up",
        "can_add",
        "client_left",
        "ending",
        "x",
    )

    def __init__(
        self,
        x: Exchange,
        up: UpstreamConnection,
        headers: list[tuple[bytes, bytes]],
        head: bytes,
    ) -> None:
        """``headers`` and ``head``: the response head as the client gets it (parsed and
        serialised); ``start`` sends the head first."""
        self.x = x
        self._up = up
        self._tracker = EventStreamTracker()
        # Bytes can be added only where the proxy frames the body itself.
        self.can_add = not any(name == b"content-length" for name, _ in headers)
        legacy = x.mcp is not None and x.mcp.legacy_stream
        self._endpoint_block: bytearray | None = bytearray() if legacy else None
        # The SSE answer to a POSTed request ends, for the client, with the response to
        # that request: clients close the stream right after it (the reference SDK does),
        # often before the backend's end of body has arrived.
        request = x.mcp.envelope if x.mcp is not None else None
        awaited = request.id if request is not None and request.kind == "request" else None
        self._awaited: int | str | None = awaited
        self._pending = bytearray()
        self._out: list[bytes] = [head]
        self.ending = False
        """Set once the client has what it came for (the stream's end, or the response
        to its request) and may close without that being an error."""
        self.client_left = False
        """The client closed after ``ending``: bytes still due are read, not sent."""
        self._finish_by = math.inf
        """Once the client has left: when the relay stops waiting for the backend."""
        self._last_data = 0.0
        self._member: ParkedStream | None = None

    @property
    def upstream(self) -> UpstreamConnection:
        return self._up

    def _emit(self, data: bytes) -> None:
        self._tracker.feed(data)
        self._out.append(self.x.client.conn.send(h11.Data(data=data)) or b"")

    async def _flush(self) -> None:
        if self.client_left:
            self._out.clear()
        elif self._out:
            await self.x.client.send(b"".join(self._out))
            self._out.clear()

    async def start(self) -> None:
        """Relay the stream from its head. Raises StreamParked when the stream went idle
        and was parked: the park starts ``resume`` in a new task when it wakes."""
        x = self.x
        self._member = x.client.ctx.park.enter(
            self._up.stream.socket.fileno(), x.client.stream.socket.fileno()
        )
        self._last_data = trio.current_time()
        await self.resume()

    async def resume(self) -> None:
        """Carry on relaying (see ``start``)."""
        member = self._member
        assert member is not None
        parked = False
        try:
            await self._relay(member)
        except StreamParked:
            parked = True
            raise
        except _StreamOver:
            pass
        finally:
            if not parked:
                self.x.client.ctx.park.leave(member)

    async def _relay(self, member: ParkedStream) -> None:
        x = self.x
        ctx = x.client.ctx
        uh = self._up.h11
        idle_limit = ctx.config.upstream.stream_idle_timeout or _FOREVER
        route = x.route
        keepalive = route.keepalive_interval if route is not None and x.mcp else 0.0
        while True:
            try:
                event = uh.next_event()
            except h11.RemoteProtocolError as exc:
                x.fail(502, f"invalid response body from backend: {exc}")
                await self._flush()
                return
            if type(event) is h11.Data:
                x.bytes_out += len(event.data)
                if not self._on_data(bytes(event.data)):
                    await self._flush()
                    return
                continue
            if type(event) is h11.EndOfMessage:
                self._out.append(x.client.conn.send(h11.EndOfMessage()) or b"")
                self.ending = True
                await self._flush()
                x.response_complete = x.upstream_complete = True
                return
            if event is not h11.NEED_DATA:
                x.fail(502, "backend closed the connection mid-response")
                await self._flush()
                return
            at_boundary = self._tracker.at_boundary and self._endpoint_block is None
            if ctx.draining and self.can_add and at_boundary:
                self._emit(retry_hint(ctx.config.server.drain_retry_ms))
                self._out.append(x.client.conn.send(h11.EndOfMessage()) or b"")
                self.ending = True
                await self._flush()
                x.response_complete = True
                x.error = "stream ended by drain"
                return
            await self._flush()
            now = trio.current_time()
            last_data = self._last_data
            deadline = last_data + idle_limit
            keepalive_due = last_data + keepalive if keepalive and self.can_add else _FOREVER
            wait_until = min(deadline, max(keepalive_due, now), self._finish_by)
            try:
                data = await self._receive(member, wait_until)
            except (*CLOSED, OSError):
                x.fail(502, "backend reset the connection mid-response")
                return
            if data is not None:
                uh.receive_data(data)
                self._last_data = trio.current_time()
                continue
            now = trio.current_time()
            if now >= self._finish_by:
                return  # the client left; the backend took too long to end
            if ctx.draining:
                continue
            if now >= deadline:
                x.fail(504, "event stream idle longer than stream_idle_timeout")
                return
            if at_boundary:
                self._emit(KEEPALIVE_COMMENT)
            self._last_data = now  # next keep-alive one interval later

    async def _receive(self, member: ParkedStream, wait_until: float) -> bytes | None:
        """The backend's next bytes (b"" at its end), or None once ``wait_until`` has
        passed or a drain began. Meanwhile what the client sends is kept for later
        (pipelining) and its leaving handled (``_client_left``). When nothing is ready
        the stream is parked (StreamParked) where it can be, else waits in this task."""
        ctx = self.x.client.ctx
        while True:
            if member.ready & CLIENT:
                if not self.client_left and not self._read_client(member.client_fd):
                    self._client_left()
                member.settle(CLIENT)
            if member.ready & BACKEND:
                try:
                    return os.read(member.backend_fd, RECV_SIZE)
                except BlockingIOError:
                    member.settle(BACKEND)
            if trio.current_time() >= wait_until:
                return None
            if not await ctx.idle_wait(member, wait_until, self._wake, parkable=self.x.parkable):
                return None

    async def _wake(self) -> None:
        await self.x.client.resume_stream(self.x, self)

    def _read_client(self, fd: int) -> bool:
        """Take in all the client sent; False once it has closed or reset."""
        conn = self.x.client.conn
        while True:
            try:
                data = os.read(fd, RECV_SIZE)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            conn.receive_data(data)  # a pipelined request: kept for later

    def _client_left(self) -> None:
        """The client closed the stream: end the relay (``_StreamOver``), or let the
        request finish upstream with its bytes dropped."""
        x = self.x
        self.client_left = True
        cancels = x.mcp is not None and x.mcp.cancel_on_disconnect
        # Only a POSTed request has work upstream worth letting finish; a GET stream of a
        # client that left is just closed.
        let_finish = x.mcp is not None and not cancels and x.method == b"POST"
        if self.ending or let_finish:
            # Either the client has what it came for (not an error), or it left a stream of
            # an era where leaving is no cancellation (2025-11-25, legacy): the request is
            # left to finish upstream, its bytes read and dropped, so the backend sees no
            # disconnect; it can deliver the outcome on a resumed stream.
            grace = _FINISH_GRACE if self.ending else x.client.ctx.config.upstream.response_timeout
            self._finish_by = min(self._finish_by, trio.current_time() + grace)
            if not self.ending:
                x.client_gone = True
                x.fail(499, "client closed the stream (request left to finish upstream)")
            return
        x.client_gone = True
        why = " (cancels the request upstream)" if cancels else ""
        x.fail(499, f"client closed the stream{why}")
        raise _StreamOver

    def _on_data(self, data: bytes) -> bool:
        """Relay (or, for a legacy stream's first event, rewrite) backend bytes; False
        when the stream cannot continue."""
        block = self._endpoint_block
        if block is None:
            self._tracker.feed(data)
            self._out.append(self.x.client.conn.send(h11.Data(data=data)) or b"")
            if self._awaited is not None:
                self._look_for_response(data)
            return True
        block += data
        tracker = EventStreamTracker()
        tracker.feed(bytes(block))
        if not tracker.at_boundary:
            if len(block) > 8192:
                self.x.fail(502, "legacy SSE stream: no endpoint event in its first 8 KiB")
                return False
            return True
        self._endpoint_block = None
        try:
            rewritten = rewrite_endpoint_block(bytes(block), self._rewrite_endpoint)
        except EndpointRewriteError as exc:
            self.x.fail(502, f"legacy SSE endpoint event: {exc}")
            return False
        self._emit(rewritten)
        return True

    def _look_for_response(self, data: bytes) -> None:
        """Set ``ending`` once the awaited JSON-RPC response has gone by."""
        self._pending += data
        if not self._tracker.at_boundary:
            if len(self._pending) > _MAX_EVENT_BYTES:
                self._awaited = None  # events this large are not worth following
            return
        for payload in event_payloads(bytes(self._pending)):
            if response_id(payload) == self._awaited:
                self.ending = True
                self._awaited = None
        self._pending.clear()

    def _rewrite_endpoint(self, value: bytes) -> bytes:
        x = self.x
        tokens = x.client.ctx.tokens
        route = x.route
        if tokens is None or route is None or x.backend is None:
            raise EndpointRewriteError("no session keys for this route")
        sse_path = x.upstream_target.partition(b"?")[0].decode("latin-1") or "/"
        endpoint = parse_endpoint_event(value, sse_path=sse_path)
        token = tokens.issue(x.replica, endpoint.session_id)
        base = x.backend.base_path.decode("latin-1")
        return rewrite_endpoint_event(
            value,
            route.prefix if route.strip_prefix else "",
            token,
            backend_prefix=base,
            sse_path=sse_path,
        )
