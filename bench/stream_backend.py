"""A cheap backend for held streams: SSE (``GET /sse``) and WebSocket (``GET /ws``).

One process, one port, asyncio protocol callbacks (no task per connection), so a process
holds thousands of idle streams for a few hundred bytes each; run several for more.
Streams stay silent until told to broadcast. Controlled by JSON lines on stdin:

- ``{"cmd": "broadcast", "seq": S, "id": I}``: write event S to every open stream; the
  event carries S, the broadcast's start and this write's ``CLOCK_MONOTONIC`` time (ns,
  the same clock in every process of the host), so a client can measure both the delay
  from the broadcast's start and from the write to its own socket. Answers with the
  number of streams and the fan-out's duration.
- ``{"cmd": "stats", "id": I}``: how many streams are open.

It exits when stdin closes. SSE events go out as ``data: S T_BROADCAST T_WRITE`` in
chunked framing; WebSocket events as unmasked text frames with the same three numbers.

    python -m bench.stream_backend --port PORT [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import sys
import time
from typing import Any

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_SSE_OPEN = b": ok\n\n"
_MAX_HEAD = 16384


class Server:
    def __init__(self) -> None:
        self.sse: set[StreamConn] = set()
        self.ws: set[StreamConn] = set()

    def broadcast(self, seq: int) -> dict[str, Any]:
        now = time.monotonic_ns
        started = now()
        for conn in self.sse:
            payload = b"data: %d %d %d\n\n" % (seq, started, now())
            conn.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        for conn in self.ws:
            payload = b"%d %d %d" % (seq, started, now())
            conn.write(b"\x81" + bytes((len(payload),)) + payload)
        return {
            "streams": len(self.sse) + len(self.ws),
            "seconds": (now() - started) / 1e9,
        }


class StreamConn(asyncio.Protocol):
    __slots__ = ("buf", "kind", "server", "transport")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.kind = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.kind:
            return  # nothing a client sends on a held stream matters here
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > _MAX_HEAD:
                self._refuse(b"431 Request Header Fields Too Large")
            return
        lines = self.buf[:end].split(b"\r\n")
        self.buf = b""
        parts = lines[0].split(b" ")
        path = parts[1].split(b"?")[0] if len(parts) == 3 else b""
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if path.startswith(b"/ws") and headers.get(b"upgrade", b"").lower() == b"websocket":
            key = headers.get(b"sec-websocket-key", b"")
            accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
            self.write(
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                b"connection: Upgrade\r\nsec-websocket-accept: " + accept + b"\r\n\r\n"
            )
            self.kind = "ws"
            self.server.ws.add(self)
        elif path.startswith(b"/sse"):
            self.write(_SSE_HEAD + b"%x\r\n%s\r\n" % (len(_SSE_OPEN), _SSE_OPEN))
            self.kind = "sse"
            self.server.sse.add(self)
        else:
            self._refuse(b"404 Not Found")

    def _refuse(self, status: bytes) -> None:
        self.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.sse.discard(self)
        self.server.ws.discard(self)
        self.transport = None


def _say(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


async def main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = Server()
    listener = await loop.create_server(lambda: StreamConn(server), host, port, backlog=65535)
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = json.loads(line)
        answer: dict[str, Any] = {"id": cmd.get("id", 0)}
        if cmd["cmd"] == "broadcast":
            answer.update(server.broadcast(int(cmd["seq"])))
        elif cmd["cmd"] == "stats":
            answer.update(streams=len(server.sse) + len(server.ws))
        _say(answer)
    listener.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port))
