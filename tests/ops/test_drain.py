"""SIGTERM drains: nothing in flight is cut, streams end with a hint, the process exits.

- 1000 SSE streams open through the proxy (2 workers) and 10 slow requests in flight
  (the backend holds them, then answers 2 s after the SIGTERM), then SIGTERM to the
  supervisor: every slow request gets its 200 and its whole body; every stream gets
  ``retry: 1000`` (the default ``drain_retry_ms``) as a block of its own right after a
  complete event, then the chunked terminator and the connection's end; the supervisor
  exits 0 when the work is done, not at ``drain_timeout`` (set far beyond: the test's
  guard would give up first). Once all streams are open, the backend
  sends an event per second on each, in two halves 200 ms apart and with the streams'
  phases spread, so at the SIGTERM some streams are mid-event: those must wait for the
  event's end (at least one such stream is required).
- WebSocket tunnels open at SIGTERM are closed with 1001 (going away); the client's
  answer reaches the backend; the process exits 0 without waiting for the deadline.
- Connections queued (handshake done, whole request sent) on a worker's listening socket
  when that worker drains are all answered 200, by the draining worker or by the one
  that replaces it: the supervisor's promise that a queued connection is never reset.
  The worker is SIGSTOPped while they queue, then gets SIGTERM and SIGCONT, so the
  drain and the queued connections meet in the same scheduler batch, as they do when a
  reload retires a generation under traffic.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h11
import pytest
import trio
import trio_websocket

from tests.support.backends import (
    HttpBackend,
    HttpClient,
    HttpResponse,
    WebSocketEchoBackend,
    backend_route,
    pattern_sha256,
    poll_until,
    proxy_running,
    wait_for_line,
)
from tests.support.proxy_process import ProxyProcess
from tests.support.sse_client import EventBackend, RetryHint, SseEvent, SseParser

STREAMS = 1000
OPENING_AT_ONCE = 50
OPEN_LIMIT = 25.0
"""Seconds allowed to open the streams (about 2 s on an idle 2-core machine)."""
SLOW_REQUESTS = 10
SLOW_DELAY = 2.0
SLOW_SIZE = 200_000
DRAIN_TIMEOUT = 300.0
"""Far beyond what any drain here takes, so a drain that ended at its deadline rather than
with the work would outlast EXIT_GUARD: the test fails then, with no clock bound on how
fast a busy machine must be."""
EXIT_GUARD = 60.0
DEFAULT_RETRY_MS = 1000
EVENT_INTERVAL = 1.0
EVENT_SPLIT = 0.2
_CLOSED = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_FIRST_EVENT = b'data: {"i": 0}\n\n'


@dataclass(eq=False)
class RawStream:
    """One SSE stream read with a raw socket: every byte, and how it ended."""

    data: bytearray = field(default_factory=bytearray)
    after_sigterm: bytearray = field(default_factory=bytearray)
    """The bytes that arrived after the test sent SIGTERM."""
    ended_at: float | None = None
    error: str | None = None


@dataclass(slots=True)
class ParsedStream:
    status: int
    blocks: list[SseEvent | RetryHint]
    at_boundary: bool
    body_ended: bool
    """The chunked body ended (h11 EndOfMessage) before the connection closed."""


def _parse(raw: bytes, target: str) -> ParsedStream:
    """Decode a whole recorded response (head, chunked body, EOF) with h11."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target=target, headers=[(b"host", b"proxy")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    parser = SseParser()
    status = 0
    blocks: list[SseEvent | RetryHint] = []
    body_ended = False
    while True:
        event = conn.next_event()
        if type(event) is h11.Response:
            status = event.status_code
        elif type(event) is h11.Data:
            blocks += parser.feed(event.data)
        elif type(event) is h11.EndOfMessage:
            body_ended = True
        else:
            assert type(event) is h11.ConnectionClosed, event
            break
    return ParsedStream(status, blocks, parser.at_boundary, body_ended)


@pytest.fixture
async def event_backend(nursery: trio.Nursery) -> EventBackend:
    server = EventBackend()
    await nursery.start(server.serve)
    return server


@pytest.fixture
async def ws_backend(nursery: trio.Nursery) -> WebSocketEchoBackend:
    server = WebSocketEchoBackend()
    await nursery.start(server.serve)
    return server


def _events(proxy: ProxyProcess, name: str) -> int:
    return sum(1 for line in list(proxy.lines) if line.get("event") == name)


