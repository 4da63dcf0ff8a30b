"""Server-Sent Events through the real proxy arrive as they are emitted, not in a burst.

The backend emits one event every 200 ms with its ``time.time()`` emission timestamp in
the data; the client reads the stream incrementally through the proxy and notes when
each event completes. Every event must arrive within 50 ms of its emission, and the
arrivals must be spread like the emissions.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.backends import (
    HttpClient,
    SseBackend,
    backend_route,
    proxy_running,
    wait_for_line,
)

EVENTS = 8
INTERVAL = 0.2
MAX_DELAY = 0.05


@dataclass(slots=True)
class Arrival:
    index: int
    emitted_at: float
    arrived_at: float

    @property
    def delay(self) -> float:
        return self.arrived_at - self.emitted_at


class _EventParser:
    """Splits an SSE byte stream into events, stamping each with the time it completed."""

    def __init__(self) -> None:
        self.buffer = b""
        self.arrivals: list[Arrival] = []

    def feed(self, data: bytes) -> None:
        now = time.time()
        self.buffer += data
        while b"\n\n" in self.buffer:
            raw, self.buffer = self.buffer.split(b"\n\n", 1)
            fields = dict(line.split(b": ", 1) for line in raw.split(b"\n"))
            assert fields[b"event"] == b"tick"
            payload = json.loads(fields[b"data"])
            assert int(fields[b"id"]) == payload["i"]
            self.arrivals.append(Arrival(payload["i"], payload["t"], now))


@pytest.fixture
async def sse_backend(nursery: trio.Nursery) -> SseBackend:
    server = SseBackend()
    await nursery.start(server.serve)
    return server


def _check_timing(arrivals: list[Arrival], backend: SseBackend) -> None:
    delays = [round(a.delay * 1000, 1) for a in arrivals]
    print(f"SSE delays (ms): {delays}")
    assert [a.index for a in arrivals] == list(range(EVENTS))
    assert [a.emitted_at for a in arrivals] == [e.emitted_at for e in backend.emitted]
    for arrival in arrivals:
        assert arrival.delay < MAX_DELAY, f"event {arrival.index} took {arrival.delay:.3f} s"
    # Spread over the whole emission period, not a burst: each event arrived at least
    # most of an interval after the previous one.
    span = arrivals[-1].arrived_at - arrivals[0].arrived_at
    print(f"SSE arrival span: {span * 1000:.1f} ms (emission span {(EVENTS - 1) * INTERVAL} s)")
    assert abs(span - (EVENTS - 1) * INTERVAL) < MAX_DELAY
    gaps = [b.arrived_at - a.arrived_at for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) > INTERVAL - MAX_DELAY


async def test_sse_events_arrive_as_emitted(tmp_path: Path, sse_backend: SseBackend) -> None:
    async with proxy_running(tmp_path, [backend_route(sse_backend.port)]) as proxy:
        parser = _EventParser()
        client = await HttpClient.connect(proxy.port)
        try:
            with trio.fail_after(10):
                response = await client.request(
                    "GET",
                    f"/events?n={EVENTS}&interval={INTERVAL}",
                    headers=[("Accept", "text/event-stream")],
                    on_data=parser.feed,
                )
        finally:
            await client.aclose()
        access = await wait_for_line(
            proxy, lambda line: line.get("event") == "access" and line.get("path") == "/events"
        )
    assert response.status == 200
    assert response.header("content-type") == ["text/event-stream"]
    assert parser.buffer == b""
    _check_timing(parser.arrivals, sse_backend)
    assert access["status"] == 200
    assert access["error"] is None


async def test_sse_events_arrive_as_emitted_httpx(tmp_path: Path, sse_backend: SseBackend) -> None:
    """The same with a common client reading the stream incrementally."""
    async with proxy_running(tmp_path, [backend_route(sse_backend.port)]) as proxy:
        parser = _EventParser()
        with trio.fail_after(10):
            async with (
                httpx.AsyncClient(base_url=proxy.url) as client,
                client.stream("GET", f"/events?n={EVENTS}&interval={INTERVAL}") as response,
            ):
                assert response.status_code == 200
                async for data in response.aiter_raw():
                    parser.feed(data)
    assert parser.buffer == b""
    _check_timing(parser.arrivals, sse_backend)
