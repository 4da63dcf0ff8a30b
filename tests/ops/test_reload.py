"""Three reloads (SIGHUP) under continuous load lose nothing.

Load, all at once, through the real proxy (2 workers):

- keep-alive clients looping ``GET`` on one connection each (reconnecting when the
  proxy closes it);
- new-connection clients looping ``GET`` with a fresh connection per request;
- SSE clients (``ResumingSseClient``) on an endless event stream whose events carry
  ``id:`` and which resumes from ``Last-Event-ID``.

SIGHUP is sent three times, at least 1.5 s apart (and each only once the previous
reload was done), and the load runs ~2 s after the last. Then:

- no request failed (the rule is in ``RetryingClient``'s docstring) and hundreds succeeded;
- every SSE stream the old generation ended carried a ``retry: <drain_retry_ms>`` block at
  an event boundary, then the chunked body's end; each client reconnected (with
  ``Last-Event-ID``) after every reload, and the ids it received over all its
  connections are exactly 0, 1, 2, ... (the backend resumed: no gap, no repeat);
- there were four generations of two workers, all pids distinct, ``reloaded`` logged
  three times, each old generation stopped, and its workers are gone.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h11
import psutil
import pytest
import trio

from tests.support.backends import HttpBackend, backend_route, poll_until, proxy_running
from tests.support.proxy_process import ProxyProcess
from tests.support.sse_client import EventBackend, ResumingSseClient, SseEvent

KEEPALIVE_CLIENTS = 4
NEW_CONNECTION_CLIENTS = 2
SSE_CLIENTS = 10
RELOADS = 3
RELOAD_SPACING = 1.5
MIN_OK = 300
"""Requests answered 200 over the run, at the least."""
GUARD = 60.0
"""How long to wait for what must happen: a guard against a hang, not a measure of speed."""
DRAIN_RETRY_MS = 200
SSE_INTERVAL = 0.1
MAX_ATTEMPTS = 3
REQUEST_TIMEOUT = 10.0
_CLOSED = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(eq=False)
class LoadStats:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    retries_reused: int = 0
    """Retries after a kept-alive connection closed before any response byte."""
    retries_fresh: int = 0
    """Retries after a new connection closed before any response byte."""
    closed_by_server: int = 0
    """Responses on keep-alive connections that carried ``Connection: close`` (a
    draining worker's last answer on that connection)."""
    retry_reasons: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)


class _NoResponse(Exception):
    """The connection ended before any byte of the response arrived."""


class RetryingClient:
    """An HTTP/1.1 client (h11) that retries exactly what HTTP allows it to retry.

    A request counts as **failed** if

    - it got a response other than 200 (a 5xx from the proxy above all), or
    - the connection broke after part of the response had arrived (a cut response), or
    - it got no complete response after ``MAX_ATTEMPTS`` attempts or ``REQUEST_TIMEOUT``,
      or a connect failed (the supervisor holds the listening sockets throughout: a
      refused connect is a lost request).

    It is **retried** (on a new connection) only when the connection was closed or reset
    before any byte of the response arrived, whether or not the request had been fully
    written: the method is GET, idempotent, and RFC 9110 §9.2.2 / RFC 9112 §9.3.1 let a
    client retransmit an idempotent request after a connection closed under it. This is
    what a keep-alive connection closed by a draining worker looks like (the worker
    closes idle connections, and one may race a request on its way in). A response with
    ``Connection: close`` is complete and not a failure; the next request goes on a new
    connection.
    """

    def __init__(self, port: int, stats: LoadStats, *, keep_alive: bool) -> None:
        self.port = port
        self.stats = stats
        self.keep_alive = keep_alive
        self._stream: trio.SocketStream | None = None
        self._conn: h11.Connection | None = None
        self._exchanges = 0
        self.connections_opened = 0

    async def aclose(self) -> None:
        if self._stream is not None:
            await trio.aclose_forcefully(self._stream)
        self._stream = self._conn = None

    async def get(self, target: str) -> None:
        started = trio.current_time()
        with trio.move_on_after(REQUEST_TIMEOUT):
            for _attempt in range(MAX_ATTEMPTS):
                try:
                    failure = await self._attempt(target)
                except _NoResponse:
                    continue
                finally:
                    if self._conn is None or self._conn.our_state is not h11.IDLE:
                        await self.aclose()
                if failure is None:
                    self.stats.ok += 1
                    self.stats.latencies.append(trio.current_time() - started)
                else:
                    self.stats.failures.append(f"{target}: {failure}")
                return
            self.stats.failures.append(f"{target}: no response after {MAX_ATTEMPTS} attempts")
            return
        await self.aclose()
        self.stats.failures.append(f"{target}: no complete response in {REQUEST_TIMEOUT} s")

    async def _attempt(self, target: str) -> str | None:
        """One attempt; the failure, None on success; _NoResponse when retryable."""
        if self._stream is None or self._conn is None:
            try:
                self._stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            except OSError as exc:
                return f"connect failed: {exc!r}"
            self._conn = h11.Connection(h11.CLIENT)
            self._exchanges = 0
            self.connections_opened += 1
        stream, conn = self._stream, self._conn
        reused = self._exchanges > 0
        self._exchanges += 1
        headers = [(b"host", f"127.0.0.1:{self.port}".encode())]
        if not self.keep_alive:
            headers.append((b"connection", b"close"))
        request = conn.send(h11.Request(method="GET", target=target, headers=headers)) or b""
        request += conn.send(h11.EndOfMessage()) or b""
        got_bytes = sent = False
        try:
            await stream.send_all(request)
            sent = True
            body = bytearray()
            status = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    got_bytes = got_bytes or bool(data)
                    conn.receive_data(data)
                elif type(event) is h11.Response:
                    status = event.status_code
                    if self.keep_alive and (b"connection", b"close") in event.headers:
                        self.stats.closed_by_server += 1
                elif type(event) is h11.Data:
                    body += event.data
                elif type(event) is h11.EndOfMessage:
                    break
                else:
                    raise h11.RemoteProtocolError(f"unexpected {event!r}")
        except (*_CLOSED, h11.ProtocolError) as exc:
            if not got_bytes:
                # h11 reports an EOF where a response should be as a protocol error.
                how = "EOF" if isinstance(exc, h11.ProtocolError) else type(exc).__name__
                reason = (
                    f"{'kept-alive' if reused else 'new'} connection, request "
                    f"{'written' if sent else 'not fully written'}: {how}"
                )
                self.stats.retry_reasons[reason] = self.stats.retry_reasons.get(reason, 0) + 1
                if reused:
                    self.stats.retries_reused += 1
                else:
                    self.stats.retries_fresh += 1
                raise _NoResponse from None
            return f"response cut: {exc!r}"
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        if status != 200:
            return f"status {status}: {bytes(body)[:200]!r}"
        if json.loads(body)["path"] != target.partition("?")[0]:
            return f"wrong body {bytes(body)!r}"
        return None


