"""Reloads and drains lose no request on kept-alive connections and no SSE event.

A request counts as **failed** when it gets a reset, an EOF without a complete response,
no complete response within 10 s, or a status other than 2xx. There are no retries: a
request that has reached the proxy must be answered, by the worker it reached, however
that worker is being drained. What a draining worker may do is answer with
``Connection: close`` (the client then reconnects) or close a connection that is idle
between requests; the clients here never leave a connection idle (each sends its next
request as soon as the last response ended), and, like common HTTP clients, they check
that a kept-alive connection is still open before reusing it.

- Three reloads under keep-alive load: the real supervisor with two workers, 32
  keep-alive clients, and 300 SSE streams whose events carry ``id:``; a drained stream
  ends with a ``retry:`` hint and the client resumes with ``Last-Event-ID`` (the backend
  replays from there). SIGHUP three times, each once the previous reload is complete
  (the new generation ready, the old one stopped) and the load has made progress on the
  new one. Zero failed requests, every stream's event ids exactly 0, 1, 2, ... across
  its connections, and load in every phase.
- A drain meeting requests that have fully arrived on kept-alive connections: the
  worker is stopped (SIGSTOP) while each of several kept-alive connections gets a
  request, then SIGTERM and SIGCONT, so the drain begins with the requests already
  there; each is answered 2xx with ``Connection: close``.
"""

from __future__ import annotations

import os
import select
import signal
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h11
import pytest
import trio

from tests.support.backends import (
    HttpBackend,
    backend_route,
    poll_until,
    proxy_running,
    wait_for_line,
)
from tests.support.proxy_process import ProxyProcess
from tests.support.raw_backend import RawClient, open_client
from tests.support.sse_client import EventBackend, ResumingSseClient

KEEPALIVE_CLIENTS = 32
SSE_STREAMS = 300
RELOADS = 3
SSE_INTERVAL = 0.5
DRAIN_RETRY_MS = 200
REQUEST_TIMEOUT = 10.0
PROGRESS_PER_PHASE = 200
"""Requests answered in a phase before the next SIGHUP (or the end)."""
_CLOSED = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(eq=False)
class KeepAliveLoad:
    """Requests answered per phase (phase n: after the n-th SIGHUP), and failures."""

    phase: int = 0
    ok: list[int] = field(default_factory=lambda: [0] * (RELOADS + 1))
    failures: list[str] = field(default_factory=list)
    connections: list[int] = field(default_factory=list)
    """Connections each client opened."""
    closed_by_server: int = 0
    """Responses that carried ``Connection: close``."""


def _closed_while_idle(stream: trio.SocketStream) -> bool:
    """Readable while no response is expected: the server closed it (EOF or reset)."""
    poller = select.poll()
    poller.register(stream.socket.fileno(), select.POLLIN | select.POLLRDHUP)
    return bool(poller.poll(0))


async def keepalive_client(port: int, index: int, load: KeepAliveLoad, stop: trio.Event) -> None:
    """GET after GET on one connection; a new connection after ``Connection: close`` or
    once the server closed the idle one."""
    stream: trio.SocketStream | None = None
    conn = h11.Connection(h11.CLIENT)
    opened = 0
    number = 0
    try:
        while not stop.is_set():
            if stream is not None and _closed_while_idle(stream):
                await trio.aclose_forcefully(stream)
                stream = None
            if stream is None:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError as exc:
                    load.failures.append(f"client {index}: connect failed: {exc!r}")
                    await trio.sleep(0.05)
                    continue
                conn = h11.Connection(h11.CLIENT)
                opened += 1
            number += 1
            target = f"/ka?c={index}&n={number}"
            failure: str | None = "no complete response"
            with trio.move_on_after(REQUEST_TIMEOUT):
                try:
                    failure = await _exchange(stream, conn, target, load)
                except (*_CLOSED, h11.ProtocolError) as exc:
                    failure = f"{type(exc).__name__}: {exc}"
            if failure is not None:
                load.failures.append(f"client {index} {target} (connection {opened}): {failure}")
            if failure is not None or conn.our_state is not h11.DONE:
                await trio.aclose_forcefully(stream)
                stream = None
            else:
                conn.start_next_cycle()
    finally:
        load.connections.append(opened)
        if stream is not None:
            await trio.aclose_forcefully(stream)


