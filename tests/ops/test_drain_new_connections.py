"""SIGTERM while new connections keep arriving: each is answered 503 or refused, never cut.

An operator stops the proxy (SIGTERM to the supervisor, two workers) while clients keep
opening new connections. Requests the backend holds keep the drain going, so the workers
spend a while draining with their listening sockets open. Every new connection made from
the moment both workers have begun their drain until the supervisor has exited must end
one of two ways:

- its connect is refused (ECONNREFUSED: nothing listens on the port any more), or
- it gets a complete ``503 Service Unavailable`` carrying ``Retry-After`` (the configured
  ``retry_after_seconds``) and ``Connection: close``: a draining worker's answer.

Anything else is a **failure**: a reset or an EOF without a complete response after the
connect succeeded, no complete response within ``REQUEST_TIMEOUT`` of the connect, a
connect neither accepted nor refused within ``CONNECT_TIMEOUT``, another status, or a 503
without those headers. ``CLIENTS`` clients run concurrently, each opening a connection
and sending a complete GET as soon as its previous attempt ended, until the supervisor
has exited. The held requests are released once the clients have had
``ANSWERS_BEFORE_RELEASE`` 503s (or a failure), so the drain window is exercised however
slow the machine, and the drain then ends with its work, long before ``drain_timeout``.

Both cases require zero failures, at least one 503, every held request answered whole
with ``Connection: close``, and the supervisor's exit with status 0:

- held on every worker: each worker has a request in flight at the SIGTERM, so both
  drain until the release;
- held on one worker: the other worker has nothing in flight and ends its drain at once,
  while the first one goes on draining (and new connections go on arriving).
"""

from __future__ import annotations

import contextlib
import errno
import signal
from dataclasses import dataclass, field
from pathlib import Path

import h11
import psutil
import pytest
import trio

from tests.support.backends import (
    HttpClient,
    HttpResponse,
    backend_route,
    pattern_sha256,
    poll_until,
    proxy_running,
)
from tests.support.proxy_process import ProxyProcess
from tests.support.sse_client import EventBackend

WORKERS = 2
CLIENTS = 16
CONNECT_TIMEOUT = 30.0
REQUEST_TIMEOUT = 10.0
"""A draining worker answers a new connection at once: an attempt whose connect succeeded
and that has no complete response this long after is a failure."""
RETRY_AFTER_SECONDS = 3
DRAIN_TIMEOUT = 300.0
"""Far beyond what the drain takes, so a drain that ended at its deadline rather than
with the held work would outlast EXIT_GUARD: the test fails then."""
EXIT_GUARD = 60.0
WINDOW_LIMIT = 60.0
"""How long the clients may take to collect ANSWERS_BEFORE_RELEASE 503s (a fraction of
a second on an idle machine); past it the held requests are released anyway, and the
assertions tell what the attempts got."""
ANSWERS_BEFORE_RELEASE = 200
HELD_SIZE = 50_000
MAX_HELD = 64
REFUSED = "refused"
UNAVAILABLE = "503"
_CLOSED = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(eq=False)
class Attempts:
    """What the new connections made during the drain got."""

    sigterm_at: float
    refused: int = 0
    unavailable: int = 0
    """Complete 503 answers with Retry-After and Connection: close."""
    failures: list[str] = field(default_factory=list)
    """Each with when its attempt began and ended, in seconds after the SIGTERM."""

    @property
    def total(self) -> int:
        return self.refused + self.unavailable + len(self.failures)

    def record(self, outcome: str, began: float) -> None:
        if outcome == REFUSED:
            self.refused += 1
        elif outcome == UNAVAILABLE:
            self.unavailable += 1
        else:
            since = began - self.sigterm_at
            until = trio.current_time() - self.sigterm_at
            self.failures.append(f"{outcome} (attempt from {since:.3f} s to {until:.3f} s)")


async def new_connection(port: int) -> str:
    """One new connection and a complete GET on it: ``REFUSED``, ``UNAVAILABLE`` or what
    went wrong."""
    sock = trio.socket.socket()
    try:
        not_connected = await _connect(sock, port)
        if not_connected is not None:
            return not_connected
        stream = trio.SocketStream(sock)
        conn = h11.Connection(h11.CLIENT)
        request = conn.send(h11.Request(method="GET", target="/new", headers=[(b"host", b"x")]))
        with contextlib.suppress(*_CLOSED):
            # Failing, the answer may still be there to read: it can come, and the
            # worker close the socket, before the request is written.
            await stream.send_all((request or b"") + (conn.send(h11.EndOfMessage()) or b""))
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                return await _answer(stream, conn)
            except (*_CLOSED, h11.ProtocolError) as exc:
                return f"connected, then {exc!r}"
        return f"connected, then no complete response within {REQUEST_TIMEOUT} s"
    finally:
        sock.close()


