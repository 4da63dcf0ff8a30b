"""What the connection machine (``proxy.protocol.connection``) works with, and what it
asks of the rest of the worker. Sans-IO.

- ``Exchange``: one request and its answer, as the access log, the metrics and the
  audit trail see it. Only the machine writes it.
- ``Transport``: what the I/O nucleus does for the machine (write bytes, open and give
  back backend connections, run a check that needs Redis). The machine calls it; it never
  calls the machine back from inside such a call: what happens later (bytes, a close, a
  check's answer) comes back as an event.
- ``Upstream``: a backend connection as the machine sees it: its response reader and
  whether it was reused from the pool.
- ``Env``: the worker's shared, read-mostly state (config, routes, backends' health,
  keys, the clock) and the accounting sink.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

from proxy.auth import AuthFailure, Identity
from proxy.config import Config
from proxy.mcp_routing import McpDecision
from proxy.protocol.era_probe import RouteEras
from proxy.protocol.fast_response import ResponseReader
from proxy.protocol.http1 import ForwardingPolicy
from proxy.protocol.session_token import SessionTokens
from proxy.protocol.trace_context import Trace
from proxy.protocol.upstream_sessions import UpstreamSessions
from proxy.routing import Backend, Route, RouteTable


class AnswerRewrite(Protocol):
    """What the caller's answer must become before it goes out (per-caller tool lists,
    ``proxy.protocol.tool_lists``; era translation, ``proxy.protocol.era_translation``):
    the machine holds an answer it ``holds`` until whole, then sends ``rewrite`` of it
    with ``answer_status`` and ``answer_headers``."""

    def holds(self, status: int, *, event_stream: bool) -> bool: ...

    def stand_in(self) -> bytes | None: ...

    def rewrite(self, body: bytes, *, event_stream: bool) -> bytes | None: ...

    def answer_status(self, status: int) -> int: ...

    def answer_headers(self) -> tuple[tuple[bytes, bytes], ...]: ...

    def answer_content_type(self) -> bytes | None: ...


class Exchange:
    """A request/response pair: what is known of it when it is accounted for."""

    __slots__ = (
        "answer_rewrite",
        "backend",
        "bytes_in",
        "bytes_out",
        "error",
        "identity",
        "mcp",
        "method",
        "refused",
        "route",
        "started",
        "status",
        "streamed",
        "target",
        "trace",
    )

    def __init__(
        self, method: bytes, target: bytes, started: float, route: Route | None = None
    ) -> None:
        self.method = method
        self.target = target
        self.started = started
        """perf_counter() when the head was complete."""
        self.route = route
        self.backend: Backend | None = None
        """Where the request went (its URL and replica id are in the access line)."""
        self.status = 0
        self.error: str | None = None
        self.refused = False
        """The proxy answered itself (a limit, a bad request, no backend)."""
        self.bytes_in = 0
        self.bytes_out = 0
        self.streamed = False
        """An event stream or a tunnel: its duration is the stream's life, not latency."""
        self.mcp: McpDecision | None = None
        self.identity: Identity | None = None
        self.trace: Trace | None = None
        """The request's trace (``proxy.protocol.trace_context``), where it is traced."""
        self.answer_rewrite: AnswerRewrite | None = None
        """How the answer is rewritten for this caller before it goes out (held until
        whole): a filtered ``tools/list``, or the call of a hidden tool."""

    def fail(self, status: int, reason: str) -> None:
        """Record the first failure, and ``status`` with it: where no answer was sent
        yet, or where the backend cut the answer short (the client did not get what the
        status said). A client that leaves mid-answer keeps the answer's status."""
        if self.error is None:
            self.error = reason
            self.status = status


class Upstream(Protocol):
    """A backend connection lent to one exchange."""

    reader: ResponseReader
    reused: bool
    """It served an earlier exchange (it may have been closed by the backend since)."""
    connected: bool
    queued: bool
    """Waiting for a slot under ``max_connections_per_backend`` (not yet connecting)."""
    backend: Backend


