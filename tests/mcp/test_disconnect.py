"""A client leaving a POST's SSE answer: in the 2026-07-28 era that cancels the request
upstream at once; in the 2025-11-25 era it does not, and the backend finishes its answer
without seeing a disconnect."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h11
import msgspec
import trio

from tests.support.backends import poll_until, proxy_running

EVENTS = 10
INTERVAL = 0.1
KEY_SECTIONS = {"mcp.session_keys": {"k1": "d" * 40}}


@dataclass
class StreamingBackend:
    """Answers every POST with an SSE stream of EVENTS events, INTERVAL apart, the last
    being the JSON-RPC response; records how each answer ended."""

    outcomes: list[str] = field(default_factory=list)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request_id = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.Data):
                body += event.data
            if isinstance(event, h11.EndOfMessage):
                request_id = msgspec.json.decode(body)["id"]
                break
        head = h11.Response(status_code=200, headers=[(b"content-type", b"text/event-stream")])
        try:
            await stream.send_all(conn.send(head) or b"")
            for i in range(EVENTS - 1):
                note = {
                    "jsonrpc": "2.0",
                    "method": "notifications/progress",
                    "params": {"progressToken": 1, "progress": i},
                }
                data = b"data: " + msgspec.json.encode(note) + b"\n\n"
                await stream.send_all(conn.send(h11.Data(data=data)) or b"")
                await trio.sleep(INTERVAL)
            result = {"jsonrpc": "2.0", "id": request_id, "result": {"content": []}}
            last = b"data: " + msgspec.json.encode(result) + b"\n\n"
            await stream.send_all(
                (conn.send(h11.Data(data=last)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
            )
            self.outcomes.append("finished")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.outcomes.append("disconnected")
        finally:
            await stream.aclose()


async def _post_and_leave(port: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Send the POST, read the first event, and close the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="POST",
        target="/mcp",
        headers=[
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"accept", b"application/json, text/event-stream"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
    )
    await stream.send_all((conn.send(request) or b"") + (conn.send(h11.Data(data=body)) or b""))
    got = b""
    while b"\n\n" not in got:
        got += await stream.receive_some(65536)
    await stream.aclose()


async def _run(
    tmp_path: Path, nursery: trio.Nursery, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[StreamingBackend, float]:
    backend = StreamingBackend()
    port = await nursery.start(backend.serve)
    route = {"prefix": "/mcp", "kind": "mcp", "backends": [f"http://127.0.0.1:{port}"]}
    async with proxy_running(tmp_path, [route], workers=1, sections=KEY_SECTIONS) as proxy:
        left_at = trio.current_time()
        await _post_and_leave(proxy.port, headers, body)
        await poll_until(lambda: bool(backend.outcomes), limit=EVENTS * INTERVAL + 5)
        return backend, trio.current_time() - left_at


async def test_2026_era_leaving_cancels_upstream(tmp_path: Path, nursery: trio.Nursery) -> None:
    body = msgspec.json.encode(
        {
            "jsonrpc": "2.0",
            "id": 5,
            "method": "tools/call",
            "params": {
                "name": "slow",
                "arguments": {},
                "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"},
            },
        }
    )
    headers = [
        (b"mcp-protocol-version", b"2026-07-28"),
        (b"mcp-method", b"tools/call"),
        (b"mcp-name", b"slow"),
    ]
    backend, elapsed = await _run(tmp_path, nursery, headers, body)
    assert backend.outcomes == ["disconnected"]
    assert elapsed < EVENTS * INTERVAL  # noticed long before the answer would have ended


async def test_2025_era_leaving_lets_the_request_finish(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    body = msgspec.json.encode(
        {
            "jsonrpc": "2.0",
            "id": 5,
            "method": "tools/call",
            "params": {"name": "slow", "arguments": {}},
        }
    )
    headers = [(b"mcp-protocol-version", b"2025-11-25")]
    backend, elapsed = await _run(tmp_path, nursery, headers, body)
    assert backend.outcomes == ["finished"]
    assert elapsed >= (EVENTS - 2) * INTERVAL