async def _connect(sock: trio.socket.SocketType, port: int) -> str | None:
    """None once connected, else ``REFUSED`` or what went wrong."""
    with trio.move_on_after(CONNECT_TIMEOUT):
        try:
            await sock.connect(("127.0.0.1", port))
        except OSError as exc:
            return REFUSED if exc.errno == errno.ECONNREFUSED else f"connect: {exc!r}"
        return None
    return f"connect neither accepted nor refused within {CONNECT_TIMEOUT} s"


async def _answer(stream: trio.SocketStream, conn: h11.Connection) -> str:
    """``UNAVAILABLE`` for a complete 503 with the expected headers, else what came."""
    response: h11.Response | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif type(event) is h11.Response:
            response = event
        elif type(event) is h11.EndOfMessage:
            break
        elif type(event) is h11.ConnectionClosed:
            return "connected, then EOF without a complete response"
        elif type(event) is not h11.Data:
            return f"connected, then {event!r}"
    assert response is not None
    headers = dict(response.headers)
    expected = {b"retry-after": str(RETRY_AFTER_SECONDS).encode(), b"connection": b"close"}
    got = {name: headers.get(name) for name in expected}
    if response.status_code != 503 or got != expected:
        return f"status {response.status_code}, {got}"
    return UNAVAILABLE


async def keep_connecting(port: int, attempts: Attempts, stop: trio.Event) -> None:
    """New connections one after the other until ``stop``."""
    while not stop.is_set():
        began = trio.current_time()
        attempts.record(await new_connection(port), began)


@pytest.fixture
async def event_backend(nursery: trio.Nursery) -> EventBackend:
    server = EventBackend()
    await nursery.start(server.serve)
    return server


def _holding(proxy: ProxyProcess, backend_port: int) -> set[int]:
    """The workers with a connection open to the backend: a held request in flight."""
    return {
        pid
        for pid in proxy.worker_pids()
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == backend_port
    }


async def _held_request(port: int, seed: int, answers: list[HttpResponse | str]) -> None:
    try:
        client = await HttpClient.connect(port)
        try:
            target = f"/slow?delay=0&size={HELD_SIZE}&seed={seed}"
            answers.append(await client.request("GET", target))
        finally:
            await client.aclose()
    except (*_CLOSED, h11.ProtocolError, ConnectionError) as exc:
        answers.append(f"held request {seed}: {exc!r}")


async def _hold_requests(
    proxy: ProxyProcess,
    backend: EventBackend,
    nursery: trio.Nursery,
    workers: int,
    answers: list[HttpResponse | str],
) -> int:
    """Requests the backend holds, opened one at a time until ``workers`` workers each
    hold one (the kernel picks the worker of each connection); how many."""
    for seed in range(MAX_HELD):
        nursery.start_soon(_held_request, proxy.port, seed, answers)
        # Received by the backend: the worker's connection to it is open.
        await poll_until(lambda: backend.slow_received == seed + 1, limit=10)  # noqa: B023
        if len(_holding(proxy, backend.port)) == workers:
            return seed + 1
    raise AssertionError(f"{MAX_HELD} requests held, but not on {workers} workers")


def _draining(proxy: ProxyProcess) -> int:
    return sum(1 for line in list(proxy.lines) if line.get("event") == "worker_draining")