async def test_sigterm_with_1000_streams_and_slow_requests(
    tmp_path: Path, event_backend: EventBackend
) -> None:
    target = f"/events?interval={EVENT_INTERVAL}&split={EVENT_SPLIT}"
    request = (
        f"GET {target} HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n"
    ).encode()
    streams = [RawStream() for _ in range(STREAMS)]
    established = [0]
    settled = trio.Event()
    """Set when every stream is open, or one failed to open."""
    sigterm_sent = [False]
    slow: list[HttpResponse | str] = []
    sections = {"server": {"drain_timeout": DRAIN_TIMEOUT}}
    async with proxy_running(
        tmp_path, [backend_route(event_backend.port)], sections=sections
    ) as proxy:
        port = proxy.port
        opening = trio.Semaphore(OPENING_AT_ONCE)
        events_gate = event_backend.events_gate = trio.Event()

        async def stream_task(record: RawStream) -> None:
            stream: trio.SocketStream | None = None
            try:
                async with opening:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    await stream.send_all(request)
                    while _FIRST_EVENT not in record.data:
                        data = await stream.receive_some(65536)
                        if not data:
                            record.error = "closed before the first event"
                            settled.set()
                            return
                        record.data += data
                established[0] += 1
                if established[0] == STREAMS:
                    settled.set()
                while data := await stream.receive_some(65536):
                    record.data += data
                    if sigterm_sent[0]:
                        record.after_sigterm += data
            except _CLOSED as exc:
                record.error = repr(exc)
                settled.set()
            finally:
                record.ended_at = trio.current_time()
                if stream is not None:
                    await trio.aclose_forcefully(stream)

        async def slow_request(seed: int) -> None:
            try:
                client = await HttpClient.connect(port)
                try:
                    slow.append(
                        await client.request(
                            "GET", f"/slow?delay={SLOW_DELAY}&size={SLOW_SIZE}&seed={seed}"
                        )
                    )
                finally:
                    await client.aclose()
            except (*_CLOSED, h11.ProtocolError, ConnectionError) as exc:
                slow.append(f"slow request {seed}: {exc!r}")

        with trio.fail_after(38):
            async with trio.open_nursery() as nursery:
                opened_at = trio.current_time()
                for record in streams:
                    nursery.start_soon(stream_task, record)
                with trio.move_on_after(OPEN_LIMIT):
                    await settled.wait()
                open_took = trio.current_time() - opened_at
                assert [(s.error, bytes(s.data[:300])) for s in streams if s.error] == []
                assert established[0] == STREAMS, f"{established[0]} open after {open_took} s"
                assert event_backend.streams_open == STREAMS
                # The backend holds the slow requests until the SIGTERM is sent, then
                # answers SLOW_DELAY later: all of them are in flight during the drain.
                gate = event_backend.slow_gate = trio.Event()
                for seed in range(SLOW_REQUESTS):
                    nursery.start_soon(slow_request, seed)
                await poll_until(lambda: event_backend.slow_received == SLOW_REQUESTS, limit=10)
                # Now the streams' events flow (phases spread over the interval); after a
                # cycle every stream has had one, and some are mid-event.
                events_gate.set()
                await trio.sleep(EVENT_INTERVAL + EVENT_SPLIT + 0.1)

                proxy.process.send_signal(signal.SIGTERM)
                sigterm_at = trio.current_time()
                sigterm_sent[0] = True
                gate.set()
                started = time.monotonic()
                code = await trio.to_thread.run_sync(proxy.process.wait, EXIT_GUARD)
                took = time.monotonic() - started
            # (the nursery ends once every stream and slow request has ended)
        drain_lines = _events(proxy, "worker_draining"), _events(proxy, "worker_stopped")

    last_stream_end = max(s.ended_at or 0.0 for s in streams) - sigterm_at
    print(
        f"{STREAMS} streams open in {open_took:.2f} s; SIGTERM -> last stream ended "
        f"{last_stream_end * 1000:.0f} ms, -> supervisor exit {took:.2f} s "
        f"(slow requests answered {SLOW_DELAY} s after SIGTERM)"
    )
    assert code == 0
    assert drain_lines == (2, 2)
    assert _events(proxy, "drain_deadline_passed") == 0

    # Every in-flight request completed, whole.
    assert len(slow) == SLOW_REQUESTS
    for response in slow:
        assert isinstance(response, HttpResponse), response
        assert response.status == 200
        assert response.length == SLOW_SIZE
        # Answered while draining: the proxy says it closes the connection after it.
        assert response.header("connection") == ["close"], response.headers
    assert sorted(r.sha256 for r in slow if isinstance(r, HttpResponse)) == sorted(
        pattern_sha256(SLOW_SIZE, seed=s) for s in range(SLOW_REQUESTS)
    )
    assert event_backend.slow_answered == SLOW_REQUESTS

    # Every stream: 200, whole events numbered 0, 1, 2, ..., then the retry hint as a block
    # of its own, then the chunked terminator, then the connection's end, after SIGTERM.
    mid_event = 0
    for index, record in enumerate(streams):
        who = f"stream {index}"
        assert record.error is None, (who, record.error)
        assert record.ended_at is not None and record.ended_at >= sigterm_at, who
        raw = bytes(record.data)
        assert raw.endswith(b"\r\n0\r\n\r\n"), (who, raw[-120:])
        parsed = _parse(raw, target)
        assert parsed.status == 200, who
        assert parsed.body_ended, (who, raw[-120:])
        assert parsed.at_boundary, (who, raw[-120:])
        *events, last = parsed.blocks
        assert last == RetryHint(DEFAULT_RETRY_MS), (who, parsed.blocks[-3:])
        assert events, who
        assert all(isinstance(e, SseEvent) for e in events), (who, events)
        assert [int(e.id) for e in events if isinstance(e, SseEvent)] == list(range(len(events)))
        # Only the second half of an event arrived after SIGTERM, then the hint: the
        # drain found this stream mid-event and waited for the event's end.
        late = bytes(record.after_sigterm)
        if b"id: " not in late and 0 <= late.find(b"data: ") < late.find(b"retry: "):
            mid_event += 1
    print(f"streams whose event was completed after SIGTERM, then the hint: {mid_event}")
    assert mid_event >= 1


