"""The per-connection machine: one object per client connection, fed events, acting
through its transport. Sans-IO: no sockets, no event loop, no clock of its own.

Events in (methods): bytes from the client or from the backend, either side closing,
a backend connection made, a side's write buffer filling or draining, the connection's
deadline passing, a drain beginning, an admission check answered. Actions out (calls
on ``Transport``, see ``proxy.protocol.exchange``): bytes to write where, open a backend
connection or give one back, pause a side, close, run a check; and one ``Env.account``
per exchange.

States, in the order an exchange goes through them::

    PROXY      reading a PROXY protocol header (trusted load balancers only)
    IDLE       no request in progress: waiting for the first byte of the next one
    HEAD       part of a request head has arrived
    ADMISSION  waiting for a check that needs Redis (caps, rate limits)
    BODY       collecting the request body before any backend is contacted
    UPSTREAM   the request is on its way to a backend; waiting for the response head
    RESPONSE   relaying a response body
    STREAM     relaying an event stream (``proxy.protocol.event_stream``)
    TUNNEL     relaying bytes after a 101 (``proxy.protocol.tunnel``)
    LINGER     our side is closed; what the client still sends is read and dropped
    CLOSED

While the body still arrives in UPSTREAM, RESPONSE or STREAM, ``uploading`` says so and
it goes on up as it comes. A connection with nothing to do holds no task or coroutine
anywhere, only this object and its sockets: an idle keep-alive connection and a silent
event stream ("parked") alike.

``disposition`` is the one place that answers, at the end of an exchange, whether the
backend connection can be reused and whether the client connection goes on. The
machine is one class built in layers, each a module: ``connection_core`` (the state, the
exchange's end, refusals, closing), ``request_side`` (heads, admission, bodies),
``routing_side`` (MCP routing, the backend's request head), ``upstream_side`` (the
backend half: sending, relaying, failures) and this one (the events and the timer).
"""

from __future__ import annotations

from mypy_extensions import mypyc_attr

from proxy.protocol.connection_core import (
    ADMISSION,
    AS_IS,
    BODY,
    CLOSED,
    DRAIN_IDLE_GRACE,
    HEAD,
    IDLE,
    INF,
    LINGER,
    LINGER_BYTES,
    PIPELINE_LIMIT,
    PROXY,
    RESPONSE,
    STATE_NAMES,
    STREAM,
    TUNNEL,
    UPSTREAM,
)
from proxy.protocol.fast_response import Malformed
from proxy.protocol.upstream_side import UpstreamSide

__all__ = ["AS_IS", "STATE_NAMES", "Connection"]


