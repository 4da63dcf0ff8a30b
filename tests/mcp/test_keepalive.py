"""Keep-alive comments hold an idle MCP event stream open through an idle cut-off.

A real HAProxy (``mode http``, ``timeout client 5s``, ``timeout server 5s``, no
``timeout tunnel``: an SSE response in HTTP mode is no tunnel, so the two 5 s inactivity
timeouts are what applies to it) stands in front of a two-worker Switchboard, which stands
in front of a backend whose event stream sends its head and one event, then nothing.

- Control, on a route with ``keepalive_interval = 0``: HAProxy's server timeout cuts the
  silent stream (HAProxy logs ``sD``), never sooner than 5 s. This proves the cutter cuts.
- On a route with ``keepalive_interval = 2``: the same stream stays open for 15.5 s (3x
  the cut-off; the client closes it, HAProxy logs ``CD``), and the client receives only
  ``: keep-alive`` comments: at least one per cut-off window, never more than one per
  interval. (Gaps between comments are printed, not asserted: on a busy machine the
  test's own clock says as much about the test as about the proxy.)

Both streams run at once, over one HAProxy and one Switchboard.

The GET carries ``MCP-Protocol-Version: 2025-11-25`` and no ``Mcp-Session-Id``: the proxy
(``proxy.mcp_routing.decide``) then takes it as a 2025-era (stateful) stream, picks a
replica and relays the body as is. Without the version header it would be a legacy
2024-11-05 ``/sse`` stream, whose first event must be an ``endpoint`` event for the proxy
to rewrite; that is not what this test is about.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest
import trio

from tests.support.backends import poll_until, proxy_running
from tests.support.haproxy import HAProxyProcess, run_haproxy_config
from tests.support.threads import entered_in_thread

CUT_AFTER = 5.0
"""HAProxy's ``timeout client`` and ``timeout server``."""
KEEPALIVE = 2.0
HOLD = 3 * CUT_AFTER + 0.5
MIN_COMMENTS = int(HOLD // CUT_AFTER)
"""A stream not cut had a byte in every cut-off window."""
MAX_COMMENTS = int(HOLD // KEEPALIVE)
"""A comment comes after KEEPALIVE seconds of silence, never sooner."""
KEEPALIVE_COMMENT = b": keep-alive"
FIRST_EVENT = b'id: 1\nevent: hello\ndata: {"hello": true}\n\n'
VERSION = "2025-11-25"
RECV_SIZE = 65536


# -- the backend: one event, then silence -------------------------------------------------


@dataclass(eq=False)
class SilentEventBackend:
    """``GET`` answers a chunked ``text/event-stream`` (no Content-Length, so the proxy
    frames the body and may add to it) with FIRST_EVENT, then sends nothing until the
    connection is closed."""

    port: int = 0
    targets: list[str] = field(default_factory=list)
    open_streams: dict[str, int] = field(default_factory=dict)
    """Streams still held open, by request target."""

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        buffer = b""
        try:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(RECV_SIZE)
                if not data:
                    return
                buffer += data
            target = buffer.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
            self.targets.append(target)
            self.open_streams[target] = self.open_streams.get(target, 0) + 1
            try:
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
                    + b"%x\r\n%s\r\n"
                    % (len(FIRST_EVENT), FIRST_EVENT)
                )
                while await stream.receive_some(RECV_SIZE):
                    pass
            finally:
                self.open_streams[target] -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


# -- the cutter: HAProxy with 5 s idle timeouts -------------------------------------------


def cutter_config(listen_port: int, server_port: int, stats_socket: Path) -> str:
    seconds = f"{CUT_AFTER:g}s"
    return "\n".join(
        [
            "global",
            "    maxconn 256",
            "    log stdout format raw local0",
            f"    stats socket {stats_socket} mode 600 level admin",
            "",
            "defaults",
            "    mode http",
            "    log global",
            "    option httplog",
            "    timeout connect 2s",
            f"    timeout client {seconds}",
            f"    timeout server {seconds}",
            "",
            "frontend fe",
            f"    bind 127.0.0.1:{listen_port}",
            "    default_backend switchboard",
            "",
            "backend switchboard",
            f"    server sb 127.0.0.1:{server_port}",
            "",
        ]
    )


def run_cutter(tmp_path: Path, server_port: int) -> AbstractContextManager[HAProxyProcess]:
    return run_haproxy_config(
        tmp_path,
        lambda port, stats_socket: cutter_config(port, server_port, stats_socket),
        name="cutter",
    )


@asynccontextmanager
async def cutter_running(tmp_path: Path, server_port: int) -> AsyncIterator[HAProxyProcess]:
    async with entered_in_thread(run_cutter(tmp_path, server_port)) as haproxy:
        yield haproxy


# -- the client ---------------------------------------------------------------------------


@dataclass(eq=False)
class StreamRecord:
    sent_at: float | None = None
    stopped_at: float | None = None
    """When the client stopped reading (cut, ended, or HOLD reached)."""
    status: int | None = None
    content_type: str = ""
    head_at: float | None = None
    blocks: list[tuple[float, bytes]] = field(default_factory=list)
    """Each complete block (up to its blank line) and when it arrived."""
    ended_at: float | None = None
    end: str = "open"
    """"open" (still open when the client stopped reading), "cut" (closed without the
    body's end), "end" (the body ended) or "error: ...". """

    @property
    def comments(self) -> list[float]:
        return [t for t, block in self.blocks if block == KEEPALIVE_COMMENT]


async def read_stream(port: int, path: str, record: StreamRecord, hold: float) -> None:
    """GET ``path`` as a 2025-11-25 standalone stream; read for ``hold`` seconds at most."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=path,
        headers=[
            (b"host", f"127.0.0.1:{port}".encode()),
            (b"accept", b"text/event-stream"),
            (b"mcp-protocol-version", VERSION.encode()),
        ],
    )
    buffer = b""
    try:
        with trio.move_on_after(hold):
            record.sent_at = trio.current_time()
            await stream.send_all(
                (conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b"")
            )
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(RECV_SIZE))
                    continue
                now = trio.current_time()
                if type(event) is h11.Response:
                    record.status = event.status_code
                    record.head_at = now
                    for name, value in event.headers:
                        if name == b"content-type":
                            record.content_type = value.decode("latin-1")
                elif type(event) is h11.Data:
                    buffer += event.data
                    while b"\n\n" in buffer:
                        block, buffer = buffer.split(b"\n\n", 1)
                        record.blocks.append((now, block))
                elif type(event) is h11.EndOfMessage:
                    record.end, record.ended_at = "end", now
                    return
                else:
                    record.end, record.ended_at = f"error: {event!r}", now
                    return
    except h11.RemoteProtocolError:
        # h11's word for a connection closed inside a chunked body.
        record.end, record.ended_at = "cut", trio.current_time()
    except (trio.BrokenResourceError, OSError) as exc:
        record.end, record.ended_at = f"error: {exc!r}", trio.current_time()
    finally:
        record.stopped_at = trio.current_time()
        await trio.aclose_forcefully(stream)


_HTTPLOG = re.compile(
    r" (?P<timers>-?\d+/-?\d+/-?\d+/-?\d+/-?\d+) (?P<status>\d{3}) \d+ \S+ \S+ "
    r"(?P<term>\S{4}) .*\"GET (?P<path>\S+) HTTP/1\.1\"$"
)


def haproxy_outcomes(log: str) -> dict[str, tuple[str, int]]:
    """Request path -> (termination state, total time in ms) from HAProxy's httplog
    lines (``sD``: the server-side timeout fired in the data phase; ``CD``: the client
    closed during the data phase)."""
    found: dict[str, tuple[str, int]] = {}
    for line in log.splitlines():
        match = _HTTPLOG.search(line)
        if match is not None:
            total = int(match["timers"].rsplit("/", 1)[1])
            found[match["path"]] = (match["term"], total)
    return found


@pytest.mark.slow
async def test_keepalive_comments_hold_a_stream_open_through_an_idle_cutoff(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend = SilentEventBackend()
    port: int = await nursery.start(backend.serve)
    url = f"http://127.0.0.1:{port}"
    routes = [
        {"prefix": "/ka", "kind": "mcp", "backends": [url], "keepalive_interval": KEEPALIVE},
        {"prefix": "/quiet", "kind": "mcp", "backends": [url], "keepalive_interval": 0},
    ]
    control = StreamRecord()
    kept = StreamRecord()
    async with (
        proxy_running(tmp_path, routes, workers=2) as proxy,
        cutter_running(tmp_path, proxy.port) as haproxy,
    ):
        async with trio.open_nursery() as streams:
            streams.start_soon(read_stream, haproxy.port, "/quiet/mcp", control, HOLD)
            streams.start_soon(read_stream, haproxy.port, "/ka/mcp", kept, HOLD)
            await trio.sleep(HOLD - 0.5)
            # The backend still holds the kept stream: the proxy never gave up on it.
            still_open = dict(backend.open_streams)
        # HAProxy logs a request when it ends; the kept one ends as the client closes.
        await poll_until(lambda: "/ka/mcp" in haproxy_outcomes(haproxy.log), limit=5)
        outcomes = haproxy_outcomes(haproxy.log)

    arrivals = [t for t, _ in kept.blocks]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    print(
        f"\nkeepalive: control {control.end} {(control.ended_at or 0) - (control.sent_at or 0):.2f}"
        f" s after the request; kept stream {kept.end} after {HOLD} s, {len(kept.comments)} "
        f"comments, gaps {[round(gap, 2) for gap in gaps]}; HAProxy: {outcomes}; upstream "
        f"streams open at {HOLD - 0.5} s: {still_open}"
    )
    for record in (control, kept):
        assert record.status == 200, record
        assert record.content_type == "text/event-stream", record
        assert record.blocks and record.blocks[0][1] + b"\n\n" == FIRST_EVENT, record.blocks

    # Control: nothing added, and HAProxy's server timeout cut the stream ~5 s after its
    # last byte (never sooner than 5 s after the request, which came before that byte).
    assert control.comments == [], control.blocks
    assert control.end == "cut", control
    assert control.ended_at is not None and control.sent_at is not None
    assert control.ended_at - control.sent_at >= CUT_AFTER - 0.05, control
    term, total_ms = outcomes["/quiet/mcp"]
    assert term.startswith("sD"), outcomes  # HAProxy's server timeout, in the data phase
    assert total_ms >= CUT_AFTER * 1000, outcomes

    # Keep-alive: open for 3x the cut-off, a comment every ~KEEPALIVE seconds.
    assert kept.end == "open", kept
    assert [block for _, block in kept.blocks[1:]] == [KEEPALIVE_COMMENT] * (len(kept.blocks) - 1)
    assert MIN_COMMENTS <= len(kept.comments) <= MAX_COMMENTS, kept.comments
    term, total_ms = outcomes["/ka/mcp"]
    assert term.startswith("CD") and total_ms >= HOLD * 1000 - 100, outcomes  # closed by us
    assert still_open.get("/ka/mcp") == 1, f"the kept stream's upstream was closed: {still_open}"
    assert sorted(backend.targets) == ["/ka/mcp", "/quiet/mcp"], backend.targets