async def test_sigterm_closes_websockets_with_1001(
    tmp_path: Path, ws_backend: WebSocketEchoBackend
) -> None:
    sections = {"server": {"drain_timeout": DRAIN_TIMEOUT}}
    count = 6
    closes: list[int | None] = []
    async with proxy_running(
        tmp_path, [backend_route(ws_backend.port, "/ws")], sections=sections
    ) as proxy:
        url = f"ws://127.0.0.1:{proxy.port}/ws"
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                connected = [0]
                go = trio.Event()

                async def client(index: int) -> None:
                    async with trio_websocket.open_websocket_url(url) as ws:
                        await ws.send_message(f"hello {index}")
                        assert await ws.get_message() == f"hello {index}"
                        connected[0] += 1
                        await go.wait()
                        try:
                            message = await ws.get_message()
                        except trio_websocket.ConnectionClosed as exc:
                            closes.append(exc.reason.code if exc.reason is not None else None)
                        else:
                            raise AssertionError(f"unexpected message {message!r}")

                for index in range(count):
                    nursery.start_soon(client, index)
                await poll_until(lambda: connected[0] == count, limit=10)
                go.set()
                proxy.process.send_signal(signal.SIGTERM)
                started = time.monotonic()
                code = await trio.to_thread.run_sync(proxy.process.wait, EXIT_GUARD)
                took = time.monotonic() - started
    print(f"SIGTERM -> supervisor exit with {count} WebSockets open: {took:.2f} s")
    assert closes == [1001] * count
    assert code == 0
    await poll_until(lambda: len(ws_backend.closes) == count, limit=5)
    # The client's answer to the 1001 went through the tunnel to the backend.
    assert [(c.initiator, c.code) for c in ws_backend.closes] == [("client", 1001)] * count


QUEUED = 5
QUEUE_ROUNDS = 4


@dataclass(eq=False)
class _Round:
    connected: int = 0
    outcomes: list[int | str] = field(default_factory=list)
    """Status per request, or the error that ended it."""

    async def request(self, port: int, target: str) -> None:
        try:
            client = await HttpClient.connect(port)
            try:
                self.connected += 1  # the handshake is done: the kernel queued it
                response = await client.request("GET", target)
                self.outcomes.append(response.status)
            finally:
                await client.aclose()
        except (*_CLOSED, h11.ProtocolError, ConnectionError) as exc:
            self.outcomes.append(repr(exc))


def _started(restarts: int, line: dict[str, object]) -> bool:
    return line.get("event") == "worker_started" and line.get("restarts") == restarts


async def test_connections_queued_when_a_worker_drains_are_served(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend = HttpBackend()
    await nursery.start(backend.serve)
    rounds: list[list[int | str]] = []
    sections = {"server": {"drain_timeout": DRAIN_TIMEOUT}}
    async with proxy_running(
        tmp_path, [backend_route(backend.port)], workers=1, sections=sections
    ) as proxy:
        with trio.fail_after(30):
            for number in range(QUEUE_ROUNDS):
                # This round's worker (the supervisor restarts the one drained before).
                started = await wait_for_line(proxy, partial(_started, number))
                worker = int(str(started["pid"]))
                os.kill(worker, signal.SIGSTOP)
                this = _Round()
                try:
                    async with trio.open_nursery() as clients:
                        for index in range(QUEUED):
                            clients.start_soon(this.request, proxy.port, f"/q-{number}-{index}")
                        await poll_until(lambda: this.connected == QUEUED, limit=5)  # noqa: B023
                        await trio.sleep(0.1)  # the requests reach the queued sockets
                        os.kill(worker, signal.SIGTERM)
                        os.kill(worker, signal.SIGCONT)
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker, signal.SIGCONT)  # never leave it stopped
                rounds.append(this.outcomes)
    print("per round, the queued requests' outcomes:", rounds)
    assert rounds == [[200] * QUEUED] * QUEUE_ROUNDS
