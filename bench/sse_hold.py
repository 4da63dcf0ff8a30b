"""Hold many idle SSE streams or WebSockets open, from several processes and source
addresses, and time the events a backend broadcasts to all of them.

A holder process (``python -m bench.sse_hold ...``) opens ``--count`` connections from
its own source address (127.x.y.z: every address has its own ~28k ephemeral ports per
destination), at most ``--concurrency`` at a time, counts a connection as open once
the ``200 text/event-stream`` head (or the ``101``) arrived, then holds them. asyncio
protocol callbacks keep it cheap: no task per connection. For every event it records
two delays (``bench.hist``): from the broadcast's start in the backend, and from the
backend's write to this very socket. A connection that ends while held is a drop; a
sequence number skipped is a missed event.

Control is by JSON lines on stdin (answers carry the command's ``id``): ``status``
(``seq``: how many connections have received that event), ``report`` (histograms,
drops, missed events; ``reset`` clears the histograms), ``close``. It exits when stdin
closes. ``HolderFleet`` drives a set of holder processes from the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence

from bench.common import JSON, JsonChild
from bench.hist import Histogram

WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def source_address(index: int) -> str:
    """The source address of holder ``index``: 127.0.0.10, 127.0.0.11, ... (all of
    127.0.0.0/8 is local on Linux, no setup needed)."""
    return f"127.{(index // 200) % 250}.{1 + index // 50000}.{10 + index % 200}"


class Holder:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.conns: list[Client] = []
        self.open = 0
        self.failed = 0
        self.dropped = 0
        self.drop_reasons: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.events = 0
        self.missed = 0
        self.closing = False
        self.from_broadcast = Histogram()
        self.from_write = Histogram()
        self.got: Counter[int] = Counter()
        """How many connections received each event (by sequence number)."""

    def on_event(self, conn: Client, payload: bytes, now: int) -> None:
        parts = payload.split()
        if len(parts) != 3:
            return
        seq, started, written = int(parts[0]), int(parts[1]), int(parts[2])
        self.events += 1
        if seq > conn.last_seq + 1:
            self.missed += seq - conn.last_seq - 1
        conn.last_seq = max(conn.last_seq, seq)
        self.got[seq] += 1
        self.from_broadcast.add((now - started) / 1000)
        self.from_write.add((now - written) / 1000)

    def on_lost(self, conn: Client, reason: str) -> None:
        if conn.is_open and not self.closing:
            self.dropped += 1
            self.drop_reasons[reason] += 1
        if conn.is_open:
            conn.is_open = False
            self.open -= 1


class Client(asyncio.Protocol):
    """One held connection: sends the request, checks the head, decodes events."""

    __slots__ = (
        "body",
        "chunk_left",
        "chunked",
        "head",
        "holder",
        "is_open",
        "last_seq",
        "opened",
        "request",
        "transport",
    )

    def __init__(self, holder: Holder, request: bytes, opened: asyncio.Future[None]) -> None:
        self.holder = holder
        self.request = request
        self.opened = opened
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.body = b""
        self.chunked = False
        self.chunk_left = -1  # -1: at a size line, -2: at the CRLF after a chunk
        self.is_open = False
        self.last_seq = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if not self.is_open:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end].lower(), self.head[end + 4 :]
            self.head = b""
            want = b" 101 " if self.holder.kind == "ws" else b" 200 "
            if want not in head.split(b"\r\n", 1)[0] + b" ":
                self._fail(head.split(b"\r\n", 1)[0].decode(errors="replace"))
                return
            self.chunked = b"transfer-encoding: chunked" in head
            self.is_open = True
            self.holder.open += 1
            if not self.opened.done():
                self.opened.set_result(None)
        if self.holder.kind == "ws":
            self._frames(data, now)
        elif self.chunked:
            self._dechunk(data, now)
        else:
            self._sse(data, now)

    def _fail(self, reason: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.close()

    def _dechunk(self, data: bytes, now: int) -> None:
        buf = self.body + data
        out = []
        while buf:
            if self.chunk_left == -1:
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                size = int(buf[:end].split(b";")[0], 16)
                buf = buf[end + 2 :]
                if size == 0:
                    self.holder.on_lost(self, "stream ended")
                    buf = b""
                    break
                self.chunk_left = size
            elif self.chunk_left == -2:
                if len(buf) < 2:
                    break
                buf = buf[2:]
                self.chunk_left = -1
            else:
                piece = buf[: self.chunk_left]
                out.append(piece)
                buf = buf[len(piece) :]
                self.chunk_left -= len(piece)
                if self.chunk_left == 0:
                    self.chunk_left = -2
        self.body = buf
        if out:
            self._sse(b"".join(out), now)

    def _sse(self, data: bytes, now: int) -> None:
        # The event text not yet complete is kept in self.head (unused once open); with
        # chunked framing self.body holds the bytes not yet de-chunked.
        text = self.head + data
        while (end := text.find(b"\n\n")) >= 0:
            for line in text[:end].split(b"\n"):
                if line.startswith(b"data: "):
                    self.holder.on_event(self, line[6:], now)
            text = text[end + 2 :]
        self.head = text

    def _frames(self, data: bytes, now: int) -> None:
        buf = self.body + data
        while len(buf) >= 2:
            opcode, size = buf[0] & 0x0F, buf[1] & 0x7F
            offset = 2
            if size == 126:
                if len(buf) < 4:
                    break
                size, offset = int.from_bytes(buf[2:4], "big"), 4
            elif size == 127:
                if len(buf) < 10:
                    break
                size, offset = int.from_bytes(buf[2:10], "big"), 10
            if buf[1] & 0x80:
                offset += 4
            if len(buf) < offset + size:
                break
            payload, buf = buf[offset : offset + size], buf[offset + size :]
            if opcode == 1:
                self.holder.on_event(self, payload, now)
            elif opcode == 8:
                self.holder.on_lost(self, "websocket closed by server")
        self.body = buf

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(str(exc) if exc else "closed before head"))
        self.holder.on_lost(self, type(exc).__name__ if exc else "closed by peer")
        self.transport = None


def _say(msg: JSON) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


async def _open_all(
    holder: Holder,
    host: str,
    ports: Sequence[int],
    source: str,
    count: int,
    concurrency: int,
    open_timeout: float,
) -> None:
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(concurrency)

    async def open_one(i: int) -> None:
        port = ports[i % len(ports)]
        if holder.kind == "ws":
            request = (
                f"GET /ws HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nupgrade: websocket\r\n"
                f"connection: Upgrade\r\nsec-websocket-key: {WS_KEY.decode()}\r\n"
                "sec-websocket-version: 13\r\n\r\n"
            ).encode()
        else:
            request = (
                f"GET /sse?c={i} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
                "accept: text/event-stream\r\ncache-control: no-cache\r\n\r\n"
            ).encode()
        opened: asyncio.Future[None] = loop.create_future()
        client = Client(holder, request, opened)
        try:
            async with asyncio.timeout(open_timeout):
                await loop.create_connection(lambda: client, host, port, local_addr=(source, 0))
                await opened
            holder.conns.append(client)
        except (OSError, TimeoutError) as exc:
            holder.failed += 1
            holder.errors[str(exc)[:80] or type(exc).__name__] += 1
            opened.cancel()
            if client.transport is not None:
                client.transport.abort()
        finally:
            slots.release()

    tasks = set()
    for i in range(count):
        await slots.acquire()
        task = asyncio.create_task(open_one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))


async def holder_main(args: argparse.Namespace) -> None:
    holder = Holder(args.kind)
    ports = [int(p) for p in args.ports.split(",")]

    async def report_progress() -> None:
        while True:
            _say({"type": "progress", "open": holder.open, "failed": holder.failed})
            await asyncio.sleep(0.5)

    progress_task = asyncio.create_task(report_progress())
    started = time.monotonic_ns()
    await _open_all(
        holder, args.host, ports, args.source, args.count, args.concurrency, args.timeout
    )
    ended = time.monotonic_ns()
    progress_task.cancel()
    _say(
        {
            "type": "opened",
            "open": holder.open,
            "failed": holder.failed,
            "errors": dict(holder.errors),
            "t_start_ns": started,
            "t_end_ns": ended,
        }
    )
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = json.loads(line)
        answer: JSON = {"id": cmd.get("id", 0), "open": holder.open, "dropped": holder.dropped}
        if cmd["cmd"] == "status":
            answer["have"] = holder.got[int(cmd.get("seq", 0))]
        elif cmd["cmd"] == "report":
            answer.update(
                events=holder.events,
                missed=holder.missed,
                drop_reasons=dict(holder.drop_reasons),
                from_broadcast=holder.from_broadcast.to_json(),
                from_write=holder.from_write.to_json(),
            )
            if cmd.get("reset"):
                holder.from_broadcast = Histogram()
                holder.from_write = Histogram()
            if "final_seq" in cmd:
                final = int(cmd["final_seq"])
                answer["behind"] = sum(1 for c in holder.conns if c.is_open and c.last_seq < final)
        elif cmd["cmd"] == "close":
            holder.closing = True
            for conn in holder.conns:
                if conn.transport is not None:
                    conn.transport.close()
            _say(answer)
            await asyncio.sleep(0.2)
            return
        _say(answer)


class HolderFleet:
    """Several holder processes, ``per_process`` connections at most each, one source
    address each, opening at the same time."""

    def __init__(
        self,
        kind: str,
        ports: Sequence[int],
        total: int,
        *,
        per_process: int = 4000,
        concurrency: int = 64,
        first_source: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        n = max(1, math.ceil(total / per_process))
        counts = [total // n + (1 if i < total % n else 0) for i in range(n)]
        self.total = total
        self.children = [
            JsonChild(
                f"holder-{i}",
                [
                    sys.executable,
                    "-m",
                    "bench.sse_hold",
                    "--kind",
                    kind,
                    "--host",
                    host,
                    "--ports",
                    ",".join(str(p) for p in ports),
                    "--source",
                    source_address(first_source + i),
                    "--count",
                    str(count),
                    "--concurrency",
                    str(concurrency),
                ],
            )
            for i, count in enumerate(counts)
        ]

    def wait_opened(self, on_progress: Callable[[int, int], None], timeout: float) -> JSON:
        """Wait until every holder has tried all its connections; calls ``on_progress(open,
        failed)`` about once a second."""
        done: dict[int, JSON] = {}
        deadline = time.monotonic() + timeout
        last = 0.0
        while len(done) < len(self.children):
            for i, child in enumerate(self.children):
                if i not in done:
                    msg = child.poll_event("opened")
                    if msg is not None:
                        done[i] = msg
                    elif child.process.poll() is not None:
                        raise RuntimeError(f"{child.name} exited with {child.process.returncode}")
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                opened = sum(
                    int(done[i]["open"]) if i in done else int(c.latest_progress.get("open", 0))
                    for i, c in enumerate(self.children)
                )
                failed = sum(
                    int(done[i]["failed"]) if i in done else int(c.latest_progress.get("failed", 0))
                    for i, c in enumerate(self.children)
                )
                on_progress(opened, failed)
            if time.monotonic() > deadline:
                raise TimeoutError(f"connections not open after {timeout:.0f} s")
            time.sleep(0.05)
        errors: Counter[str] = Counter()
        for msg in done.values():
            errors.update(msg["errors"])
        start = min(int(m["t_start_ns"]) for m in done.values())
        end = max(int(m["t_end_ns"]) for m in done.values())
        return {
            "open": sum(int(m["open"]) for m in done.values()),
            "failed": sum(int(m["failed"]) for m in done.values()),
            "errors": dict(errors),
            "seconds": (end - start) / 1e9,
        }

    def _all(self, cmd: JSON, timeout: float = 60.0) -> list[JSON]:
        ids = [c.send(cmd) for c in self.children]
        return [c.reply(i, timeout) for c, i in zip(self.children, ids, strict=True)]

    def status(self, seq: int = 0) -> JSON:
        """open, dropped, and ``have``: how many connections received event ``seq``."""
        answers = self._all({"cmd": "status", "seq": seq})
        return {
            "open": sum(int(a["open"]) for a in answers),
            "dropped": sum(int(a["dropped"]) for a in answers),
            "have": sum(int(a["have"]) for a in answers),
        }

    def report(self, *, reset: bool, final_seq: int | None = None) -> JSON:
        cmd: JSON = {"cmd": "report", "reset": reset}
        if final_seq is not None:
            cmd["final_seq"] = final_seq
        answers = self._all(cmd)
        reasons: Counter[str] = Counter()
        for a in answers:
            reasons.update(a["drop_reasons"])
        return {
            "open": sum(int(a["open"]) for a in answers),
            "dropped": sum(int(a["dropped"]) for a in answers),
            "drop_reasons": dict(reasons),
            "events": sum(int(a["events"]) for a in answers),
            "missed": sum(int(a["missed"]) for a in answers),
            "behind": sum(int(a.get("behind", 0)) for a in answers),
            "from_broadcast": Histogram.merged(a["from_broadcast"] for a in answers),
            "from_write": Histogram.merged(a["from_write"] for a in answers),
        }

    def close(self) -> None:
        for child in self.children:
            if child.process.poll() is None:
                with contextlib.suppress(TimeoutError, OSError):
                    child.request({"cmd": "close"}, timeout=30)
            child.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("sse", "ws"), default="sse")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ports", required=True, help="comma-separated; spread round-robin")
    parser.add_argument("--source", default="127.0.0.10")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=60.0)
    asyncio.run(holder_main(parser.parse_args()))


if __name__ == "__main__":
    main()
