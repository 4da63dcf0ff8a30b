"""A reload to fewer workers while new connections keep arriving: none is left waiting.

Each worker slot has its own SO_REUSEPORT listening socket, and the kernel spreads new
connections over all of them. A reload from three workers to two leaves the third slot's
socket to nobody in the new generation. Its old worker is told to retire: it seals that
socket at once (new handshakes are dropped, and the client's retransmission goes to a
socket that stays), answers what waits in its queue with 503 and closes it. The
supervisor lets go of its own copy at the reload, so the socket does not outlive its
worker while the rest of the old generation drains.

The old generation is kept draining by requests the backend holds (one on each old
worker) until the clients have made ``ATTEMPTS_AFTER_RELOAD`` new connections after the
reload. Every attempt must reach the backend (its 404 for ``/ok``) or be answered
``503`` with ``Retry-After`` and ``Connection: close``; a connection left in a queue
nobody serves (no answer within ``REQUEST_TIMEOUT``), a reset or an EOF after the
connect is a failure.
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import h11
import pytest
import trio

from tests.ops.test_drain_new_connections import _hold_requests
from tests.support.backends import HttpResponse, backend_route, poll_until, proxy_running
from tests.support.proxy_process import ProxyProcess
from tests.support.sse_client import EventBackend

BEFORE, AFTER = 3, 2
CLIENTS = 16
ATTEMPTS_AFTER_RELOAD = 1500
REQUEST_TIMEOUT = 10.0
"""A SYN the retiring socket dropped is sent again after 1 s, then 3 s: an answer well
within this means the connection was not left queued."""
RETRY_AFTER_SECONDS = 3
_CLOSED = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def attempt(port: int) -> str:
    """A new connection and a GET: ``served``, ``503``, or what went wrong."""
    sock = trio.socket.socket()
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                await sock.connect(("127.0.0.1", port))
            except OSError as exc:
                return f"connect: {exc!r}"
            stream = trio.SocketStream(sock)
            conn = h11.Connection(h11.CLIENT)
            request = conn.send(h11.Request(method="GET", target="/ok", headers=[(b"host", b"x")]))
            with contextlib.suppress(*_CLOSED):
                await stream.send_all((request or b"") + (conn.send(h11.EndOfMessage()) or b""))
            try:
                return await _answer(stream, conn)
            except (*_CLOSED, h11.ProtocolError) as exc:
                return f"connected, then {exc!r}"
        return f"no answer within {REQUEST_TIMEOUT} s"
    finally:
        sock.close()


async def _answer(stream: trio.SocketStream, conn: h11.Connection) -> str:
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
    assert response is not None
    headers = dict(response.headers)
    if response.status_code == 404:
        return "served"  # the backend's own answer (it serves no /ok): the request reached it
    expected = {b"retry-after": str(RETRY_AFTER_SECONDS).encode(), b"connection": b"close"}
    if response.status_code == 503 and all(headers.get(k) == v for k, v in expected.items()):
        return "503"
    return f"status {response.status_code}"


def _reloaded(proxy: ProxyProcess) -> bool:
    return any(line.get("event") == "reloaded" for line in list(proxy.lines))


@pytest.fixture
async def event_backend(nursery: trio.Nursery) -> EventBackend:
    server = EventBackend()
    await nursery.start(server.serve)
    return server


async def test_reload_to_fewer_workers_leaves_no_connection_waiting(
    tmp_path: Path, event_backend: EventBackend
) -> None:
    sections = {"server": {"drain_timeout": 300.0, "retry_after_seconds": RETRY_AFTER_SECONDS}}
    gate = event_backend.slow_gate = trio.Event()
    held: list[HttpResponse | str] = []
    outcomes: dict[str, int] = {}
    after_reload = [0]
    async with proxy_running(
        tmp_path, [backend_route(event_backend.port)], workers=BEFORE, sections=sections
    ) as proxy:
        config = tmp_path / f"switchboard-{proxy.port}.toml"
        with trio.fail_after(180):
            async with trio.open_nursery() as nursery:
                await _hold_requests(proxy, event_backend, nursery, BEFORE, held)
                stop = trio.Event()

                async def keep_connecting() -> None:
                    while not stop.is_set():
                        outcome = await attempt(proxy.port)
                        outcomes[outcome] = outcomes.get(outcome, 0) + 1
                        if _reloaded(proxy):
                            after_reload[0] += 1

                async with trio.open_nursery() as clients:
                    for _ in range(CLIENTS):
                        clients.start_soon(keep_connecting)
                    config.write_text(
                        config.read_text().replace(f"workers = {BEFORE}", f"workers = {AFTER}")
                    )
                    proxy.process.send_signal(signal.SIGHUP)
                    await poll_until(lambda: _reloaded(proxy), limit=60)
                    await poll_until(lambda: after_reload[0] >= ATTEMPTS_AFTER_RELOAD, limit=120)
                    stop.set()
                gate.set()  # the old generation's held requests, and with them its drain
                await poll_until(
                    lambda: any(
                        line.get("event") == "generation_stopped" for line in list(proxy.lines)
                    ),
                    limit=60,
                )
    failures = {k: v for k, v in outcomes.items() if k not in ("served", "503")}
    print(f"attempts {sum(outcomes.values())} ({after_reload[0]} after the reload): {outcomes}")
    assert failures == {}
    assert outcomes.get("served", 0) >= ATTEMPTS_AFTER_RELOAD // 2
