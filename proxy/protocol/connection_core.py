"""The state every part of the connection machine shares, and how an exchange and a
connection end: the answers the proxy gives itself, ``disposition``, closing and
lingering. ``proxy.protocol.connection`` has the overview. Sans-IO.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from mypy_extensions import mypyc_attr

from proxy.mcp_routing import McpRefusal
from proxy.protocol import answers
from proxy.protocol.exchange import Env, Exchange, Transport, Upstream
from proxy.protocol.head_reader import HeadReader
from proxy.protocol.jsonrpc import INTERNAL_ERROR, INVALID_REQUEST

if TYPE_CHECKING:
    from proxy.auth import AuthFailure
    from proxy.protocol.body import BodyReader
    from proxy.protocol.event_stream import StreamRelay
    from proxy.protocol.fast_head import FastHead
    from proxy.protocol.tunnel import Tunnel
    from proxy.protocol.upstream_side import HeldAnswer

PROXY, IDLE, HEAD, ADMISSION, BODY, UPSTREAM, RESPONSE, STREAM, TUNNEL, LINGER, CLOSED = range(11)
STATE_NAMES = (
    "PROXY",
    "IDLE",
    "HEAD",
    "ADMISSION",
    "BODY",
    "UPSTREAM",
    "RESPONSE",
    "STREAM",
    "TUNNEL",
    "LINGER",
    "CLOSED",
)

# How a response body is framed for the client.
NO_BODY, AS_IS, CHUNKED, UNTIL_CLOSE = range(4)

LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20
DRAIN_IDLE_GRACE = 1.0
"""During a drain, how long a kept-alive connection waits for a request already on its
way: one that arrives is served (with ``Connection: close``), then the connection ends."""
PIPELINE_LIMIT = 1 << 20
"""Bytes of later requests read ahead while one is served; past that, reading pauses."""
INF = float("inf")


@mypyc_attr(allow_interpreted_subclasses=True)
class ConnectionCore:
    __slots__ = (
        "auth_failure",
        "body",
        "buf",
        "client_blocked",
        "client_eof",
        "client_reset",
        "close_after",
        "deadline",
        "env",
        "expect_continue",
        "first",
        "framing",
        "head",
        "heads",
        "held",
        "held_answer",
        "kind",
        "leases",
        "limits",
        "linger_bytes",
        "peer",
        "peer_ip",
        "pending",
        "phase_deadline",
        "reading_paused",
        "refused_new",
        "request_done",
        "response_started",
        "retried",
        "rewritten_length",
        "send_deadline",
        "sent",
        "state",
        "stream",
        "t",
        "tenants",
        "trusted",
        "tunnel",
        "up",
        "upload_deadline",
        "uploading",
        "upstream_done",
        "x",
    )

    def __init__(
        self,
        env: Env,
        transport: Transport,
        peer: tuple[str, int],
        *,
        proxy_header: bool = False,
        trusted: bool = False,
    ) -> None:
        self.env = env
        self.t = transport
        self.peer = peer
        """The client's address (from the PROXY header where one was sent)."""
        self.peer_ip = peer[0].encode("ascii")
        """Its IP as X-Forwarded-For carries it."""
        self.limits = env.config.limits
        self.state = PROXY if proxy_header else IDLE
        self.trusted = trusted
        """The client may (and must) open with a PROXY header."""
        self.deadline = self.phase_deadline = env.now() + (
            # An untrusted source never sends a PROXY header: its first bytes start a head.
            env.config.proxy_protocol.timeout
            if proxy_header and trusted
            else self.limits.header_timeout
        )
        """``deadline`` is the earliest of: the state's own (``phase_deadline``), the
        upload's silence limit while ``uploading``, the send limit while the client's
        buffer is full. The I/O nucleus calls ``timer`` once it has passed."""
        self.upload_deadline = INF
        self.send_deadline = INF
        self.buf = b""
        """Client bytes received and not yet consumed."""
        self.heads = HeadReader(self.limits.max_header_bytes)
        self.first = True
        """No request has been served on this connection yet."""
        self.kind = "http"
        """What the connection counts as in the active-connections gauge."""
        self.linger_bytes = 0
        self.client_eof = False
        self.client_reset = False
        """The client's connection broke: nothing more reaches it."""
        self.reading_paused = False
        """Reading the client is paused because too much of it is buffered."""
        self.client_blocked = False
        """The client's write buffer is full (its send timeout runs)."""
        self.leases: list[object] | None = None
        """Connection-cap leases held (given back when the connection ends)."""
        self.tenants: set[str] | None = None
        """Tenants whose caps this connection counts against already."""
        self.auth_failure: AuthFailure | None = None
        self.pending = 0
        """The admission step whose check is pending."""
        self.refused_new = False
        """Answered 503 on arrival (worker full, or shutting down)."""
        self.x: Exchange | None = None
        self.up: Upstream | None = None
        self.stream: StreamRelay | None = None
        self.tunnel: Tunnel | None = None
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        """The per-exchange state, before a request."""
        self.head: FastHead | None = None
        self.body: BodyReader | None = None
        self.held: list[bytes] = []
        """Body bytes collected before the backend was contacted."""
        self.rewritten_length: int | None = None
        """The length of a held body the proxy rewrote (hidden tools' stand-in names, the
        trace parent in ``_meta``): the backend's Content-Length. None: the client's."""
        self.uploading = False
        """The body goes on arriving (and up) while the exchange is past BODY."""
        self.upload_deadline = INF
        self.request_done = False
        self.expect_continue = False
        """The client waits for a 100 Continue before it sends the body."""
        self.sent: list[bytes] | None = None
        """What was sent upstream (head, body...), kept while a retry may resend it."""
        self.retried = False
        self.response_started = False
        """The response head was written to the client."""
        self.upstream_done = False
        """The backend's response was read to its end."""
        self.close_after = False
        """The client connection ends after this exchange (announced in the head)."""
        self.framing = AS_IS
        self.held_answer: HeldAnswer | None = None
        """An answer held until it is whole, to be rewritten before it goes out."""

    def _resume_reading(self) -> None:
        """What was read ahead is being taken: reading the client goes on."""
        if self.reading_paused:
            self.reading_paused = False
            self.t.pause_client(False)

    def _phase(self, when: float) -> None:
        """Set the current state's deadline."""
        self.phase_deadline = when
        if self.uploading or self.client_blocked:
            when = min(when, self.upload_deadline, self.send_deadline)
        self.deadline = when

    # What the other parts provide.

    def _read_head(self) -> None:
        raise NotImplementedError

    # -- the end of an exchange -----------------------------------------------------------

    def disposition(self) -> tuple[bool, bool]:
        """(reuse the backend connection, keep the client connection), once an exchange's
        response was relayed whole."""
        if self.state == TUNNEL or not self.request_done:
            return False, False
        up = self.up
        reuse = up is not None and self.upstream_done and up.reader.keep_alive
        return reuse, not self.close_after and not self.client_eof

    def _exchange_done(self) -> None:
        """The response was relayed whole: give the backend connection back, account,
        then serve the next request or close. A body still arriving (the backend
        answered before it had all of it) is not read on: both connections end."""
        self.uploading = False
        reuse, keep = self.disposition()
        up = self.up
        x = self.x
        assert x is not None
        if up is not None:
            self.up = None
            self.t.finish_upstream(up, reusable=reuse, ok=x.status < 500, failure=None)
        self.env.account(x, self.peer)
        self.x = None
        if keep:
            self._next_request()
        else:
            self._close()

    def _next_request(self) -> None:
        if self.kind != "http":
            self._leave_kind()
        self._reset_exchange()
        self.stream = None
        self.first = False
        self.state = IDLE
        env = self.env
        grace = DRAIN_IDLE_GRACE if env.draining else self.limits.keepalive_timeout
        self.deadline = self.phase_deadline = env.now() + grace
        self._resume_reading()
        if self.buf:
            self._read_head()

    def _refuse(
        self,
        status: int,
        reason: str,
        headers: answers.Headers = (),
        *,
        log_only: bool = False,
        rpc: McpRefusal | None = None,
    ) -> None:
        """Answer the request ourselves and close (lingering, so the client reads the
        answer). ``log_only``: no request head was parsed."""
        self._drop_upstream()
        x = self.x
        if x is None:
            x = Exchange(b"", b"", time.perf_counter())
            log_only = True
        x.status = status
        x.error = reason
        x.refused = True
        if not self.response_started and not self.client_eof:
            retry = self.env.config.server.retry_after_seconds
            if rpc is None and not log_only and x.route is not None and x.route.kind == "mcp":
                # On an MCP route every answer is JSON-RPC, the proxy's own included.
                decision = x.mcp
                rpc = McpRefusal(
                    status,
                    INTERNAL_ERROR if status >= 500 else INVALID_REQUEST,
                    reason,
                    decision.request_id if decision is not None else None,
                    headers,
                )
            if rpc is not None:
                data = answers.json_answer(status, rpc.body(), rpc.headers, retry_after=retry)
            else:
                data = answers.text_error(status, reason, headers, retry_after=retry)
            self.t.send_client(data)
        self.env.account(x, self.peer, refused_early=log_only)
        self.x = None
        self._close()

    def refuse_new(self, shutting_down: bool) -> None:
        """A connection the worker takes no work on: answered 503 (with Retry-After and
        Connection: close) at once, so the client learns why and when to come back."""
        self.refused_new = True
        reason = (
            "shutting down" if shutting_down else "this worker is at max_connections_per_worker"
        )
        self.state = IDLE
        self._refuse(503, reason, log_only=True)

    def abandon(self) -> None:
        """The worker is going away now (the drain deadline passed): whatever is in
        progress is recorded as cut short."""
        x = self.x
        if x is not None:
            self._drop_upstream()
            if self.response_started:
                x.error = x.error or "closed at the drain deadline"
            else:
                x.fail(503, "closed at the drain deadline")
            self.env.account(x, self.peer)
            self.x = None
        self._closed()

    def _refuse_rpc(self, refusal: McpRefusal) -> None:
        self._refuse(refusal.status, refusal.message, rpc=refusal)

    def _abort(self, status: int, reason: str) -> None:
        """End an exchange whose answer was begun but cannot be completed: the client's
        connection is cut, so that a truncated answer never looks complete."""
        self._drop_upstream(ok=False, failure="timeout" if status == 504 else "error")
        x = self.x
        if x is not None:
            x.fail(status, reason)
            self.env.account(x, self.peer)
            self.x = None
        self._closed()

    def _client_gone(self, reason: str, status: int = 499) -> None:
        """The client left (or stopped reading): the exchange ends here, and the backend
        connection with it. Before an answer began it is recorded with ``status``
        (499: the client closed the request); after, the answer's status stands, with
        the reason it was not delivered whole."""
        self._drop_upstream()
        x = self.x
        if x is not None:
            if self.response_started:
                x.error = x.error or reason
            else:
                x.fail(status, reason)
            self.env.account(x, self.peer)
            self.x = None
        self._closed()

    def _drop_upstream(self, *, ok: bool | None = None, failure: str | None = None) -> None:
        up = self.up
        if up is not None:
            self.up = None
            self.t.finish_upstream(up, reusable=False, ok=ok, failure=failure)

    def _close(self) -> None:
        """End the connection from our side: at once if the client has closed, else
        half-close and linger, so that unread request bytes do not turn into a reset
        that destroys the answer in the client's buffer."""
        self._leave_kind()
        if self.client_eof:
            self._closed()
            return
        self.t.shutdown_client()
        self.state = LINGER
        self.linger_bytes = len(self.buf)
        self.buf = b""
        self.uploading = False
        self._phase(self.env.now() + LINGER_SECONDS)

    def _closed(self) -> None:
        if self.state == CLOSED:
            return
        self._leave_kind()
        self.state = CLOSED
        self.deadline = self.phase_deadline = INF
        self.t.close_client()
        if self.leases:
            self.t.release_leases(self.leases)
            self.leases = None

    def _enter_kind(self, kind: str) -> None:
        self.env.count_kind(self.kind, kind)
        self.kind = kind

    def _leave_kind(self) -> None:
        if self.kind != "http":
            self.env.count_kind(self.kind, "http")
            self.kind = "http"