async def _exchange(
    stream: trio.SocketStream, conn: h11.Connection, target: str, load: KeepAliveLoad
) -> str | None:
    """One request and its response; the failure, or None."""
    request = conn.send(h11.Request(method="GET", target=target, headers=[(b"host", b"127.0.0.1")]))
    await stream.send_all((request or b"") + (conn.send(h11.EndOfMessage()) or b""))
    status = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif type(event) is h11.Response:
            status = event.status_code
            if (b"connection", b"close") in event.headers:
                load.closed_by_server += 1
        elif type(event) is h11.EndOfMessage:
            break
        elif type(event) is h11.ConnectionClosed:
            return "EOF without a complete response"
        elif type(event) is not h11.Data:
            return f"unexpected {event!r}"
    if not 200 <= status < 300:
        return f"status {status}"
    load.ok[load.phase] += 1
    return None


@pytest.fixture
async def http_backend(nursery: trio.Nursery) -> HttpBackend:
    server = HttpBackend()
    await nursery.start(server.serve)
    return server


@pytest.fixture
async def event_backend(nursery: trio.Nursery) -> EventBackend:
    server = EventBackend()
    await nursery.start(server.serve)
    return server


def _logged_more_than(proxy: ProxyProcess, event: str, count: int) -> bool:
    return sum(1 for line in list(proxy.lines) if line.get("event") == event) > count


def _progressed(
    load: KeepAliveLoad, streams: list[ResumingSseClient], phase: int, began: float
) -> bool:
    """The keep-alive load ran in ``phase``, and every stream is on a connection opened
    since it ``began`` and has had an event on it."""
    return load.ok[phase] >= PROGRESS_PER_PHASE and all(
        s.connections and s.connections[-1].started >= began and s.connections[-1].ids
        for s in streams
    )


async def _reload_under_load(
    proxy: ProxyProcess, load: KeepAliveLoad, streams: list[ResumingSseClient]
) -> list[int]:
    """SIGHUP ``RELOADS`` times, each once the previous reload is complete and the load
    has progressed; the SSE events received in each phase."""
    events_by_phase = []
    events_before = 0
    began = trio.current_time()
    for phase in range(RELOADS + 1):
        await poll_until(partial(_progressed, load, streams, phase, began), limit=30)
        events = sum(s.events_seen for s in streams)
        events_by_phase.append(events - events_before)
        events_before = events
        if phase < RELOADS:
            began = trio.current_time()
            load.phase = phase + 1
            proxy.process.send_signal(signal.SIGHUP)
            # Complete: the new generation is ready, and the old one drained and stopped.
            await poll_until(partial(_logged_more_than, proxy, "reloaded", phase), limit=30)
            await poll_until(
                partial(_logged_more_than, proxy, "generation_stopped", phase), limit=30
            )
    return events_by_phase


