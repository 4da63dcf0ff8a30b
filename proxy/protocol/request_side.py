"""The request half of the connection machine (``proxy.protocol.connection``): the PROXY
header, request heads, admission (authentication, connection caps, rate limits) and the
body, up to the moment the request is routed (``proxy.protocol.routing_side``). Sans-IO.

Admission is a short pipeline whose steps may wait for Redis: ``_admit`` runs it from a
step until it completes or a check is pending (state ADMISSION); ``admitted`` takes the
check's answer and goes on from the next step.
"""

from __future__ import annotations

import time
from typing import Any

from mypy_extensions import mypyc_attr

from proxy.auth import AUTH_FAILED, AuthFailure
from proxy.conncaps import CapDecision, ip_scope, tenant_scope
from proxy.mcp_routing import (
    McpRefusal,
)
from proxy.protocol import answers
from proxy.protocol.body import BodyReader, BodyRejected
from proxy.protocol.connection_core import (
    ADMISSION,
    BODY,
    HEAD,
    IDLE,
    INF,
    UPSTREAM,
    ConnectionCore,
)
from proxy.protocol.exchange import Exchange
from proxy.protocol.fast_head import NEED_MORE, FastHead, Rejected
from proxy.protocol.jsonrpc import INTERNAL_ERROR
from proxy.protocol.proxy_header import (
    V2_SIGNATURE,
    ProxyHeaderError,
    looks_like_proxy_header,
    parse_proxy_header,
    unmap_ipv4,
)
from proxy.ratelimit import RATE_LIMITED, Decision

MAX_HELD_BODY = 65536
"""The largest Content-Length body collected whole before a backend is contacted."""
_SIGNATURE_LENGTH = len(V2_SIGNATURE)

# Admission steps, in order.
_IP_CAP, _AUTH, _TENANT_CAP, _RATE, _BODY, _MCP_RATE, _BACKEND = range(7)
MCP_RATE_STEP = _MCP_RATE
_METADATA_HEADERS = (
    # Browser-based MCP clients read it from another origin.
    (b"access-control-allow-origin", b"*"),
    (b"cache-control", b"max-age=300"),
)
_FAILED_AUTH_RATE = 100
"""Pending marker: the IP rate check of a request whose credentials failed."""
SESSION_STEP = 101
"""Pending marker: the upstream session a translated request waits for
(``proxy.protocol.translating_side``)."""
PROBE_STEP = 102
"""Pending marker: the era of an ``auto`` route, which a request waits to learn."""