@mypyc_attr(allow_interpreted_subclasses=True)
class Connection(UpstreamSide):
    """One client connection's machine (see the module docstring)."""

    __slots__ = ()

    # -- events ---------------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        state = self.state
        if state <= HEAD:
            if state == PROXY:
                self._proxy_header(data)
            else:
                self.buf = self.buf + data if self.buf else data
                self._read_head()
        elif state == BODY or (self.uploading and state <= STREAM):
            self._body_in(data)
        elif state == TUNNEL:
            assert self.tunnel is not None
            self.tunnel.client_data(data)
        elif state == LINGER:
            self.linger_bytes += len(data)
            if self.linger_bytes > LINGER_BYTES:
                self._closed()
        elif state != CLOSED:
            # Pipelined (or read ahead while a check is pending): kept until wanted.
            self.buf += data
            if len(self.buf) > PIPELINE_LIMIT and not self.reading_paused:
                self.reading_paused = True
                self.t.pause_client(True)

    def client_closed(self, *, reset: bool = False) -> None:
        """The client sent its FIN (``reset``: its connection broke or was reset; told
        again each time a write to it fails)."""
        state = self.state
        again = self.client_reset if reset else self.client_eof
        self.client_eof = True
        if reset:
            self.client_reset = True
        if state == CLOSED:
            return
        if state == LINGER or (state <= HEAD and not self.buf):
            self._closed()
            return
        if state == STREAM:
            assert self.stream is not None
            if not again and not self.stream.left:
                self.stream.client_left()
            return
        if state == UPSTREAM and self._left_to_finish():
            # A 2025-11-25 (or legacy) request: the client leaving is no cancellation.
            # The answer is read (and dropped, the writes failing) to its end. A
            # translated 2026-07-28 client's leaving is: its backend is told.
            self._cancel_upstream()
            return
        if reset:
            self._client_gone("client reset the connection")
        elif state <= HEAD:
            self._refuse(400, "connection closed inside the request head", log_only=True)
        elif state == BODY or self.uploading:
            self._client_gone("client closed the connection inside the request body", 400)
        elif state == ADMISSION:
            self._client_gone("client closed the connection")
        elif state == TUNNEL:
            assert self.tunnel is not None
            self.tunnel.client_eof()
        elif state == UPSTREAM and self._closing_cancels():
            # 2026-07-28: closing the response stream cancels the request.
            self._client_gone("client closed the connection (cancels the request upstream)")
        # Otherwise the client may only have half-closed: the answer still goes to it,
        # and the connection ends after it.

    def _closing_cancels(self) -> bool:
        x = self.x
        return x is not None and x.mcp is not None and x.mcp.cancel_on_disconnect

    def _left_to_finish(self) -> bool:
        """An MCP request whose era does not take the client leaving as cancellation,
        and that has work upstream worth letting finish (a POST)."""
        x = self.x
        mcp = x.mcp if x is not None else None
        return (
            mcp is not None
            and not mcp.cancel_on_disconnect
            and x is not None
            and (x.method == b"POST")
        )

    def upstream_connected(self) -> None:
        if self.state == UPSTREAM and not self.response_started:
            if self.uploading:
                self.sent = None  # the body flows now: no retry could send it all again
                self._phase(INF)
            else:
                self._phase(self.env.now() + self._response_timeout())

    def upstream_data(self, data: bytes) -> None:
        up = self.up
        if up is None:
            return
        state = self.state
        if state == TUNNEL:
            assert self.tunnel is not None
            self.tunnel.upstream_data(data)
            return
        try:
            events = up.reader.feed(data)
        except Malformed as exc:
            self._upstream_broken(str(exc))
            return
        if state == STREAM:
            assert self.stream is not None
            self.stream.events(events)
        elif self.held_answer is not None:
            self._hold(events)
        else:
            self._relay(events)

    def upstream_closed(self, *, reset: bool = False, before_write: bool = False) -> None:
        """The backend closed (``reset``: the connection broke; ``before_write``: no
        byte of the request reached it, as when the connection was refused)."""
        up = self.up
        if up is None:
            return
        if self.state == TUNNEL:
            assert self.tunnel is not None
            self.tunnel.upstream_eof(reset=reset)
        elif not self.response_started and self.held_answer is None:
            self._upstream_failed_early(up, reset=reset, before_write=before_write)
        elif reset:
            self._upstream_broken("backend reset the connection mid-response")
        else:
            self.upstream_data(b"")  # the end of a close-delimited body, or a truncation

    def client_backlog(self, blocked: bool) -> None:
        """The client's write buffer filled (or drained): stop (or resume) reading the
        backend, so the proxy never holds more than one read of it; the send timeout
        runs meanwhile."""
        if blocked == self.client_blocked or self.state == CLOSED:
            return
        self.client_blocked = blocked
        up = self.up
        if up is not None and self.state >= RESPONSE:
            self.t.pause_upstream(up, blocked)
        self.send_deadline = self.env.now() + self.limits.send_timeout if blocked else INF
        self._phase(self.phase_deadline)

    def upstream_backlog(self, blocked: bool) -> None:
        """The backend's write buffer filled (or drained): the upload waits."""
        if self.state != CLOSED and (self.uploading or self.state == TUNNEL):
            self.t.pause_client(blocked)

    def timer(self) -> None:
        """The deadline passed (early calls are harmless)."""
        now = self.env.now()
        if now < self.deadline:
            return
        state = self.state
        if now >= self.send_deadline and state != LINGER:
            self._client_gone("client stopped reading (send_timeout)")
        elif self.uploading and now >= self.upload_deadline:
            if self.response_started:
                self._client_gone("timed out reading request body", 408)
            else:
                self._refuse(408, "timed out reading request body")
        elif now < self.phase_deadline:
            self._phase(self.phase_deadline)
        elif state == PROXY and not self.trusted and self.buf:
            # "P", "PR"...: the start of a request head, timed like any head.
            self._refuse(408, "timed out reading request head", log_only=True)
        elif state in (IDLE, PROXY):
            if state == PROXY and self.trusted:
                self.env.proxy_header_refused(self.peer, "timed out reading the PROXY header")
            self._closed()
        elif state == HEAD:
            self._refuse(408, "timed out reading request head", log_only=True)
        elif state == BODY:
            self._refuse(408, "timed out reading request body")
        elif state == UPSTREAM:
            up = self.up
            if up is not None and up.queued:
                # The proxy's own cap, not the backend's failure: no verdict on its health.
                self._refuse(503, "backend connection limit reached (max_connections_per_backend)")
            elif up is not None and not up.connected:
                self._give_up_upstream(502, "timed out connecting to backend", "connect")
            else:
                self._give_up_upstream(504, "backend response timeout", "timeout")
        elif state == RESPONSE:
            self._upstream_broken("backend went silent mid-response", status=504)
        elif state == STREAM:
            assert self.stream is not None
            self.stream.timer(now)
        elif state == TUNNEL:
            assert self.tunnel is not None
            self.tunnel.timer(now)
        elif state == LINGER:
            self._closed()
        else:  # ADMISSION: its check has a timeout of its own
            self._phase(INF)

    def drain(self) -> None:
        """The worker is draining: what has arrived is served, then the connection
        ends; an idle kept-alive one gets a moment for a request already on its way."""
        state = self.state
        if state == IDLE and not self.first:
            self._phase(min(self.phase_deadline, self.env.now() + DRAIN_IDLE_GRACE))
        elif state == STREAM:
            assert self.stream is not None
            self.stream.drain()
        elif state == TUNNEL:
            assert self.tunnel is not None
            self.tunnel.drain()