def _generations(proxy: ProxyProcess) -> dict[int, set[int]]:
    """Worker pids by generation, from the supervisor's worker_started lines."""
    out: dict[int, set[int]] = {}
    for line in list(proxy.lines):
        if line.get("event") == "worker_started":
            out.setdefault(int(line["generation"]), set()).add(int(line["pid"]))
    return out


def _events(proxy: ProxyProcess, name: str) -> list[dict[str, object]]:
    return [line for line in list(proxy.lines) if line.get("event") == name]


def _reloaded_more_than(proxy: ProxyProcess, count: int) -> bool:
    return len(_events(proxy, "reloaded")) > count


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


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


async def test_three_reloads_under_load(
    tmp_path: Path, http_backend: HttpBackend, event_backend: EventBackend
) -> None:
    routes = [backend_route(event_backend.port, "/events"), backend_route(http_backend.port)]
    sections = {"server": {"drain_timeout": 5.0, "drain_retry_ms": DRAIN_RETRY_MS}}
    stats = LoadStats()
    sse_clients = [
        ResumingSseClient(0, f"/events?interval={SSE_INTERVAL}") for _ in range(SSE_CLIENTS)
    ]
    keepalive_clients: list[RetryingClient] = []
    hup_at: list[float] = []
    reloaded_at: list[float] = []
    async with proxy_running(tmp_path, routes, sections=sections) as proxy:
        first_generation = set(proxy.worker_pids())
        assert len(first_generation) == 2
        with trio.fail_after(35):
            stop = trio.Event()

            async def keepalive_loop(index: int) -> None:
                client = RetryingClient(proxy.port, stats, keep_alive=True)
                keepalive_clients.append(client)
                n = 0
                try:
                    while not stop.is_set():
                        n += 1
                        await client.get(f"/ka?c={index}&n={n}")
                        await trio.sleep(0.005)
                finally:
                    await client.aclose()

            async def new_connection_loop(index: int) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    client = RetryingClient(proxy.port, stats, keep_alive=False)
                    try:
                        await client.get(f"/new?c={index}&n={n}")
                    finally:
                        await client.aclose()
                    await trio.sleep(0.005)

            async with trio.open_nursery() as sse_nursery:
                for client in sse_clients:
                    client.port = proxy.port
                    sse_nursery.start_soon(client.run)
                async with trio.open_nursery() as load:
                    for i in range(KEEPALIVE_CLIENTS):
                        load.start_soon(keepalive_loop, i)
                    for i in range(NEW_CONNECTION_CLIENTS):
                        load.start_soon(new_connection_loop, i)
                    # Every SSE client is streaming before the first reload.
                    await poll_until(
                        lambda: all(c.events_seen >= 3 for c in sse_clients), limit=GUARD
                    )
                    for number in range(RELOADS):
                        if hup_at:
                            await trio.sleep_until(hup_at[-1] + RELOAD_SPACING)
                        proxy.process.send_signal(signal.SIGHUP)
                        hup_at.append(trio.current_time())
                        await poll_until(partial(_reloaded_more_than, proxy, number), limit=GUARD)
                        reloaded_at.append(trio.current_time())
                    # The load goes on until enough came through after the last reload
                    # (counted, not timed): every SSE client's last stream has events.
                    await poll_until(
                        lambda: (
                            stats.ok >= MIN_OK
                            and all(
                                len(c.connections) == RELOADS + 1
                                and len(c.connections[-1].ids) >= 3
                                for c in sse_clients
                            )
                        ),
                        limit=GUARD,
                    )
                    stop.set()
                sse_nursery.cancel_scope.cancel()

            # Each old generation drains and stops; its workers are gone.
            await poll_until(
                lambda: len(_events(proxy, "generation_stopped")) >= RELOADS, limit=GUARD
            )
            generations = _generations(proxy)
            old_pids = set().union(*(generations.get(g, set()) for g in range(1, RELOADS + 1)))
            await poll_until(lambda: all(_gone(pid) for pid in old_pids), limit=GUARD)
            current = set(proxy.worker_pids())
        assert proxy.process.poll() is None

    # -- what the load saw ---------------------------------------------------------------
    latencies = sorted(stats.latencies)
    reload_times = [r - h for h, r in zip(hup_at, reloaded_at, strict=True)]
    reconnect_gaps = [
        later.first_event_at - earlier.ended_at
        for client in sse_clients
        for earlier, later in zip(client.connections, client.connections[1:], strict=False)
        if earlier.ended_at is not None and later.first_event_at is not None
    ]
    print(
        f"requests ok {stats.ok}, failed {len(stats.failures)}; retries after a close "
        f"before any response byte: {stats.retries_reused} on kept-alive connections, "
        f"{stats.retries_fresh} on new ones; Connection: close answers "
        f"{stats.closed_by_server}; latency p50 {latencies[len(latencies) // 2] * 1000:.1f} "
        f"ms, max {latencies[-1] * 1000:.1f} ms"
    )
    print(
        "retries by kind:",
        stats.retry_reasons,
        "; connections per keep-alive client:",
        [c.connections_opened for c in keepalive_clients],
    )
    print(
        "SIGHUP -> reloaded (new generation ready):", [f"{t * 1000:.0f} ms" for t in reload_times]
    )
    print(
        f"SSE: {sum(len(c.connections) for c in sse_clients)} connections, "
        f"{sum(c.events_seen for c in sse_clients)} events; stream end -> first event "
        f"after reconnect: max {max(reconnect_gaps) * 1000:.0f} ms "
        f"(retry hint {DRAIN_RETRY_MS} ms)"
    )
    assert stats.failures == []
    assert stats.ok >= MIN_OK
    # Every reload took each keep-alive connection through a drain (closed while idle, or
    # answered with Connection: close): the clients really crossed the generations.
    assert len(keepalive_clients) == KEEPALIVE_CLIENTS
    assert all(c.connections_opened >= RELOADS + 1 for c in keepalive_clients)

    for index, client in enumerate(sse_clients):
        who = f"SSE client {index}"
        *ended, last = client.connections
        # One stream per generation: each reload ended the stream once, at an event
        # boundary, with the configured retry hint and then the body's end.
        assert len(ended) == RELOADS, (who, [(c.status, c.end) for c in client.connections])
        for connection in client.connections:
            assert connection.status == 200, (who, connection.status, connection.end)
        for connection in ended:
            assert connection.ended_with_retry == DRAIN_RETRY_MS, (
                who,
                connection.end,
                connection.at_boundary_at_end,
                connection.blocks[-3:],
            )
        assert last.end == "open"
        # Each reconnect resumed from the last id seen, and the ids over all
        # connections run 0, 1, 2, ... without a gap or a repeat.
        assert client.connections[0].last_event_id_sent is None
        for earlier, later in zip(client.connections, client.connections[1:], strict=False):
            assert earlier.ids, who
            assert later.last_event_id_sent == str(earlier.ids[-1]), who
        ids = [i for connection in client.connections for i in connection.ids]
        assert ids == list(range(len(ids))), who
        assert len(last.ids) >= 3, who  # it continued after the last reconnect
        assert all(
            b.event == "tick" and json.loads(b.data) == {"i": int(b.id)}
            for c in client.connections
            for b in c.blocks
            if isinstance(b, SseEvent)
        )
    assert event_backend.last_event_ids.count(None) == SSE_CLIENTS

    # -- the generations -----------------------------------------------------------------
    assert len(_events(proxy, "reloaded")) == RELOADS
    assert sorted(generations) == list(range(1, RELOADS + 2))
    assert generations[1] == first_generation
    assert all(len(pids) == 2 for pids in generations.values())
    assert len(set().union(*generations.values())) == 2 * (RELOADS + 1)
    assert current == generations[RELOADS + 1]
    stopped = sorted(int(str(line["generation"])) for line in _events(proxy, "generation_stopped"))
    assert stopped == list(range(1, RELOADS + 1))
    assert _events(proxy, "worker_died") == []
    assert _events(proxy, "reload_failed") == []
