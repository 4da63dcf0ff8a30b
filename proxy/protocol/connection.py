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
request half (heads, bodies, admission) is ``proxy.protocol.request_side``; this module
has the events, the backend half and the lifecycle.
"""

from __future__ import annotations

from proxy.protocol import answers
from proxy.protocol.chunked import LAST_CHUNK
from proxy.protocol.connection_core import (
    ADMISSION,
    AS_IS,
    BODY,
    CHUNKED,
    CLOSED,
    DRAIN_IDLE_GRACE,
    HEAD,
    IDLE,
    INF,
    LINGER,
    LINGER_BYTES,
    NO_BODY,
    PIPELINE_LIMIT,
    PROXY,
    RESPONSE,
    STATE_NAMES,
    STREAM,
    TUNNEL,
    UNTIL_CLOSE,
    UPSTREAM,
)
from proxy.protocol.event_stream import StreamRelay
from proxy.protocol.exchange import Upstream
from proxy.protocol.fast_response import END, Malformed, ResponseHead
from proxy.protocol.http1 import downstream_response_headers, reason_phrase
from proxy.protocol.request_side import RequestSide
from proxy.protocol.tunnel import Tunnel

__all__ = ["AS_IS", "STATE_NAMES", "Connection"]


class Connection(RequestSide):
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
            # The answer is read (and dropped, the writes failing) to its end.
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
        elif not self.response_started:
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
            if up is not None and not up.connected:
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

    # -- the backend half -----------------------------------------------------------------

    def _send_upstream_request(self, head: bytes, body: bytes = b"") -> None:
        """Open a backend connection and send the request (its head and what is held of
        the body); on to UPSTREAM. ``sent`` keeps both while a retry could resend them:
        until the answer begins, and only if no body went up beyond them."""
        x = self.x
        request = self.head
        assert x is not None and x.backend is not None and x.route is not None
        assert request is not None
        up = self.t.open_upstream(x.backend, fresh=self.retried)
        self.up = up
        up.reader.start(request.method == b"HEAD")
        self.state = UPSTREAM
        self.t.send_upstream(up, head + body if body else head)
        if self.client_blocked:
            self.t.pause_upstream(up, True)  # the client still has not taken the last answer
        now = self.env.now()
        connected = up.connected
        # Kept while a retry could send it again: all of it, or what went to a connection
        # not made yet (of a body that streams up).
        self.sent = [head, body] if not self.uploading or not connected else None
        if self.uploading:
            self.upload_deadline = now + self.limits.body_timeout
        if not connected:
            self._phase(now + self.env.config.upstream.connect_timeout)
        elif self.uploading:
            self._phase(INF)  # the answer's wait starts once the request is all sent
        else:
            self._phase(now + x.route.response_timeout)

    def _response_timeout(self) -> float:
        x = self.x
        route = x.route if x is not None else None
        return route.response_timeout if route is not None else 60.0

    def _relay(self, events: list[ResponseHead | bytes | None]) -> None:
        """A response's events (its head, body bytes, its end) to the client."""
        x = self.x
        up = self.up
        assert x is not None and up is not None
        out: list[bytes] = []
        framing = self.framing
        for event in events:
            if type(event) is bytes:
                x.bytes_out += len(event)
                if framing == CHUNKED:
                    out.append(b"%x\r\n%b\r\n" % (len(event), event))
                elif framing != NO_BODY:
                    out.append(event)
            elif event is not END:
                assert isinstance(event, ResponseHead)
                if not self._response_head(event, out):
                    return
                if self.state > RESPONSE:
                    # An event stream or a tunnel takes over from here.
                    if out:
                        self.t.send_client(b"".join(out))
                    self._hand_over(events[events.index(event) + 1 :])
                    return
                framing = self.framing
        if up.reader.complete:
            if framing == CHUNKED:
                out.append(LAST_CHUNK)
            self.t.send_client(b"".join(out))
            self.upstream_done = True
            self._exchange_done()
            return
        if out:
            self.t.send_client(b"".join(out))
        if self.response_started:
            self._phase(self.env.now() + self.env.config.upstream.read_timeout)

    def _response_head(self, head: ResponseHead, out: list[bytes]) -> bool:
        """Put the client's copy of a response head in ``out`` and move to RESPONSE,
        STREAM or TUNNEL; False when the response cannot be relayed (the exchange has
        been ended)."""
        status = head.status
        if status < 200:
            if status == 101:
                return self._switch_protocols(head, out)
            if status == 100:
                if self.expect_continue:  # the client still waits for it
                    self.expect_continue = False
                    out.append(answers.CONTINUE)
                return True
            x = self.x
            request = self.head
            assert x is not None and request is not None
            if request.http_version == b"1.1":
                # RFC 9110 §15.2: a proxy forwards the 1xx answers it did not ask for
                # (103 Early Hints, 102 Processing); HTTP/1.0 clients know none.
                headers = downstream_response_headers(
                    head.headers, head.http_version, self.env.policy_for(x.route)
                )
                out.append(answers.response_head(status, head.reason, headers))
            return True
        x = self.x
        request = self.head
        assert x is not None and request is not None
        self.sent = None  # an answer has begun: nothing will be resent
        env = self.env
        if status == 204 or status == 304 or request.method == b"HEAD":
            framing = NO_BODY
        elif head.content_length is not None:
            framing = AS_IS
        elif request.http_version == b"1.1":
            framing = CHUNKED
        else:
            framing = UNTIL_CLOSE
        # Draining, a request that already arrived behind this one is still served.
        close = (
            self.close_after
            or (env.draining and not self.buf)
            or self.client_eof
            or framing == UNTIL_CLOSE
        )
        self.close_after = close
        streaming = head.event_stream
        mcp = x.mcp
        plain = head.plain
        if (
            plain is not None
            and not close
            and not (framing == NO_BODY and head.chunked)
            and not (mcp is not None and mcp.issue_session and head.session)
        ):
            # Nothing in the backend's header lines is removed or rewritten: they go as
            # they came, with what downstream_response_headers would add.
            if framing == CHUNKED and not head.chunked:
                plain += b"transfer-encoding: chunked\r\n"
            if streaming and mcp is not None and not head.unbuffered:
                plain += b"x-accel-buffering: no\r\n"
            out.append(
                b"HTTP/1.1 %d %s\r\n%bvia: %s %s\r\n\r\n"
                % (status, head.reason or reason_phrase(status), plain, head.http_version, env.via)
            )
        else:
            headers = downstream_response_headers(
                head.headers, head.http_version, env.policy_for(x.route), close=close
            )
            if framing == CHUNKED:
                headers.append((b"transfer-encoding", b"chunked"))
            if mcp is not None:
                self.mcp_response_headers(headers, streaming=streaming)
            out.append(answers.response_head(status, head.reason, headers))
        x.status = status
        self.framing = framing
        self.response_started = True
        if streaming and framing != NO_BODY:
            x.streamed = True
            self.stream = StreamRelay(self, can_add=framing == CHUNKED)
            self._enter_kind("sse")
            self.state = STREAM
            self._hold_lightly()
            if self.client_reset:
                self.stream.client_left()  # it left while the answer was on its way
        else:
            self.state = RESPONSE
        return True

    def _hold_lightly(self) -> None:
        """A stream or a tunnel may be held for hours, silent nearly all of it: what it
        no longer needs goes now (the request head, the head parser's state), so that
        a held connection costs little more than its sockets."""
        self.head = None
        self.heads.idle()

    def _hand_over(self, events: list[ResponseHead | bytes | None]) -> None:
        if self.state == STREAM:
            assert self.stream is not None
            self.stream.start(events)
        elif self.state == TUNNEL:
            assert self.tunnel is not None and self.up is not None
            self.tunnel.start(self.up.reader.trailing)

    def _switch_protocols(self, head: ResponseHead, out: list[bytes]) -> bool:
        x = self.x
        request = self.head
        assert x is not None and request is not None
        if request.info.upgrade is None or not self.request_done:
            self._upstream_broken("backend switched protocols unasked")
            return False
        headers = downstream_response_headers(
            head.headers, head.http_version, self.env.policy_for(x.route), upgrade=True
        )
        x.status = 101
        x.streamed = True
        self.response_started = True
        self.sent = None
        out.append(answers.response_head(101, head.reason, headers))
        self.tunnel = Tunnel(self)
        self._enter_kind("websocket")
        self.state = TUNNEL
        self._hold_lightly()
        assert self.up is not None
        self.up.reader.spent()  # what follows the 101 is not HTTP
        return True

    def _upstream_failed_early(self, up: Upstream, *, reset: bool, before_write: bool) -> None:
        """The backend connection ended before a response head: resend once where that
        cannot run the request twice, else answer 502."""
        sent = self.sent
        if sent is not None and not self.retried:
            if up.reused and (before_write or self.request_done):
                # A pooled connection the backend closed while it sat idle (its
                # keep-alive ran out): that says nothing of the backend's health, so
                # once more on a fresh connection to the same backend, no verdict
                # (counted as an error, not as a refused connect).
                self._drop_upstream(failure="error")
                if self._retry(sent, elsewhere=False):
                    return
            elif before_write:
                # Refused (or reset) before a byte of the request reached it: another
                # healthy replica at once.
                self._drop_upstream(ok=False, failure="connect")
                if self._retry(sent, elsewhere=True):
                    return
        if before_write:
            self._give_up_upstream(502, "cannot connect to backend", "connect")
        elif reset:
            self._give_up_upstream(502, "backend reset the connection", "error")
        else:
            self._give_up_upstream(502, "backend closed the connection", "error")

    def _retry(self, sent: list[bytes], *, elsewhere: bool) -> bool:
        """Resend the request once, on a fresh connection (``elsewhere``: to another
        backend of the route); False when there is nowhere to send it."""
        x = self.x
        assert x is not None and x.route is not None
        self.retried = True
        head = sent[0]
        body = b"".join(sent[1:])
        if elsewhere:
            if x.mcp is not None and x.mcp.replica is not None:
                return False  # a session is bound to its replica
            backend = self.env.choose_backend(x.route, None, avoid=x.backend)
            if backend is None:
                return False
            x.backend = backend
            head = self.upstream_request(x.route, backend)
        self._send_upstream_request(head, body)
        return True

    def _give_up_upstream(self, status: int, reason: str, failure: str) -> None:
        """The backend failed before answering: ``status`` to the client."""
        self._drop_upstream(ok=False, failure=failure)
        self._refuse(status, reason)

    def _upstream_broken(self, reason: str, *, status: int = 502) -> None:
        """The backend's answer cannot be completed. Before its head went out the client
        gets ``status``; after, its connection is cut (``_abort``)."""
        if self.response_started:
            self._abort(status, reason)
        else:
            self._drop_upstream(ok=False, failure="timeout" if status == 504 else "error")
            self._refuse(status, reason)