@pytest.mark.slow
async def test_three_reloads_under_keepalive_load_lose_no_request_and_no_event(
    tmp_path: Path, http_backend: HttpBackend, event_backend: EventBackend
) -> None:
    routes = [backend_route(event_backend.port, "/events"), backend_route(http_backend.port)]
    sections = {"server": {"drain_timeout": 5.0, "drain_retry_ms": DRAIN_RETRY_MS}}
    load = KeepAliveLoad()
    streams = [ResumingSseClient(0, f"/events?interval={SSE_INTERVAL}") for _ in range(SSE_STREAMS)]
    async with proxy_running(tmp_path, routes, workers=2, sections=sections) as proxy:
        with trio.fail_after(150):
            stop = trio.Event()
            async with trio.open_nursery() as sse_nursery:
                for stream in streams:
                    stream.port = proxy.port
                    sse_nursery.start_soon(stream.run)
                async with trio.open_nursery() as clients:
                    for index in range(KEEPALIVE_CLIENTS):
                        clients.start_soon(keepalive_client, proxy.port, index, load, stop)
                    events_by_phase = await _reload_under_load(proxy, load, streams)
                    stop.set()
                sse_nursery.cancel_scope.cancel()
        assert proxy.process.poll() is None
        assert not _logged_more_than(proxy, "reload_failed", 0)

    print(
        f"requests answered per phase {load.ok}, failed {len(load.failures)}; Connection: "
        f"close answers {load.closed_by_server}; connections per client {load.connections}; "
        f"SSE events per phase {events_by_phase}"
    )
    assert load.failures == [], f"{len(load.failures)} failed, the first: {load.failures[:5]}"
    assert all(count > 0 for count in load.ok), load.ok
    assert all(count > 0 for count in events_by_phase), events_by_phase
    # Every client crossed every reload: each drain ended its connection once.
    assert min(load.connections) >= RELOADS + 1, load.connections
    for index, stream in enumerate(streams):
        who = f"SSE stream {index}"
        ids = [i for connection in stream.connections for i in connection.ids]
        assert ids == list(range(len(ids))), (who, ids)
        *ended, last = stream.connections
        assert len(ended) >= RELOADS, (who, [c.end for c in stream.connections])
        for connection in ended:
            assert connection.status == 200, (who, connection.status, connection.end)
            assert connection.ended_with_retry == DRAIN_RETRY_MS, (who, connection.end)
        assert last.end == "open", (who, last.end)


DRAINED_CONNECTIONS = 8
SMALL = "/slow?delay=0&size=16"


async def test_requests_arrived_when_the_drain_begins_are_answered(
    tmp_path: Path, event_backend: EventBackend
) -> None:
    """The backend holds the second answers until the worker has logged its drain, so
    every one is produced by a draining worker and must say ``Connection: close``."""
    sections = {"server": {"drain_timeout": 5.0}}
    outcomes: list[str] = []
    async with proxy_running(
        tmp_path, [backend_route(event_backend.port)], workers=1, sections=sections
    ) as proxy:
        clients = [await open_client(proxy.port) for _ in range(DRAINED_CONNECTIONS)]
        try:
            for client in clients:
                await client.send(get(SMALL))
                assert (await client.read_response()).status == 200
            gate = event_backend.slow_gate = trio.Event()
            (worker,) = proxy.worker_pids()
            os.kill(worker, signal.SIGSTOP)
            try:
                # Loopback delivers on send: once written, each request is in the
                # stopped worker's receive buffer, complete.
                for client in clients:
                    await client.send(get(SMALL))
                os.kill(worker, signal.SIGTERM)
            finally:
                os.kill(worker, signal.SIGCONT)  # never leave it stopped
            await wait_for_line(proxy, lambda line: line.get("event") == "worker_draining")
            gate.set()
            async with trio.open_nursery() as nursery:
                for index, client in enumerate(clients):
                    nursery.start_soon(_second_response, index, client, outcomes)
        finally:
            for client in clients:
                await client.aclose()
    assert sorted(outcomes) == [
        f"{index}: 200, Connection: close" for index in range(DRAINED_CONNECTIONS)
    ]


def get(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: example.test\r\n\r\n".encode()


async def _second_response(index: int, client: RawClient, outcomes: list[str]) -> None:
    try:
        response = await client.read_response(within=REQUEST_TIMEOUT)
    except (*_CLOSED, AssertionError, trio.TooSlowError) as exc:  # AssertionError: EOF
        outcomes.append(f"{index}: {exc!r}")
        return
    connection = (response.header(b"connection") or b"").decode()
    outcomes.append(f"{index}: {response.status}, Connection: {connection}")
