"""A client leaving a POST's SSE answer: in the 2026-07-28 era that cancels the request
upstream at once; in the 2025-11-25 era it does not, and the backend finishes its answer
without seeing a disconnect.

No clock decides: in the first case the backend, after its first event, waits for the
proxy to close the upstream connection (it never would finish otherwise); in the second
it goes on only once the client has left, then sends the rest of its answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h11
import msgspec
import trio

from tests.support.backends import poll_until, proxy_running

EVENTS = 10
GUARD = 60.0
"""How long the test waits for an outcome: a guard against a hang."""
KEY_SECTIONS = {"mcp.session_keys": {"k1": "d" * 40}}


@dataclass
class StreamingBackend:
    """Answers every POST with an SSE stream of EVENTS events, the last being the JSON-RPC
    response; records how each answer ended. After the first event it waits: with
    ``until_closed``, until the proxy closes the connection; else until ``client_left``."""

    until_closed: bool
    outcomes: list[str] = field(default_factory=list)
    client_left: trio.Event = field(default_factory=trio.Event)

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
                if i == 0 and self.until_closed:
                    while await stream.receive_some(65536):
                        pass  # nothing more is sent upstream; only the close counts
                    raise trio.BrokenResourceError("the proxy closed the connection")
                if i == 0:
                    await self.client_left.wait()
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
    tmp_path: Path,
    nursery: trio.Nursery,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    until_closed: bool,
) -> StreamingBackend:
    backend = StreamingBackend(until_closed)
    port = await nursery.start(backend.serve)
    route = {"prefix": "/mcp", "kind": "mcp", "backends": [f"http://127.0.0.1:{port}"]}
    async with proxy_running(tmp_path, [route], workers=1, sections=KEY_SECTIONS) as proxy:
        await _post_and_leave(proxy.port, headers, body)
        backend.client_left.set()
        await poll_until(lambda: bool(backend.outcomes), limit=GUARD)
        return backend


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
    backend = await _run(tmp_path, nursery, headers, body, until_closed=True)
    assert backend.outcomes == ["disconnected"]


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
    backend = await _run(tmp_path, nursery, headers, body, until_closed=False)
    assert backend.outcomes == ["finished"]  # the rest was sent after the client left