@pytest.mark.parametrize(
    "held_on_workers", [WORKERS, 1], ids=["held on every worker", "held on one worker"]
)
async def test_new_connections_during_a_sigterm_drain_get_503_or_refused(
    tmp_path: Path, event_backend: EventBackend, held_on_workers: int
) -> None:
    sections = {
        "server": {"drain_timeout": DRAIN_TIMEOUT, "retry_after_seconds": RETRY_AFTER_SECONDS}
    }
    held: list[HttpResponse | str] = []
    gate = event_backend.slow_gate = trio.Event()
    async with proxy_running(
        tmp_path, [backend_route(event_backend.port)], workers=WORKERS, sections=sections
    ) as proxy:
        with trio.fail_after(WINDOW_LIMIT + EXIT_GUARD + 60):
            async with trio.open_nursery() as nursery:
                held_count = await _hold_requests(
                    proxy, event_backend, nursery, held_on_workers, held
                )
                proxy.process.send_signal(signal.SIGTERM)
                attempts = Attempts(sigterm_at=trio.current_time())
                # From here on, a worker takes no new work: a new connection gets a 503.
                await poll_until(lambda: _draining(proxy) >= WORKERS, limit=30)
                stop = trio.Event()
                async with trio.open_nursery() as clients:
                    for _ in range(CLIENTS):
                        clients.start_soon(keep_connecting, proxy.port, attempts, stop)
                    with contextlib.suppress(TimeoutError):
                        await poll_until(
                            lambda: (
                                attempts.unavailable >= ANSWERS_BEFORE_RELEASE
                                or bool(attempts.failures)
                            ),
                            limit=WINDOW_LIMIT,
                        )
                    gate.set()
                    code = await trio.to_thread.run_sync(proxy.process.wait, EXIT_GUARD)
                    stop.set()
            # (the nursery ends once every held request has its answer)
    print(
        f"held requests {held_count} on {held_on_workers} worker(s); new connections "
        f"during the drain {attempts.total}: 503 {attempts.unavailable}, refused "
        f"{attempts.refused}, failed {len(attempts.failures)}"
    )
    assert code == 0
    assert len(held) == held_count
    for answer in held:
        assert isinstance(answer, HttpResponse), answer
        assert answer.status == 200
        assert answer.header("connection") == ["close"], answer.headers
    assert sorted(a.sha256 for a in held if isinstance(a, HttpResponse)) == sorted(
        pattern_sha256(HELD_SIZE, seed=seed) for seed in range(held_count)
    )
    assert attempts.failures == [], (
        f"{len(attempts.failures)} failed, the first: {attempts.failures[:5]}"
    )
    assert attempts.unavailable >= 1


SHORT_DRAIN = 3.0
"""The deadline case: the held requests outlast the drain, which ends at this deadline."""


async def test_new_connections_until_a_drain_deadline_get_503_or_refused(
    tmp_path: Path, event_backend: EventBackend
) -> None:
    # The held work never finishes: the drain ends at its deadline, with the workers'
    # listening sockets still open and new connections still arriving. Those must be
    # answered or refused then too, not accepted and cut when the sockets close.
    sections = {
        "server": {"drain_timeout": SHORT_DRAIN, "retry_after_seconds": RETRY_AFTER_SECONDS}
    }
    held: list[HttpResponse | str] = []
    gate = event_backend.slow_gate = trio.Event()
    async with proxy_running(
        tmp_path, [backend_route(event_backend.port)], workers=WORKERS, sections=sections
    ) as proxy:
        with trio.fail_after(SHORT_DRAIN + EXIT_GUARD + 60):
            async with trio.open_nursery() as nursery:
                held_count = await _hold_requests(proxy, event_backend, nursery, WORKERS, held)
                proxy.process.send_signal(signal.SIGTERM)
                attempts = Attempts(sigterm_at=trio.current_time())
                await poll_until(lambda: _draining(proxy) >= WORKERS, limit=30)
                stop = trio.Event()
                async with trio.open_nursery() as clients:
                    for _ in range(CLIENTS):
                        clients.start_soon(keep_connecting, proxy.port, attempts, stop)
                    code = await trio.to_thread.run_sync(proxy.process.wait, EXIT_GUARD)
                    stop.set()
                gate.set()  # the backend's held answers, to connections long closed
    events = [line.get("event") for line in proxy.lines]
    print(
        f"held requests {held_count}, cut at the deadline; new connections during the "
        f"drain {attempts.total}: 503 {attempts.unavailable}, refused {attempts.refused}, "
        f"failed {len(attempts.failures)}"
    )
    assert code == 0
    assert "drain_deadline_passed" not in events  # the workers ended at their own deadline
    assert len(held) == held_count
    assert not any(isinstance(a, HttpResponse) and a.status == 200 for a in held)
    assert attempts.failures == [], (
        f"{len(attempts.failures)} failed, the first: {attempts.failures[:5]}"
    )
    assert attempts.unavailable >= 1
