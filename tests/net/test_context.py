"""The worker context's accounting: an access line is written only after the request it
describes was counted in the published metrics (a scrape never sees a request in the
log that the counters do not have), in batches or line by line."""

from __future__ import annotations

import time

import pytest

from proxy.config import from_mapping
from proxy.metrics import metrics
from proxy.protocol.exchange import Exchange
from proxy.worker import build_context

REQUESTS = 70  # more than one batch of access lines


class CountingStream:
    """Stands in for stdout: notes, at each write, how many lines it carried and how
    many requests the published counter had by then."""

    def __init__(self, counted: object) -> None:
        self.counted = counted
        self.writes: list[tuple[int, float]] = []

    def write(self, data: bytes) -> None:
        self.writes.append((data.count(b"\n"), self.counted()))  # type: ignore[operator]

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("mode", ["batch", "line"])
def test_each_access_line_is_written_after_its_request_was_counted(mode: str) -> None:
    config = from_mapping(
        {
            "routes": [{"prefix": "/counted-" + mode, "backends": ["http://127.0.0.1:9"]}],
            "log": {"access_log": True, "access_flush": mode},
        },
        "test",
    )
    ctx = build_context(config, 0)
    assert ctx.access_log is not None
    route = ctx.routes.match("/counted-" + mode)
    assert route is not None
    series = metrics().requests.labels(route.prefix, "200")
    before = series._value.get()
    stream = CountingStream(lambda: series._value.get() - before)
    ctx.access_log._stream = stream
    for _ in range(REQUESTS):
        x = Exchange(b"GET", route.prefix.encode(), time.perf_counter(), route)
        x.status = 200
        ctx.account(x, ("127.0.0.1", 1))
    ctx.flush()
    written = 0
    for lines, counted in stream.writes:
        written += lines
        assert counted >= written, stream.writes
    assert written == REQUESTS
    if mode == "line":
        assert [lines for lines, _ in stream.writes] == [1] * REQUESTS
    else:
        assert len(stream.writes) < REQUESTS