class Transport(Protocol):
    def send_client(self, data: bytes) -> None: ...

    def shutdown_client(self) -> None:
        """No more bytes to the client (FIN); reading goes on."""

    def close_client(self) -> None: ...

    def pause_client(self, paused: bool) -> None:
        """Stop (or resume) reading the client: backpressure."""

    def open_upstream(self, backend: Backend, *, fresh: bool) -> Upstream:
        """A pooled connection to ``backend`` (unless ``fresh``) or a new one; bytes sent
        to it before it is connected are written once it is."""

    def send_upstream(self, up: Upstream, data: bytes) -> None: ...

    def shutdown_upstream(self, up: Upstream) -> None: ...

    def pause_upstream(self, up: Upstream, paused: bool) -> None: ...

    def finish_upstream(
        self, up: Upstream, *, reusable: bool, ok: bool | None, failure: str | None
    ) -> None:
        """Give the connection back: pooled if ``reusable``, else closed. ``ok`` is the
        exchange's verdict on the backend's health (None: no verdict); ``failure`` a
        reason to count (connect, timeout, error) or None."""

    def admit(self, check: Check) -> None:
        """Run a check that needs Redis; its answer comes as ``Connection.admitted``."""

    def release_leases(self, leases: Sequence[object]) -> None: ...

    def notify_upstream(
        self, backend: Backend, target: bytes, headers: tuple[tuple[bytes, bytes], ...], body: bytes
    ) -> None:
        """POST a notification to ``backend`` on a connection of its own, its answer not
        waited for (``proxy.net.session_opener``)."""


class Check:
    """An admission check the machine waits for (``Transport.admit``)."""

    __slots__ = ("arg", "kind")

    RATE: Final = 1
    """A rate-limit decision; ``arg`` is the request's ``Buckets``."""
    CAP: Final = 2
    """A lease on a connection cap; ``arg`` is ``(scope, limit)``."""
    SESSION: Final = 3
    """An upstream session opened for a translated request; ``arg`` is its
    ``proxy.protocol.upstream_sessions.SessionRequest``."""
    PROBE: Final = 4
    """The era of an ``auto`` route's backends; ``arg`` is its
    ``proxy.protocol.era_probe.ProbeRequest``."""

    def __init__(self, kind: int, arg: object) -> None:
        self.kind = kind
        self.arg = arg


class Env(Protocol):
    config: Config
    routes: RouteTable
    tokens: SessionTokens | None
    upstream_sessions: UpstreamSessions
    """The worker's upstream sessions (era translation to 2025-11-25 backends)."""
    route_eras: RouteEras
    """What the worker learnt of its ``auto`` routes' eras."""
    draining: bool
    via: bytes
    """The proxy's pseudonym in Via headers (forwarding.via)."""
    checking: bool
    """Some request may need an admission check (connection caps, rate limits, or auth
    by default): False lets requests on routes without auth skip admission."""
    trace_ratio: float
    """tracing.sample_ratio: 0 when tracing is off (nothing is looked at)."""

    def now(self) -> float:
        """Monotonic seconds, for deadlines."""

    def choose_backend(
        self, route: Route, replica: str | None = None, avoid: Backend | None = None
    ) -> Backend | None: ...

    def policy_for(self, route: Route | None) -> ForwardingPolicy: ...

    def auth_required(self, route: Route) -> bool: ...

    def authenticate(
        self, headers: Sequence[tuple[bytes, bytes]], route: Route
    ) -> Identity | AuthFailure: ...

    def auth_header(self) -> bytes:
        """The header credentials come in (stripped before the request goes on)."""

    def rate_check(self, peer_ip: str, identity: Identity | None, tool: str | None) -> Check | None:
        """The rate-limit check a request needs, or None when nothing limits it."""

    def cap_check(self, scope: str, identity: Identity | None) -> Check | None:
        """The connection-cap lease a connection must hold (``scope``: ip or tenant),
        or None when no cap applies."""

    def account(self, x: Exchange, peer: tuple[str, int], *, refused_early: bool = False) -> None:
        """Count, log and audit a finished exchange (``refused_early``: refused before
        any request head was parsed)."""

    def count_kind(self, old: str, new: str) -> None:
        """A connection moved between kinds (http, sse, websocket) for the gauge."""

    def proxy_header_refused(self, peer: tuple[str, int], reason: str) -> None:
        """Count and log a connection closed for its PROXY header."""

    def tool_denied(self) -> None:
        """Count a tools/call refused by the caller's allow-list."""