@mypyc_attr(allow_interpreted_subclasses=True)
class RequestSide(ConnectionCore):
    __slots__ = ()

    # What the backend half provides (proxy.protocol.connection).

    def _send_upstream_request(self, head: bytes, body: bytes = b"") -> None:
        raise NotImplementedError

    # What the routing half provides (proxy.protocol.routing_side).

    def _after_body(self, *, streaming: bool = False) -> None:
        raise NotImplementedError

    def _mcp_rate_limit(self) -> None:
        raise NotImplementedError

    def _choose_backend(self) -> None:
        raise NotImplementedError

    def session_opened(self, result: object) -> None:
        raise NotImplementedError

    def era_probed(self, result: object) -> None:
        raise NotImplementedError

    # -- the PROXY header ---------------------------------------------------------------

    def _proxy_header(self, data: bytes) -> None:
        """A source in ``trusted_networks`` must open with a valid PROXY header; anyone
        else must not send one at all."""
        buf = self.buf + data if self.buf else data
        if not self.trusted:
            if not looks_like_proxy_header(buf[:_SIGNATURE_LENGTH]):
                self._after_proxy_header(buf)
                return
            if len(buf) >= _SIGNATURE_LENGTH or buf.startswith(b"PROXY "):
                self._proxy_refused("PROXY header from an untrusted source")
                return
            self.buf = buf  # "P", "PR"...: a request method or a header; read on
            return
        try:
            parsed = parse_proxy_header(buf)
        except ProxyHeaderError as exc:
            self._proxy_refused(f"malformed PROXY header: {exc}")
            return
        if parsed is None:
            self.buf = buf
            return
        info, consumed = parsed
        if info.command == "PROXY" and info.source is not None:
            self.peer = (unmap_ipv4(info.source[0]), info.source[1])
            self.peer_ip = self.peer[0].encode("ascii")
        self._after_proxy_header(buf[consumed:])

    def _after_proxy_header(self, rest: bytes) -> None:
        self.state = IDLE
        self.buf = b""
        self.deadline = self.env.now() + self.limits.header_timeout
        if rest:
            self.buf = rest
            self._read_head()

    def _proxy_refused(self, reason: str) -> None:
        self.env.proxy_header_refused(self.peer, reason)
        self._closed()

    # -- request heads ------------------------------------------------------------------

    def _read_head(self) -> None:
        buf = self.buf
        verdict = self.heads.read(buf)
        if type(verdict) is FastHead:
            consumed = verdict.consumed
            self.buf = buf[consumed:] if consumed < len(buf) else b""
            self._request(verdict)
        elif verdict is NEED_MORE:
            if self.state == IDLE:
                self.state = HEAD
                if not self.first:  # a first head's time runs from the accept
                    self._phase(self.env.now() + self.limits.header_timeout)
        else:
            assert isinstance(verdict, Rejected)
            self._refuse(verdict.status, verdict.reason, verdict.headers, log_only=True)

    def _request(self, head: FastHead) -> None:
        info = head.info
        route = self.env.routes.match(info.path)
        x = self.x = Exchange(head.method, head.target, time.perf_counter(), route)
        self.head = head
        if route is None:
            document = self.env.routes.documents.get(info.path.encode("latin-1"))
            bodiless = not info.content_length and not info.chunked
            if document is not None and head.method == b"GET" and bodiless:
                self.request_done = True
                self._answer_here(200, document, None, _METADATA_HEADERS)
                return
            self._refuse(404, "no route for this path")
            return
        length = info.content_length
        if length:
            limit = self.limits.max_body_bytes
            if limit and length > limit:
                self._refuse(413, "request body larger than max_body_bytes")
                return
        else:
            self.request_done = not info.chunked
        if info.expect_continue:
            self.expect_continue = True
        # HTTP/1.0 keep-alive is not offered (as h11 does not): such a client's
        # connection ends after its answer.
        if head.http_version != b"1.1" or b"close" in info.connection_tokens:
            self.close_after = True
        if self.env.checking or route.auth == "required":
            self.state = ADMISSION
            self._admit(_IP_CAP)
            return
        if route.kind == "mcp" or not (self.request_done or self._body_in_hand(x, length)):
            self._start_body()
            return
        # The usual case: nothing to admit, the body (if any) came with the head.
        self._choose_backend()

    def _body_in_hand(self, x: Exchange, length: int | None) -> bool:
        """Take a Content-Length body that came whole with the head; False when it did
        not (the body is then read as it comes)."""
        buf = self.buf
        if not length or len(buf) < length or self.expect_continue:
            return False
        if len(buf) > length:
            body = buf[:length]
            self.buf = buf[length:]
        else:
            body = buf
            self.buf = b""
        self.held = [body]
        x.bytes_in = length
        self.request_done = True
        return True

    def _answer_here(
        self,
        status: int,
        body: bytes,
        reason: str | None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """A JSON answer of the proxy's own that leaves the connection usable: a refusal
        (``reason``) in band, or a document it serves (OAuth resource metadata)."""
        x = self.x
        assert x is not None
        x.status = status
        x.error = reason
        x.refused = reason is not None
        x.bytes_out = len(body)
        draining = self.env.draining and not self.buf
        self.close_after = close = self.close_after or draining or not self.request_done
        self.t.send_client(answers.json_answer(status, body, headers, close=close))
        self.upstream_done = True
        self._exchange_done()

    # -- admission ------------------------------------------------------------------------

    def _admit(self, step: int) -> None:
        """Run the admission pipeline from ``step``; it stops at a pending check."""
        env = self.env
        x = self.x
        assert x is not None and x.route is not None and self.head is not None
        route = x.route
        if step <= _IP_CAP and self.first:
            check = env.cap_check(ip_scope(self.peer[0]), None)
            if check is not None:
                self._wait(_IP_CAP, check)
                return
        if step <= _AUTH and env.auth_required(route):
            result = env.authenticate(self.head.headers, route)
            if isinstance(result, AuthFailure):
                # Failed attempts count against the client's IP limit too, so guessing
                # keys is rate-limited like anything else.
                self.auth_failure = result
                check = env.rate_check(self.peer[0], None, None)
                if check is not None:
                    self._wait(_FAILED_AUTH_RATE, check)
                    return
                self._refuse_auth(result)
                return
            x.identity = result
        if step <= _TENANT_CAP and x.identity is not None and x.identity.tenant is not None:
            tenant = x.identity.tenant
            if not self.tenants or tenant not in self.tenants:
                check = env.cap_check(tenant_scope(tenant), x.identity)
                if check is not None:
                    self._wait(_TENANT_CAP, check)
                    return
        if step <= _RATE and route.kind != "mcp":
            check = env.rate_check(self.peer[0], x.identity, None)
            if check is not None:
                self._wait(_RATE, check)
                return
        if step <= _BODY:
            self._start_body()
            return
        if step <= _MCP_RATE:
            self._mcp_rate_limit()
            return
        self._choose_backend()

    def _wait(self, step: int, check: Any) -> None:
        self.pending = step
        self.state = ADMISSION
        self.t.admit(check)

    def admitted(self, result: object) -> None:
        """The answer to the pending check: a rate ``Decision``, a cap lease, or the
        ``CapDecision`` that refused one."""
        step = self.pending
        self.pending = 0
        if self.state != ADMISSION:
            if not isinstance(result, CapDecision | Decision):
                self.t.release_leases([result])  # the connection went meanwhile
            return
        x = self.x
        assert x is not None
        if step == SESSION_STEP:
            self.session_opened(result)
            return
        if step == PROBE_STEP:
            self.era_probed(result)
            return
        if isinstance(result, CapDecision):
            self._refuse_limited(result, step)
            return
        if isinstance(result, Decision):
            if step == _FAILED_AUTH_RATE:
                assert self.auth_failure is not None
                if result.allowed:
                    self._refuse_auth(self.auth_failure)
                else:
                    self._refuse_limited(result, step)
                return
            if not result.allowed:
                self._refuse_limited(result, step)
                return
        else:  # a lease
            if self.leases is None:
                self.leases = []
            self.leases.append(result)
            if step == _TENANT_CAP and x.identity is not None and x.identity.tenant:
                if self.tenants is None:
                    self.tenants = set()
                self.tenants.add(x.identity.tenant)
        self._admit(step + 1)

    def _refuse_auth(self, failure: AuthFailure) -> None:
        x = self.x
        assert x is not None and x.route is not None
        if x.route.kind == "mcp":
            refusal = McpRefusal(
                failure.status, AUTH_FAILED, failure.description, None, failure.headers()
            )
            self._refuse(failure.status, failure.description, rpc=refusal)
            return
        self._refuse(failure.status, failure.description, failure.headers())

    def _refuse_limited(self, verdict: Decision | CapDecision, step: int) -> None:
        x = self.x
        assert x is not None and x.route is not None
        if isinstance(verdict, Decision):
            status, headers = verdict.status, verdict.headers()
            reason = "rate limit exceeded" if status == 429 else "rate limits unavailable"
        else:
            retry = str(self.env.config.server.retry_after_seconds).encode()
            status, headers = 429, [(b"retry-after", retry)]
            kind = verdict.scope.split(":", 1)[0]
            reason = f"connection limit reached ({kind})"
        if x.route.kind == "mcp" or step == _MCP_RATE:
            code = RATE_LIMITED if status == 429 else INTERNAL_ERROR
            request_id = x.mcp.request_id if x.mcp is not None else None
            self._refuse(status, reason, rpc=McpRefusal(status, code, reason, request_id, headers))
            return
        self._refuse(status, reason, headers)

    # -- the body -------------------------------------------------------------------------

    def _start_body(self) -> None:
        x = self.x
        head = self.head
        assert x is not None and x.route is not None and head is not None
        info = head.info
        length = info.content_length
        if self.request_done or self._body_in_hand(x, length):
            self._after_body()
            return
        self.body = BodyReader(length, info.chunked, self.limits.max_body_bytes)
        if self.expect_continue:
            if x.route.kind != "mcp":
                # The client waits for the backend's 100 Continue: the head goes alone.
                self._after_body(streaming=True)
                return
            # An MCP message is routed on its content: ask for it ourselves.
            self.t.send_client(answers.CONTINUE)
            self.expect_continue = False
        self.state = BODY
        self._phase(self.env.now() + self.limits.body_timeout)
        self._resume_reading()
        buf = self.buf
        if buf:
            self.buf = b""
            self._body_in(buf)

    def _body_in(self, data: bytes) -> None:
        """Body bytes from the client: held in BODY, sent up while ``uploading``."""
        body = self.body
        x = self.x
        assert body is not None and x is not None
        try:
            pieces, rest = body.feed(data)
        except BodyRejected as exc:
            if self.response_started:
                self._client_gone(exc.reason, exc.status)
            else:
                self._refuse(exc.status, exc.reason)
            return
        if rest:
            self.buf = rest + self.buf if self.buf else rest
        x.bytes_in = body.received
        done = body.done
        if self.state == BODY:
            self.held += pieces
            if done:
                self.request_done = True
                self._after_body()
            elif self._hold_whole_body() or not body.checked:
                # (Nothing of the body found well framed yet: a chunk still arriving.)
                self._phase(self.env.now() + self.limits.body_timeout)
            else:
                # Read ahead: what arrived was checked; the rest streams up as it comes.
                self._after_body(streaming=True)
            return
        up = self.up
        framed = body.upstream(pieces, ending=done)
        if up is not None and framed:
            self.t.send_upstream(up, framed)
            if self.sent is not None:
                self.sent.append(framed)  # not connected yet: a retry may resend it
        now = self.env.now()
        if not done:
            self.upload_deadline = now + self.limits.body_timeout
            self._phase(self.phase_deadline)
            return
        self.uploading = False
        self.request_done = True
        self.upload_deadline = INF
        if self.state == UPSTREAM and up is not None and up.connected and x.route is not None:
            # The request is all sent: the wait for its answer starts now.
            self._phase(now + x.route.response_timeout)
        else:
            self._phase(self.phase_deadline)

    def _hold_whole_body(self) -> bool:
        """An MCP message is routed on its content, and a small body of known length is
        sent with its head in one write (and can be sent again on a retry); anything
        else streams up once its first bytes have been checked."""
        x = self.x
        head = self.head
        assert x is not None and x.route is not None and head is not None
        length = head.info.content_length
        return x.route.kind == "mcp" or (length is not None and length <= MAX_HELD_BODY)
