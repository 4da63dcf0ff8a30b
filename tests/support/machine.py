"""An in-memory world for the connection machine (``proxy.protocol.connection``): a fake
transport that records what the machine asks for, fake backend connections, and an
environment with a hand-driven clock. No sockets, no event loop.

Every machine made here notes each event it is given as (state before, event, state
after), so that ``tests/protocol/test_connection_states.py`` can check that the tests
enter and leave every state. ``client_answers`` and ``backend_requests`` read what the
machine wrote with h11, the reference parser, so that a test can compare what a client
or a backend would make of it rather than exact bytes (which differ, legitimately, when
the input came in pieces: a chunked body is re-chunked as it arrives).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11

from proxy.auth import AuthFailure, Identity, authenticate, check_access
from proxy.config import Config, from_mapping
from proxy.conncaps import CapDecision, Lease
from proxy.protocol.connection import STATE_NAMES, Connection
from proxy.protocol.exchange import Check, Exchange
from proxy.protocol.fast_response import ResponseReader
from proxy.protocol.http1 import ForwardingPolicy
from proxy.protocol.session_token import Keyring, SessionTokens
from proxy.routing import Backend, Route, RouteTable

SESSION_KEY = b"k" * 32


class FakeUpstream:
    def __init__(self, backend: Backend, *, reused: bool, connected: bool) -> None:
        self.backend = backend
        self.reader = ResponseReader()
        self.reused = reused
        self.connected = connected
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
        """New connections are connected at once (else ``upstream_connected`` says)."""
        self.checks: list[Check] = []
        self.released: list[object] = []

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


class FakeEnv:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.routes = RouteTable.from_config(config.routes, config.upstream)
        self.tokens = SessionTokens(Keyring({"k1": SESSION_KEY}, "k1"))
        self.draining = False
        self.checking = True
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


JWT_AUTH = {"jwt_algorithms": ["HS256"], "jwt_secret": "s" * 32}
"""Auth configured so that routes may require it (FakeEnv.identities does the checking)."""
ROUTES: tuple[dict[str, Any], ...] = (
    {"prefix": "/", "backends": ["http://10.0.0.1:80", "http://10.0.0.2:80"]},
    {"prefix": "/one", "backends": ["http://10.0.9.1:80"]},
    {"prefix": "/slow", "backends": ["http://10.0.2.1:80"], "response_timeout": 7},
    {"prefix": "/mcp", "kind": "mcp", "backends": ["http://10.0.1.1:80", "http://10.0.1.2:80"]},
    {
        "prefix": "/private",
        "auth": "required",
        "tenants": ["acme"],
        "backends": ["http://10.0.3.1:80"],
    },
    {"prefix": "/tools", "kind": "mcp", "auth": "required", "backends": ["http://10.0.4.1:80"]},
)
"""``/`` and ``/mcp`` have two replicas each; ``/one`` has one; ``/slow`` has its own
response_timeout (7 s); ``/private`` and ``/tools`` need credentials."""


def routes_config(**sections: Mapping[str, Any]) -> Config:
    """``ROUTES`` with ``sections`` (limits, upstream...) on top of the defaults."""
    return make_config(ROUTES, **{"auth": JWT_AUTH, **sections})


def mcp_post(body: bytes, *headers: bytes, target: bytes = b"/mcp") -> bytes:
    """A POST the way MCP SDK clients send one (Content-Length, both media types)."""
    extra = b"".join(header + b"\r\n" for header in headers)
    return (
        b"POST %s HTTP/1.1\r\nHost: proxy.example\r\nContent-Type: application/json\r\n"
        b"Accept: application/json, text/event-stream\r\n%sContent-Length: %d\r\n\r\n%s"
        % (target, extra, len(body), body)
    )


def call_2026(request_id: int = 7, tool: bytes = b"echo", *headers: bytes) -> bytes:
    """A 2026-07-28 tools/call: stateless, closing its stream cancels it."""
    body = (
        b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"%s","arguments":{},'
        b'"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}' % (request_id, tool)
    )
    return mcp_post(
        body,
        b"MCP-Protocol-Version: 2026-07-28",
        b"Mcp-Method: tools/call",
        b"Mcp-Name: " + tool,
        *headers,
    )


def call_2025(token: str, request_id: int = 7, tool: bytes = b"echo") -> bytes:
    """A 2025-11-25 tools/call in the session ``token`` (leaving is no cancellation)."""
    body = b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"%s"}}' % (
        request_id,
        tool,
    )
    return mcp_post(body, b"MCP-Protocol-Version: 2025-11-25", b"Mcp-Session-Id: " + token.encode())


INITIALIZE = mcp_post(
    b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25",'
    b'"capabilities":{},"clientInfo":{"name":"t","version":"1"}}}'
)
"""A 2025-11-25 initialize: no session yet, the backend's session id becomes a token."""


