"""A recording backend and a raw client, for tests that speak HTTP/1.1 byte by byte.

``RecordingBackend`` is a plain trio TCP server on 127.0.0.1 (port 0) that keeps every
connection it accepted and every byte it received, so a test can assert that the proxy
forwarded nothing at all. Its ``behaviour`` decides how it answers:

* ``"ok"``: parse requests with h11 and answer each complete one with 200 and a small
  body, keeping the connection alive;
* ``"hang"``: accept, record, never answer;
* ``"slow_headers"``: like ``"ok"`` but wait ``delay`` seconds before the response head;
* ``"scripted"``: after the first complete request, keep reading for ``delay`` seconds
  (a close by the proxy meanwhile is recorded as ``eof`` and the backend then never
  answers), then write the raw bytes ``reply`` (any framing, or a cut one) and close.

``backend_in_thread`` serves a backend from a trio loop of its own, for a proxy shared by
the tests of a module (each test runs in a loop of its own).

The client half (``open_client``, ``read_response``, ``wait_for_access``) reads whatever
the proxy answers without interpreting the request it was sent, which h11's client role
cannot do for deliberately malformed requests.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import h11
import trio

from tests.support.proxy_process import ProxyProcess

Behaviour = Literal["ok", "hang", "slow_headers", "scripted"]
BACKEND_BODY = b"backend says hello\n"
WAIT = 30.0
"""Default seconds to wait for something another task or thread does: a guard, not a
measure of speed."""


@dataclass(eq=False)
class BackendConnection:
    """One connection the backend accepted."""

    received: bytearray = field(default_factory=bytearray)
    requests: list[h11.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    """One entry per request that arrived complete (its whole body)."""
    eof: bool = False
    """The peer (the proxy) closed its side."""
    answered: bool = False
    """``"scripted"``: the reply was written (the proxy had not closed first)."""


class RecordingBackend:
    def __init__(
        self, behaviour: Behaviour = "ok", *, delay: float = 0.0, reply: bytes = b""
    ) -> None:
        self.behaviour: Behaviour = behaviour
        self.delay = delay
        self.reply = reply
        self.port = 0
        self.connections: list[BackendConnection] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def bytes_received(self) -> int:
        return sum(len(c.received) for c in self.connections)

    @property
    def requests(self) -> list[h11.Request]:
        return [r for c in self.connections for r in c.requests]

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def wait_for(self, predicate: Callable[[RecordingBackend], object]) -> None:
        """Wait until ``predicate(self)`` holds; fail the test after ``WAIT`` seconds."""
        await eventually(lambda: bool(predicate(self)))

    async def _handle(self, stream: trio.SocketStream) -> None:
        record = BackendConnection()
        self.connections.append(record)
        conn = h11.Connection(h11.SERVER)
        body = bytearray()
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    record.eof = True
                    return
                record.received += data
                if self.behaviour == "hang":
                    continue
                conn.receive_data(data)
                while True:
                    try:
                        event = conn.next_event()
                    except h11.RemoteProtocolError:
                        return
                    if event is h11.NEED_DATA or event is h11.PAUSED:
                        break
                    if type(event) is h11.Request:
                        record.requests.append(event)
                        body.clear()
                    elif type(event) is h11.Data:
                        body += event.data
                    elif type(event) is h11.EndOfMessage:
                        record.bodies.append(bytes(body))
                        if self.behaviour == "scripted":
                            await self._scripted_reply(stream, record)
                            return
                        if self.behaviour == "slow_headers":
                            await trio.sleep(self.delay)
                        await self._answer(stream, conn)
                        if conn.our_state is not h11.DONE:
                            return
                        conn.start_next_cycle()
                    else:
                        return

    async def _scripted_reply(self, stream: trio.SocketStream, record: BackendConnection) -> None:
        with trio.move_on_after(self.delay):
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    record.eof = True
                    return
                record.received += data
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(self.reply)
        record.answered = True

    @staticmethod
    async def _answer(stream: trio.SocketStream, conn: h11.Connection) -> None:
        out = conn.send(
            h11.Response(
                status_code=200,
                headers=[
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(BACKEND_BODY)).encode()),
                ],
            )
        )
        out = (out or b"") + (conn.send(h11.Data(data=BACKEND_BODY)) or b"")
        out += conn.send(h11.EndOfMessage()) or b""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(out)


# -- the raw client ---------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name.lower():
                return value
        return None


class RawClient:
    """A TCP connection to the proxy with a receive buffer, for raw requests."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.local_port = int(stream.socket.getsockname()[1])
        """Matches the ``port`` of this connection's access-log lines."""
        self.opened = time.time()

    def logged(self, entry: dict[str, Any]) -> bool:
        """Whether a log line is this connection's: its port, and written after it was
        opened (loopback reuses a closed connection's port within seconds, so a proxy
        shared by many tests can have logged an earlier connection from the same one)."""
        if entry.get("port") != self.local_port:
            return False
        ts = entry.get("ts")
        return not isinstance(ts, str) or _unix(ts) >= self.opened - 0.001

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def read_response(self, within: float = 10.0) -> RawResponse:
        """Read one response head and its Content-Length body (the proxy's own answers
        and the test backend's always carry one); fail after ``within`` seconds."""
        with trio.fail_after(within):
            while b"\r\n\r\n" not in self.buffer:
                if not await self._fill():
                    raise AssertionError(f"EOF before a response head: {bytes(self.buffer)!r}")
            head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            version, status, reason = [*lines[0].split(b" ", 2), b""][:3]
            assert version == b"HTTP/1.1", lines[0]
            headers = []
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers.append((name.strip().lower(), value.strip()))
            self.buffer = bytearray(rest)
            response = RawResponse(int(status), reason, headers, b"")
            length = int(response.header(b"content-length") or b"0")
            while len(self.buffer) < length:
                if not await self._fill():
                    raise AssertionError("EOF inside a response body")
            response.body = bytes(self.buffer[:length])
            del self.buffer[:length]
            return response

    async def read_eof(self, within: float) -> bytes:
        """Everything received until EOF (a reset counts as EOF); fail after ``within``
        seconds."""
        with trio.fail_after(within):
            try:
                while await self._fill():
                    pass
            except trio.BrokenResourceError:
                pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def send_eof(self) -> None:
        """Half-close: ends the proxy's linger after an error response at once (the
        access line of a refused request is written when the linger ends)."""
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


