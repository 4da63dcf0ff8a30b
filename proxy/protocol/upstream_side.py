"""The backend half of the connection machine (``proxy.protocol.connection``): sending
the request to the chosen backend, relaying the response head and body (or handing over
to an event stream or a tunnel), and what happens when a backend fails before or during
its answer (one retry where that cannot run the request twice, else 502/504). Sans-IO.
"""

from __future__ import annotations

from mypy_extensions import mypyc_attr

from proxy.protocol import answers
from proxy.protocol.chunked import LAST_CHUNK, encode_chunk
from proxy.protocol.connection_core import (
    AS_IS,
    CHUNKED,
    INF,
    NO_BODY,
    RESPONSE,
    STREAM,
    TUNNEL,
    UNTIL_CLOSE,
    UPSTREAM,
)
from proxy.protocol.event_stream import StreamRelay
from proxy.protocol.exchange import Upstream
from proxy.protocol.fast_response import END, ResponseHead
from proxy.protocol.http1 import downstream_response_headers, reason_phrase
from proxy.protocol.routing_side import RoutingSide
from proxy.protocol.tool_lists import MAX_FILTERED_ANSWER
from proxy.protocol.tunnel import Tunnel
from proxy.protocol.upstream_sessions import ModernAnswer

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_REFRAMED = frozenset({b"content-length", b"transfer-encoding"})


class HeldAnswer:
    """A response held whole before the client gets it (a ``tools/list`` answer
    rewritten for its caller): its head, and its body so far."""

    __slots__ = ("head", "parts", "size")

    def __init__(self, head: ResponseHead) -> None:
        self.head = head
        self.parts: list[bytes] = []
        self.size = 0


@mypyc_attr(allow_interpreted_subclasses=True)
class UpstreamSide(RoutingSide):
    __slots__ = ()

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
                    out.append(encode_chunk(event))
                elif framing != NO_BODY:
                    out.append(event)
            elif event is not END:
                assert isinstance(event, ResponseHead)
                if not self._response_head(event, out):
                    return
                if self.held_answer is not None:
                    self.t.send_client(b"".join(out))  # any 1xx before it
                    self._hold(events[events.index(event) + 1 :])
                    return
                if self.state > RESPONSE:
                    # An event stream or a tunnel takes over from here.
                    self._hand_over(b"".join(out), events[events.index(event) + 1 :])
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
        rewrite = x.answer_rewrite
        if (
            rewrite is not None
            and framing != NO_BODY
            and rewrite.holds(status, event_stream=self._streams(head, framing))
        ):
            # Rewritten for this caller once whole: nothing goes out before then.
            self.framing = framing
            x.status = status
            self.held_answer = HeldAnswer(head)
            self.state = RESPONSE
            return True
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
            up = self.up
            if (
                up is not None
                and up.reader.complete
                and not self.client_reset
                and not (mcp is not None and mcp.legacy_stream)
            ):
                # The whole stream came with its head (a call answered with one event):
                # there is nothing to wait for, add or rewrite, so it is relayed as a
                # plain response.
                self.state = RESPONSE
                return True
            self.stream = StreamRelay(self, can_add=framing == CHUNKED)
            self._enter_kind("sse")
            self.state = STREAM
            if self.client_reset:
                self.stream.client_left()  # it left while the answer was on its way
        else:
            self.state = RESPONSE
        return True

    def _streams(self, head: ResponseHead, framing: int) -> bool:
        """Whether an answer's events can go out one by one as they come: a stream the
        proxy frames anew, not all here yet (else a rewritten answer is held whole)."""
        up = self.up
        return head.event_stream and framing != AS_IS and not (up and up.reader.complete)

    def _hold(self, events: list[ResponseHead | bytes | None]) -> None:
        """Body of a held answer: kept until its end, then rewritten and sent whole."""
        held = self.held_answer
        up = self.up
        assert held is not None and up is not None
        for event in events:
            if type(event) is bytes:
                held.parts.append(event)
                held.size += len(event)
        if held.size > MAX_FILTERED_ANSWER:
            self._upstream_broken("answer too large to rewrite for the caller (tools/list filter)")
        elif up.reader.complete:
            self._send_held()
        else:
            self._phase(self.env.now() + self.env.config.upstream.read_timeout)

    def _send_held(self) -> None:
        x = self.x
        held = self.held_answer
        assert x is not None and held is not None and x.answer_rewrite is not None
        self.held_answer = None
        head = held.head
        body = b"".join(held.parts)
        rewrite = x.answer_rewrite
        if (
            isinstance(rewrite, ModernAnswer)
            and rewrite.session_lost(head.status)
            and self._session_lost(rewrite)
        ):
            return
        body = rewrite.rewrite(body, event_stream=head.event_stream) or body
        close = self.close_after or (self.env.draining and not self.buf) or self.client_eof
        self.close_after = close
        headers = [
            (name, value)
            for name, value in downstream_response_headers(
                head.headers, head.http_version, self.env.policy_for(x.route), close=close
            )
            if name not in _REFRAMED
        ]
        content_type = rewrite.answer_content_type()
        if content_type is not None:
            headers = [(n, v) for n, v in headers if n != b"content-type"]
            headers.append((b"content-type", content_type))
        headers.append((b"content-length", b"%d" % len(body)))
        self.mcp_response_headers(headers, streaming=False)
        headers.extend(rewrite.answer_headers())
        status = rewrite.answer_status(head.status)
        x.status = status
        x.bytes_out += len(body)
        self.response_started = True
        reason = head.reason if status == head.status else b""
        self.t.send_client(answers.response_head(status, reason, headers) + body)
        self.upstream_done = True
        self._exchange_done()

    def _hold_lightly(self) -> None:
        """A stream or a tunnel may be held for hours, silent nearly all of it: what it
        no longer needs goes now (the request head, the head parser's state), so that
        a held connection costs little more than its sockets."""
        self.head = None
        self.heads.idle()

    def _hand_over(self, head: bytes, events: list[ResponseHead | bytes | None]) -> None:
        """``head``: the client's copy of the response head (and any 1xx before it),
        not sent yet: a stream that came whole with its head goes out in one write."""
        if self.state == STREAM:
            stream = self.stream
            assert stream is not None
            stream.start(head, events)
            if self.stream is stream:
                # Still relaying (a stream that came whole is over, and the connection
                # may be reading its next head): it may be held for hours.
                self._hold_lightly()
        elif self.state == TUNNEL:
            assert self.tunnel is not None and self.up is not None
            if head:
                self.t.send_client(head)
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
            request = self.head
            idempotent = request is not None and request.method in _IDEMPOTENT
            if up.reused and (before_write or (self.request_done and idempotent)):
                # A pooled connection the backend closed while it sat idle (its
                # keep-alive ran out): that says nothing of the backend's health, so
                # once more on a fresh connection to the same backend, no verdict
                # (counted as an error, not as a refused connect). Once the request
                # was written, only where running it twice is harmless (RFC 9110
                # §9.2.2): a POST (an MCP call) may have run.
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
