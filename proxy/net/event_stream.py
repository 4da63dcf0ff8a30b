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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h11
import trio

from proxy.mcp_routing import event_payloads, response_id, rewrite_endpoint_block
from proxy.net.errors import CLOSED, RECV_SIZE
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
        self, x: Exchange, up: UpstreamConnection, headers: list[tuple[bytes, bytes]]
    ) -> None:
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
        self._out: list[bytes] = []
        self.ending = False
        """Set once the client has what it came for (the stream's end, or the response
        to its request) and may close without that being an error."""
        self.client_left = False
        """The client closed after ``ending``: bytes still due are read, not sent."""

    def _emit(self, data: bytes) -> None:
        self._tracker.feed(data)
        self._out.append(self.x.client.conn.send(h11.Data(data=data)) or b"")

    async def _flush(self) -> None:
        if self.client_left:
            self._out.clear()
        elif self._out:
            await self.x.client.send(b"".join(self._out))
            self._out.clear()

    async def run(self, head: bytes) -> None:
        x = self.x
        ctx = x.client.ctx
        uh = self._up.h11
        idle_limit = ctx.config.upstream.stream_idle_timeout or _FOREVER
        route = x.route
        keepalive = route.keepalive_interval if route is not None and x.mcp else 0.0
        self._out.append(head)
        last_data = trio.current_time()
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
            deadline = last_data + idle_limit
            keepalive_due = last_data + keepalive if keepalive and self.can_add else _FOREVER
            wait = trio.CancelScope(deadline=min(deadline, max(keepalive_due, now)))
            if not ctx.draining:
                ctx.stream_scopes.add(wait)  # a drain interrupts the wait
            try:
                with wait:
                    try:
                        uh.receive_data(await self._up.stream.receive_some(RECV_SIZE))
                    except (*CLOSED, OSError):
                        x.fail(502, "backend reset the connection mid-response")
                        return
                    last_data = trio.current_time()
                    continue
            finally:
                ctx.stream_scopes.discard(wait)
            now = trio.current_time()
            if ctx.draining:
                continue
            if now >= deadline:
                x.fail(504, "event stream idle longer than stream_idle_timeout")
                return
            if at_boundary:
                self._emit(KEEPALIVE_COMMENT)
            last_data = now  # next keep-alive one interval later

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
