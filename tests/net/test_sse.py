"""Server-Sent Events through the real proxy arrive as they are emitted, not in a burst.

The backend emits each event only after the client has received the previous one (a
lockstep ``SseBackend``): a proxy that held an event back — until the next one, or the
end of the stream — would stall the stream and the test would time out. So each event
must be delivered before the next one is emitted, with no clock involved.
"""

from __future__ import annotations

import json
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


class _EventParser:
    """Splits an SSE byte stream into events, telling the backend of each that completed."""

    def __init__(self, backend: SseBackend) -> None:
        self.backend = backend
        self.buffer = b""
        self.indexes: list[int] = []

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while b"\n\n" in self.buffer:
            raw, self.buffer = self.buffer.split(b"\n\n", 1)
            fields = dict(line.split(b": ", 1) for line in raw.split(b"\n"))
            assert fields[b"event"] == b"tick"
            payload = json.loads(fields[b"data"])
            assert int(fields[b"id"]) == payload["i"]
            self.indexes.append(payload["i"])
            self.backend.arrived(payload["i"])


@pytest.fixture
async def sse_backend(nursery: trio.Nursery) -> SseBackend:
    server = SseBackend()
    await nursery.start(server.serve)
    return server


def _check_lockstep(parser: _EventParser, backend: SseBackend) -> None:
    assert parser.buffer == b""
    assert parser.indexes == list(range(EVENTS))
    # Each event arrived before the next was emitted: emitted 0, arrived 0, emitted 1, ...
    expected = [(kind, i) for i in range(EVENTS) for kind in ("emitted", "arrived")]
    assert backend.log == expected


async def test_sse_events_arrive_as_emitted(tmp_path: Path, sse_backend: SseBackend) -> None:
    async with proxy_running(tmp_path, [backend_route(sse_backend.port)]) as proxy:
        parser = _EventParser(sse_backend)
        client = await HttpClient.connect(proxy.port)
        try:
            # A generous guard: a proxy that buffers stalls the stream for good.
            with trio.fail_after(30):
                response = await client.request(
                    "GET",
                    f"/events?n={EVENTS}",
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
    _check_lockstep(parser, sse_backend)
    assert access["status"] == 200
    assert access["error"] is None


async def test_sse_events_arrive_as_emitted_httpx(tmp_path: Path, sse_backend: SseBackend) -> None:
    """The same with a common client reading the stream incrementally."""
    async with proxy_running(tmp_path, [backend_route(sse_backend.port)]) as proxy:
        parser = _EventParser(sse_backend)
        with trio.fail_after(30):
            async with (
                httpx.AsyncClient(base_url=proxy.url) as client,
                client.stream("GET", f"/events?n={EVENTS}") as response,
            ):
                assert response.status_code == 200
                async for data in response.aiter_raw():
                    parser.feed(data)
    _check_lockstep(parser, sse_backend)
