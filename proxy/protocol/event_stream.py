"""Relaying a ``text/event-stream`` response, following its event boundaries: the STREAM
state of the connection machine (``proxy.protocol.connection``). Sans-IO.

Bytes are relayed as they arrive, like any body; what the proxy adds goes only between
two events (``proxy.protocol.sse.EventStreamTracker``):

- on a drain, a ``retry:`` hint, then the end of the body, so the client reconnects
  (to another worker or host) and resumes;
- on MCP routes, a keep-alive comment when the stream has been silent for the route's
  ``keepalive_interval``, so load balancers that cut idle connections (often after
  60 s to 5 min) leave it open;
- on a legacy 2024-11-05 SSE stream, the first ``endpoint`` event rewritten so the
  client posts its messages back through the proxy with a session token;
- on an answer translated between MCP eras (``proxy.protocol.era_translation``,
  ``proxy.protocol.upstream_sessions``), each event rewritten once it is whole.

A silent stream writes nothing, so the client leaving is noticed by its socket closing
(the machine's ``client_closed``). In the 2026-07-28 era that is the cancellation of
the request, which closing the upstream carries out; in the others a POSTed request is
left to finish upstream (its bytes read and dropped), since leaving is no cancellation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from proxy.mcp_routing import event_payloads, rewrite_endpoint_block
from proxy.protocol.chunked import LAST_CHUNK, encode_chunks
from proxy.protocol.connection_core import CHUNKED
from proxy.protocol.eras import (
    Translation,
)
from proxy.protocol.fast_response import END, ResponseHead
from proxy.protocol.jsonrpc import response_id
from proxy.protocol.mcp import EndpointRewriteError, parse_endpoint_event, rewrite_endpoint_event
from proxy.protocol.sse import KEEPALIVE_COMMENT, EventStreamTracker, retry_hint

if TYPE_CHECKING:
    from proxy.protocol.upstream_side import UpstreamSide

_MAX_EVENT_BYTES = 1 << 20
_MAX_ENDPOINT_BLOCK = 8192
FINISH_GRACE = 5.0
"""How long a stream whose client has what it came for may still take to end upstream."""


class StreamRelay:
    __slots__ = (
        "_awaited",
        "_endpoint_block",
        "_finish_by",
        "_last_data",
        "_last_sent",
        "_pending",
        "_target",
        "_tracker",
        "_translation",
        "_untranslated",
        "c",
        "can_add",
        "ending",
        "left",
    )

    def __init__(self, c: UpstreamSide, *, can_add: bool) -> None:
        self.c = c
        x = c.x
        assert x is not None
        self._tracker = EventStreamTracker()
        self.can_add = can_add
        """Bytes can be added only where the proxy frames the body itself (chunked)."""
        mcp = x.mcp
        legacy = mcp is not None and mcp.legacy_stream
        self._endpoint_block: bytearray | None = bytearray() if legacy else None
        answer: object = x.answer_rewrite
        self._translation = answer if isinstance(answer, Translation) else None
        """An answer translated between eras: its events go out rewritten, each run of
        whole events as it completes (``_untranslated`` holds an event still coming)."""
        self._untranslated = b""
        head = c.head
        self._target = head.info.target if legacy and head is not None else b""
        """The request's target, for the legacy ``endpoint`` rewrite (the request head
        itself is let go of while the stream lasts)."""
        # The SSE answer to a POSTed request ends, for the client, with the response to
        # that request: clients close the stream right after it (the reference SDK does),
        # often before the backend's end of body has arrived.
        request = mcp.envelope if mcp is not None else None
        self._awaited: int | str | None = (
            request.id if request is not None and request.kind == "request" else None
        )
        self._pending = b""
        self.ending = False
        """The client has what it came for (the stream's end, or the response to its
        request) and may close without that being an error."""
        self.left = False
        """The client closed: bytes still due are read, not sent."""
        self._finish_by = math.inf
        """Once the client has left: when the relay stops waiting for the backend."""
        self._last_data = self._last_sent = c.env.now()
        """When the backend last sent bytes (the idle limit counts from it), and when
        the client was last sent anything (keep-alive comments count from it)."""

    def start(self, head: bytes, events: list[ResponseHead | bytes | None]) -> None:
        """``head``: the stream's response head, to go out first; ``events`` came with
        it (a short answer, its head, its one event and its end, goes in one write)."""
        prelude = self._translation.stream_prelude() if self._translation is not None else b""
        if prelude:  # the proxy's own first events (a translated listen's acknowledgment)
            self._send([prelude], track=True, head=head)
            head = b""
        if events:
            self.events(events, head)
        else:
            if head:
                self.c.t.send_client(head)
            self._arm()

    # -- events from the machine ----------------------------------------------------------

    def events(self, events: list[ResponseHead | bytes | None], head: bytes = b"") -> None:
        c = self.c
        x = c.x
        assert x is not None
        out: list[bytes] = []
        for event in events:
            if event is END:
                if self._untranslated:  # an unfinished last event: lax clients read it
                    self._relay_translated(self._untranslated, out)
                self._send(out, head=head, last=True)
                self._ended(last_sent=True)
                return
            if type(event) is bytes:
                x.bytes_out += len(event)
                if not self._on_data(event, out):
                    self._send(out, head=head)
                    c._upstream_broken(x.error or "invalid event stream")
                    return
        self._last_data = self._last_sent = c.env.now()
        self._send(out, head=head)
        if c.env.draining:
            self.drain()
        else:
            self._arm()

    def client_left(self) -> None:
        """The client closed the stream: end the relay, or let the request finish
        upstream with its bytes dropped."""
        c = self.c
        x = c.x
        assert x is not None
        mcp = x.mcp
        cancels = mcp is not None and mcp.cancel_on_disconnect
        # Only a POSTed request has work upstream worth letting finish; a GET stream of
        # a client that left is just closed.
        let_finish = mcp is not None and not cancels and x.method == b"POST"
        if self.ending or let_finish:
            # Either the client has what it came for (not an error), or it left a stream
            # of an era where leaving is no cancellation (2025-11-25, legacy): the
            # request finishes upstream, its bytes read and dropped, so the backend sees
            # no disconnect; it can deliver the outcome on a resumed stream.
            grace = FINISH_GRACE if self.ending else c._response_timeout()
            self._finish_by = min(self._finish_by, c.env.now() + grace)
            if not self.ending:
                x.error = x.error or "client closed the stream (request left to finish upstream)"
            self.left = True
            if not self.ending and self._translation is not None:
                c._cancel_upstream()  # a 2026-07-28 client's leaving, told upstream
            self._arm()
            return
        why = " (cancels the request upstream)" if cancels else ""
        c._client_gone(f"client closed the stream{why}")

    def timer(self, now: float) -> None:
        c = self.c
        if now >= self._finish_by:
            # The client left and the backend took too long to end: stop waiting.
            c._drop_upstream()
            x = c.x
            assert x is not None
            c.env.account(x, c.peer)
            c.x = None
            c._closed()
            return
        idle = c.env.config.upstream.stream_idle_timeout
        if idle and now >= self._last_data + idle:
            c._abort(504, "event stream idle longer than stream_idle_timeout")
            return
        if self._keepalive_due() <= now and self._at_boundary():
            self._send([KEEPALIVE_COMMENT], track=True)
            self._last_sent = now  # the next one an interval later
        self._arm()

    def drain(self) -> None:
        """End the stream at an event boundary with a ``retry:`` hint, so the client
        reconnects elsewhere and resumes; where that cannot be done yet, at the next
        boundary (or the drain deadline)."""
        c = self.c
        if not (self.can_add and self._at_boundary()) or self.left:
            self._arm()
            return
        x = c.x
        assert x is not None
        self._send([retry_hint(c.env.config.server.drain_retry_ms)], track=True)
        c.t.send_client(LAST_CHUNK)
        x.error = "stream ended by drain"
        c.close_after = True
        c._drop_upstream()  # the backend's stream is not over: its connection cannot go back
        c._exchange_done()

    def next_deadline(self, now: float) -> float:
        c = self.c
        deadline = self._finish_by
        idle = c.env.config.upstream.stream_idle_timeout
        if idle:
            deadline = min(deadline, self._last_data + idle)
        if self._at_boundary():
            # Mid-event a comment must wait for the event's end, which comes with data.
            deadline = min(deadline, self._keepalive_due())
        return deadline

    # -- inside ------------------------------------------------------------------------------

    def _arm(self) -> None:
        c = self.c
        c._phase(self.next_deadline(c.env.now()))

    def _keepalive_due(self) -> float:
        x = self.c.x
        route = x.route if x is not None else None
        interval = route.keepalive_interval if route is not None and x and x.mcp else 0.0
        return self._last_sent + interval if interval and self.can_add else math.inf

    def _at_boundary(self) -> bool:
        return self._tracker.at_boundary and self._endpoint_block is None

    def _ended(self, *, last_sent: bool = False) -> None:
        """The backend ended the stream (``last_sent``: the closing chunk went out with
        the stream's last bytes)."""
        c = self.c
        self.ending = True
        c.upstream_done = True
        if self.left:
            c.close_after = True
        elif c.framing == CHUNKED and not last_sent:
            c.t.send_client(LAST_CHUNK)
        c._exchange_done()

    def _send(
        self, pieces: list[bytes], *, track: bool = False, head: bytes = b"", last: bool = False
    ) -> None:
        """Body bytes to the client, framed, in one write (``track``: the proxy's own,
        which the boundary tracker must see too; ``head``: the response head, not yet
        sent, to go before them; ``last``: the closing chunk after them)."""
        c = self.c
        if self.left:
            if head:
                c.t.send_client(head)
            return
        if track:
            for piece in pieces:
                self._tracker.feed(piece)
        body = encode_chunks(pieces, last=last) if c.framing == CHUNKED else b"".join(pieces)
        if head or body:
            c.t.send_client(head + body)

    def _on_data(self, data: bytes, out: list[bytes]) -> bool:
        """Relay (or, for a legacy stream's first event, rewrite) backend bytes; False
        when the stream cannot go on (the reason is on the exchange)."""
        if self._translation is not None:
            return self._translate_events(data, out)
        block = self._endpoint_block
        if block is None:
            self._tracker.feed(data)
            out.append(data)
            if self._awaited is not None:
                self._look_for_response(data)
            return True
        block += data
        tracker = EventStreamTracker()
        tracker.feed(bytes(block))
        if not tracker.at_boundary:
            if len(block) > _MAX_ENDPOINT_BLOCK:
                self._fail("legacy SSE stream: no endpoint event in its first 8 KiB")
                return False
            return True
        self._endpoint_block = None
        try:
            rewritten = rewrite_endpoint_block(bytes(block), self._rewrite_endpoint)
        except EndpointRewriteError as exc:
            self._fail(f"legacy SSE endpoint event: {exc}")
            return False
        self._tracker.feed(rewritten)
        out.append(rewritten)
        return True

    def _translate_events(self, data: bytes, out: list[bytes]) -> bool:
        """Backend bytes of a translated answer: kept until they end an event, then the
        events they complete go out rewritten."""
        pending = self._untranslated + data
        tracker = EventStreamTracker()
        tracker.feed(pending)
        if not tracker.at_boundary:
            if len(pending) > _MAX_EVENT_BYTES:
                self._fail("event stream: an event over 1 MiB could not be translated")
                return False
            self._untranslated = pending
            return True
        self._untranslated = b""
        self._relay_translated(pending, out)
        return True

    def _relay_translated(self, events: bytes, out: list[bytes]) -> None:
        assert self._translation is not None
        rewritten = self._translation.rewrite_relayed(events)
        if rewritten is None:
            rewritten = events
        if not rewritten:
            return  # every event in it was left out (an empty chunk would end the body)
        self._tracker.feed(rewritten)
        out.append(rewritten)
        if self._awaited is not None:
            self._look_for_response(rewritten)

    def _fail(self, reason: str) -> None:
        x = self.c.x
        assert x is not None
        x.fail(502, reason)

    def _look_for_response(self, data: bytes) -> None:
        """Set ``ending`` once the awaited JSON-RPC response has gone by."""
        self._pending += data
        if not self._tracker.at_boundary:
            if len(self._pending) > _MAX_EVENT_BYTES:
                self._awaited = None  # events this large are not worth following
                self._pending = b""
            return
        for payload in event_payloads(self._pending):
            if response_id(payload) == self._awaited:
                self.ending = True
                self._awaited = None
        self._pending = b""

    def _rewrite_endpoint(self, value: bytes) -> bytes:
        c = self.c
        x = c.x
        tokens = c.env.tokens
        assert x is not None
        route = x.route
        backend = x.backend
        if tokens is None or route is None or backend is None:
            raise EndpointRewriteError("no session keys for this route")
        target = route.upstream_target(backend, self._target)
        sse_path = target.partition(b"?")[0].decode("latin-1") or "/"
        endpoint = parse_endpoint_event(value, sse_path=sse_path)
        token = tokens.issue(backend.replica, endpoint.session_id)
        return rewrite_endpoint_event(
            value,
            route.prefix if route.strip_prefix else "",
            token,
            backend_prefix=backend.base_path.decode("latin-1"),
            sse_path=sse_path,
        )