def ok(body: bytes = b"hello", *headers: bytes, status: bytes = b"200 OK") -> bytes:
    """A backend's response with a Content-Length body."""
    extra = b"".join(header + b"\r\n" for header in headers)
    return b"HTTP/1.1 %s\r\n%bContent-Length: %d\r\n\r\n%s" % (status, extra, len(body), body)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def dechunk(data: bytes) -> bytes:
    """The data of a chunked body's chunks (that it is well framed is checked)."""
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        out += data[:size]
        assert data[size : size + 2] == b"\r\n", "chunk not ended by CRLF"
        data = data[size + 2 :]
        if not size:
            assert not data, f"bytes after the last chunk: {data!r}"
    return out


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
"""A backend's event stream head (its events follow as chunks)."""


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


@dataclass
class Answer:
    """A response as a client reads it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False
    """The body ended as its framing says (a cut connection leaves it False)."""
    informational: list[int] = field(default_factory=list)
    """1xx statuses before it."""

    def header(self, name: bytes) -> bytes | None:
        values = [value for key, value in self.headers if key == name]
        return b", ".join(values) if values else None


def client_answers(
    data: bytes, methods: Sequence[bytes] = (b"GET",), *, eof: bool = False
) -> list[Answer]:
    """The responses in ``data`` (what the machine wrote to the client), read by an h11
    client that sent requests of ``methods`` in turn; ``eof``: the connection ended
    after ``data``. Reading stops at the first response that is not complete; bytes
    after the last expected response fail the test."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    out: list[Answer] = []
    for method in methods:
        if out:
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                break
            conn.start_next_cycle()
        conn.send(h11.Request(method=method, target="/", headers=[(b"host", b"example")]))
        conn.send(h11.EndOfMessage())
        answer: Answer | None = None
        informational: list[int] = []
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                break  # cut short: the answer stays incomplete
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
            elif isinstance(event, h11.Response):
                answer = Answer(event.status_code, list(event.headers), b"", False, informational)
            elif isinstance(event, h11.Data):
                assert answer is not None
                answer.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert answer is not None
                answer.complete = True
                break
            else:
                break
        if answer is None:
            break
        out.append(answer)
        if not answer.complete:
            break
    if len(out) == len(methods) and out[-1].complete:
        left = conn.trailing_data[0]
        assert not left, f"bytes after the last answer: {left!r}"
    return out


def client_answer(data: bytes, method: bytes = b"GET", *, eof: bool = False) -> Answer:
    """The one response in ``data``."""
    answers = client_answers(data, (method,), eof=eof)
    assert len(answers) == 1, f"no response in {data!r}"
    return answers[0]


@dataclass
class Sent:
    """A request as a backend reads it."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False

    def header(self, name: bytes) -> bytes | None:
        values = [value for key, value in self.headers if key == name]
        return b", ".join(values) if values else None


def backend_requests(data: bytes | bytearray) -> list[Sent]:
    """The requests in ``data`` (what the machine wrote to a backend), read by h11."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(bytes(data))
    out: list[Sent] = []
    while True:
        if out and out[-1].complete:
            if conn.their_state is not h11.DONE:
                break
            # The backend's half of the cycle: a response, so h11 reads the next request.
            conn.send(h11.Response(status_code=204, headers=[]))
            conn.send(h11.EndOfMessage())
            conn.start_next_cycle()
        event = conn.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            break
        if isinstance(event, h11.Request):
            out.append(Sent(event.method, event.target, list(event.headers)))
        elif isinstance(event, h11.Data):
            out[-1].body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out[-1].complete = True
        else:
            break
    return out


def backend_request(data: bytes | bytearray) -> Sent:
    """The one request in ``data``."""
    requests = backend_requests(data)
    assert len(requests) == 1, f"not one request in {bytes(data)!r}"
    return requests[0]


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

    def feed(self, data: bytes, *, byte_at_a_time: bool = False) -> None:
        if byte_at_a_time:
            for i in range(len(data)):
                self.c.client_data(data[i : i + 1])
        else:
            self.c.client_data(data)

    def answer(self, data: bytes, *, byte_at_a_time: bool = False) -> None:
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
