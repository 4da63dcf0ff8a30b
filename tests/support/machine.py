"""An in-memory world for the connection machine (``proxy.protocol.connection``): a fake
transport that records what the machine asks for, fake backend connections, and an
environment with a hand-driven clock. No sockets, no event loop.

Every machine made here notes each event it is given as (state before, event, state
after), so that ``tests/protocol/test_connection_states.py`` can check that the tests
enter and leave every state. ``tests.support.wire`` reads what the machine wrote, and
``tests.support.machine_traffic`` has the requests and answers tests send through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

from proxy.auth import AuthFailure, Identity, authenticate, check_access
from proxy.config import Config, from_mapping
from proxy.conncaps import CapDecision, Lease
from proxy.protocol.connection import STATE_NAMES, Connection
from proxy.protocol.era_probe import RouteEras
from proxy.protocol.exchange import Check, Exchange
from proxy.protocol.fast_response import ResponseReader
from proxy.protocol.http1 import ForwardingPolicy
from proxy.protocol.session_token import Keyring, SessionTokens
from proxy.protocol.upstream_sessions import UpstreamSessions
from proxy.routing import Backend, Route, RouteTable

SESSION_KEY = b"k" * 32


class FakeUpstream:
    def __init__(self, backend: Backend, *, reused: bool, connected: bool) -> None:
        self.backend = backend
        self.reader = ResponseReader()
        self.reused = reused
        self.connected = connected
        self.queued = False
        self.sent = bytearray()
        self.shut = False
        self.paused = False
        self.pauses: list[bool] = []
        """Every pause (True) and resume (False) asked, in order."""
        self.finished: dict[str, Any] | None = None
        """How the machine gave it back (reusable, ok, failure)."""


class FakeTransport:
    def __init__(self) -> None:
        self.client_out = bytearray()
        self.client_shut = False
        self.client_closed = False
        self.client_paused = False
        self.client_pauses: list[bool] = []
        """Every pause (True) and resume (False) of client reads asked, in order."""
        self.upstreams: list[FakeUpstream] = []
        self.pooled: list[FakeUpstream] = []
        """Idle connections ``open_upstream`` hands out before making new ones."""
        self.connect_now = True
        self.queue_next = False
        """New backend connections wait for a slot (max_connections_per_backend)."""
        """New connections are connected at once (else ``upstream_connected`` says)."""
        self.checks: list[Check] = []
        self.released: list[object] = []
        self.notified: list[tuple[Backend, bytes, tuple[tuple[bytes, bytes], ...], bytes]] = []
        """Notifications POSTed to backends (``notify_upstream``)."""

    @property
    def up(self) -> FakeUpstream:
        return self.upstreams[-1]

    def take_client(self) -> bytes:
        data = bytes(self.client_out)
        self.client_out.clear()
        return data

    def repool(self, up: FakeUpstream) -> None:
        """Pool a connection the machine gave back as reusable, as the worker would: the
        next ``open_upstream`` to its backend gets it, marked as reused."""
        assert up.finished is not None and up.finished["reusable"]
        up.finished = None
        up.reused = True
        up.sent.clear()
        self.pooled.append(up)

    def send_client(self, data: bytes) -> None:
        assert not self.client_shut and not self.client_closed, "write after close"
        self.client_out += data

    def shutdown_client(self) -> None:
        self.client_shut = True

    def close_client(self) -> None:
        self.client_closed = True

    def pause_client(self, paused: bool) -> None:
        self.client_paused = paused
        self.client_pauses.append(paused)

    def open_upstream(self, backend: Backend, *, fresh: bool) -> FakeUpstream:
        if self.pooled and not fresh and self.pooled[-1].backend == backend:
            up = self.pooled.pop()
        else:
            up = FakeUpstream(backend, reused=False, connected=self.connect_now)
            up.queued = self.queue_next
        self.upstreams.append(up)
        return up

    def send_upstream(self, up: FakeUpstream, data: bytes) -> None:
        assert up.finished is None, "write to a connection given back"
        up.sent += data

    def shutdown_upstream(self, up: FakeUpstream) -> None:
        up.shut = True

    def pause_upstream(self, up: FakeUpstream, paused: bool) -> None:
        up.paused = paused
        up.pauses.append(paused)

    def finish_upstream(
        self, up: FakeUpstream, *, reusable: bool, ok: bool | None, failure: str | None
    ) -> None:
        assert up.finished is None, "given back twice"
        up.finished = {"reusable": reusable, "ok": ok, "failure": failure}

    def admit(self, check: Check) -> None:
        self.checks.append(check)

    def release_leases(self, leases: Sequence[object]) -> None:
        self.released.extend(leases)

    def notify_upstream(
        self, backend: Backend, target: bytes, headers: tuple[tuple[bytes, bytes], ...], body: bytes
    ) -> None:
        self.notified.append((backend, target, headers, body))


class FakeEnv:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.routes = RouteTable.from_config(config.routes, config.upstream)
        self.tokens = SessionTokens(Keyring({"k1": SESSION_KEY}, "k1"))
        self.upstream_sessions = UpstreamSessions()
        self.route_eras = RouteEras()
        self.draining = False
        self.checking = True
        self.trace_ratio = config.tracing.sample_ratio
        self.traced: list[Exchange] = []
        self.via = b"switchboard"
        self.clock = 1000.0
        self.accounted: list[tuple[Exchange, bool]] = []
        self.kinds: dict[str, int] = {"http": 0, "sse": 0, "websocket": 0}
        self.unusable: set[Backend] = set()
        self.identities: dict[bytes, Identity] = {}
        """Bearer token -> identity, for routes with auth."""
        self.rate_limited = False
        self.ip_cap = 0
        self.tenant_cap = 0
        self.proxy_refusals: list[str] = []
        self.denied_tools = 0

    def now(self) -> float:
        return self.clock

    def choose_backend(
        self, route: Route, replica: str | None = None, avoid: Backend | None = None
    ) -> Backend | None:
        if replica is not None:
            backend = route.replicas.get(replica)
            return None if backend is None or backend in self.unusable else backend
        for _ in route.backends:
            backend = route.choose_backend()
            if backend not in self.unusable and backend != avoid:
                return backend
        return None

    def policy_for(self, route: Route | None) -> ForwardingPolicy:
        mode = route.host_mode if route is not None and route.host_mode else "preserve"
        return ForwardingPolicy(host_mode=mode, xff_mode="append", via=b"switchboard")

    def auth_required(self, route: Route) -> bool:
        return route.auth == "required"

    def authenticate(
        self, headers: Sequence[tuple[bytes, bytes]], route: Route
    ) -> Identity | AuthFailure:
        for name, value in headers:
            if name == b"authorization" and value.removeprefix(b"Bearer ") in self.identities:
                identity = self.identities[value.removeprefix(b"Bearer ")]
                return check_access(identity, route.tenants) or identity
        from proxy.auth import KeyTable

        return authenticate(list(headers), KeyTable(), None, now=0.0)

    def auth_header(self) -> bytes:
        return b"authorization"

    def rate_check(self, peer_ip: str, identity: Identity | None, tool: str | None) -> Check | None:
        if not self.rate_limited:
            return None
        return Check(Check.RATE, (peer_ip, identity, tool))

    def cap_check(self, scope: str, identity: Identity | None) -> Check | None:
        limit = self.tenant_cap if scope.startswith("tenant:") else self.ip_cap
        return Check(Check.CAP, (scope, limit)) if limit else None

    def account(self, x: Exchange, peer: tuple[str, int], *, refused_early: bool = False) -> None:
        self.accounted.append((x, refused_early))
        if x.trace is not None:
            self.traced.append(x)

    def count_kind(self, old: str, new: str) -> None:
        self.kinds[old] -= 1
        self.kinds[new] += 1

    def proxy_header_refused(self, peer: tuple[str, int], reason: str) -> None:
        self.proxy_refusals.append(reason)

    def tool_denied(self) -> None:
        self.denied_tools += 1


def make_config(
    routes: Sequence[Mapping[str, Any]] = ({"prefix": "/", "backends": ["http://10.0.0.1:80"]},),
    **sections: Mapping[str, Any],
) -> Config:
    data: dict[str, Any] = {"routes": list(routes), **sections}
    return from_mapping(data, "test")


Transition = tuple[str, str, str]
"""(state before, event, state after), states by name."""
_observers: list[set[Transition]] = []


@contextmanager
def observing() -> Iterator[set[Transition]]:
    """Collect the transitions of every machine made here while the block runs."""
    seen: set[Transition] = set()
    _observers.append(seen)
    try:
        yield seen
    finally:
        _observers.remove(seen)


class RecordingConnection(Connection):
    """The machine, noting each event it is given from outside as (state before, event,
    state after) in ``transitions`` and in every ``observing`` set. Only the outermost
    call counts: the machine may call its own event methods (a backend's close is fed to
    the response reader as the body's end), which is no event from outside."""

    def __init__(
        self,
        env: Any,
        transport: Any,
        peer: tuple[str, int],
        *,
        proxy_header: bool = False,
        trusted: bool = False,
    ) -> None:
        self.transitions: list[Transition] = []
        self._depth = 0
        super().__init__(env, transport, peer, proxy_header=proxy_header, trusted=trusted)
        self._note("-", "open")

    def _note(self, before: str, event: str) -> None:
        transition = (before, event, STATE_NAMES[self.state])
        self.transitions.append(transition)
        for seen in _observers:
            seen.add(transition)

    def _run(self, event: str, call: Callable[[], None]) -> None:
        if self._depth:
            call()
            return
        before = STATE_NAMES[self.state]
        self._depth = 1
        try:
            call()
        finally:
            self._depth = 0
        self._note(before, event)

    def client_data(self, data: bytes) -> None:
        self._run("client_data", partial(Connection.client_data, self, data))

    def client_closed(self, *, reset: bool = False) -> None:
        name = "client_closed(reset)" if reset else "client_closed"
        self._run(name, partial(Connection.client_closed, self, reset=reset))

    def upstream_connected(self) -> None:
        self._run("upstream_connected", partial(Connection.upstream_connected, self))

    def upstream_data(self, data: bytes) -> None:
        self._run("upstream_data", partial(Connection.upstream_data, self, data))

    def upstream_closed(self, *, reset: bool = False, before_write: bool = False) -> None:
        name = "upstream_closed"
        if reset:
            name += "(reset)"
        if before_write:
            name += "(before_write)"
        call = partial(Connection.upstream_closed, self, reset=reset, before_write=before_write)
        self._run(name, call)

    def client_backlog(self, blocked: bool) -> None:
        self._run(f"client_backlog({blocked})", partial(Connection.client_backlog, self, blocked))

    def upstream_backlog(self, blocked: bool) -> None:
        call = partial(Connection.upstream_backlog, self, blocked)
        self._run(f"upstream_backlog({blocked})", call)

    def timer(self) -> None:
        self._run("timer", partial(Connection.timer, self))

    def drain(self) -> None:
        self._run("drain", partial(Connection.drain, self))

    def admitted(self, result: object) -> None:
        self._run("admitted", partial(Connection.admitted, self, result))

    def refuse_new(self, shutting_down: bool) -> None:
        self._run("refuse_new", partial(Connection.refuse_new, self, shutting_down))

    def abandon(self) -> None:
        self._run("abandon", partial(Connection.abandon, self))


class World:
    """A machine with its fakes."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        peer: tuple[str, int] = ("192.0.2.7", 40000),
        proxy_header: bool = False,
        trusted: bool = False,
    ) -> None:
        self.env = FakeEnv(config or make_config())
        self.t = FakeTransport()
        self.c = RecordingConnection(
            self.env,
            self.t,
            peer,
            proxy_header=proxy_header,
            trusted=trusted,
        )

    byte_at_a_time = False
    """How ``feed`` and ``answer`` deliver bytes unless told: set for a whole test run
    (tests/protocol/conftest.py runs each machine test both ways)."""

    def feed(self, data: bytes, *, byte_at_a_time: bool | None = None) -> None:
        """Bytes from the client: in one event, or one event per byte."""
        if byte_at_a_time is None:
            byte_at_a_time = World.byte_at_a_time
        if byte_at_a_time:
            for i in range(len(data)):
                self.c.client_data(data[i : i + 1])
        else:
            self.c.client_data(data)

    def answer(self, data: bytes, *, byte_at_a_time: bool | None = None) -> None:
        """Bytes from the backend: in one event, or one event per byte."""
        if byte_at_a_time is None:
            byte_at_a_time = World.byte_at_a_time
        if byte_at_a_time:
            for i in range(len(data)):
                self.c.upstream_data(data[i : i + 1])
        else:
            self.c.upstream_data(data)

    def advance(self, seconds: float) -> None:
        """Move the clock on and call ``timer`` as the worker's timekeeper does: again and
        again while the deadline has passed. A machine whose ``timer`` leaves its
        deadline in the past, unchanged, would be called for ever (the worker with it),
        which fails the test."""
        self.env.clock += seconds
        while self.env.clock >= self.c.deadline:
            before = (self.c.state, self.c.deadline)
            self.c.timer()
            if (self.c.state, self.c.deadline) == before:
                raise AssertionError(
                    f"timer() in {self.state} left the deadline {self.c.deadline} in the "
                    f"past (now {self.env.clock}): it would be called for ever"
                )

    @property
    def accounted(self) -> list[Exchange]:
        return [x for x, _ in self.env.accounted]

    @property
    def state(self) -> str:
        return STATE_NAMES[self.c.state]


def lease(scope: str) -> Lease:
    return Lease(scope, 10, "redis", 1)


def cap_refusal(scope: str) -> CapDecision:
    return CapDecision(False, scope, 1, 2, "redis")