def _unix(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


async def open_client(port: int) -> RawClient:
    return RawClient(await trio.open_tcp_stream("127.0.0.1", port))


async def eventually(predicate: Callable[[], bool], within: float = WAIT) -> None:
    """Wait until ``predicate()`` holds (state another task or the log-reader thread
    changes); fail the test after ``within`` seconds."""
    with trio.fail_after(within):
        while True:
            if predicate():
                return
            await trio.sleep(0.01)


async def wait_for_access(
    proxy: ProxyProcess, predicate: Callable[[dict[str, Any]], bool], within: float = WAIT
) -> dict[str, Any]:
    """The first access-log line matching ``predicate``, waiting for the log reader."""
    with trio.move_on_after(within):
        while True:
            for line in proxy.access_lines():
                if predicate(line):
                    return line
            await trio.sleep(0.02)
    raise AssertionError(
        f"no matching access-log line within {within} s; access lines: {proxy.access_lines()}"
    )


@contextlib.contextmanager
def backend_in_thread(backend: RecordingBackend) -> Iterator[RecordingBackend]:
    """Serve ``backend`` from its own trio loop in a thread until the block ends, so it
    outlives the loop of any one test (a proxy shared by a module's tests needs one
    backend throughout). Its records are plain lists: safe to read from another thread."""
    started = threading.Event()
    loop: list[tuple[trio.lowlevel.TrioToken, trio.CancelScope]] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            loop.append((trio.lowlevel.current_trio_token(), nursery.cancel_scope))
            await nursery.start(backend.serve)
            started.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    if not started.wait(WAIT):
        raise TimeoutError("the backend did not start")
    try:
        yield backend
    finally:
        token, scope = loop[0]
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(WAIT)
