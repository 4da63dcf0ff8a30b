"""An SSE client that resumes like a browser's ``EventSource``, and a backend to feed it.

- ``SseParser``: an incremental ``text/event-stream`` parser after WHATWG HTML §9.2.5/§9.2.6
  (CRLF, LF or CR line endings; ``event``, ``data``, ``id``, ``retry`` fields; comments).
  It reports event blocks and ``retry``-only blocks in order, and whether the stream
  stands between blocks, so a test can tell "ended at an event boundary with a retry
  hint" from "cut".
- ``ResumingSseClient``: one logical subscription. Each connection sends
  ``Last-Event-ID`` (the last ``id`` seen), and when a stream ends it waits the
  reconnection time (the last ``retry:`` value) and reconnects, as §9.2.3 describes.
  Every connection is recorded (status, ids received, how it ended).
- ``EventBackend``: a cheap raw-socket HTTP/1.1 backend (no h11: a test opens a thousand
  streams through it). ``GET /events`` is an endless chunked ``text/event-stream``
  numbered from ``Last-Event-ID + 1`` (0 without one), so a client that resumes sees no
  gap and no repeat; ``GET /slow?delay=S&size=N`` answers after ``S`` seconds (counted
  from ``slow_gate`` being set, if there is one) with ``N`` deterministic bytes
  (``pattern_chunks``), keep-alive. ``events_gate`` holds the streams' traffic back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from tests.support.backends import pattern_chunks

RECV_SIZE = 65536
_EOL = re.compile(rb"\r\n|\r|\n")
_CLOSED = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


# -- parsing ------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class SseEvent:
    id: str
    """The last event ID after this event's block (§9.2.6: it persists across events)."""
    event: str
    data: str


@dataclass(slots=True, frozen=True)
class RetryHint:
    """A block that carried only a ``retry`` field (what a draining proxy sends)."""

    milliseconds: int


class SseParser:
    """Incremental ``text/event-stream`` parser; ``feed`` returns the completed blocks."""

    def __init__(self) -> None:
        self._buffer = b""
        self._skip_lf = False  # the previous chunk ended with CR: an LF now is its partner
        self._data: list[str] = []
        self._event = ""
        self._block_fields: list[str] = []
        self._retry_in_block: int | None = None
        self._id_buffer = ""
        self.last_event_id = ""
        """The last event ID string: the id buffer as of the last dispatch (§9.2.6), so
        an event cut before its blank line does not count as received."""
        self.retry_ms: int | None = None
        """The reconnection time, as the last valid ``retry`` field set it."""

    @property
    def at_boundary(self) -> bool:
        """No partial line buffered and no field waiting for its blank line."""
        return not self._buffer and not self._block_fields

    def feed(self, data: bytes) -> list[SseEvent | RetryHint]:
        if self._skip_lf and data.startswith(b"\n"):
            data = data[1:]
        self._skip_lf = False
        buffer = self._buffer + data
        out: list[SseEvent | RetryHint] = []
        start = 0
        while True:
            match = _EOL.search(buffer, start)
            if match is None:
                break
            if match.group() == b"\r" and match.end() == len(buffer):
                self._skip_lf = True
            line = buffer[start : match.start()].decode("utf-8", "replace")
            start = match.end()
            block = self._line(line)
            if block is not None:
                out.append(block)
        self._buffer = buffer[start:]
        return out

    def _line(self, line: str) -> SseEvent | RetryHint | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        self._block_fields.append(name)
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self._id_buffer = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
            self._retry_in_block = int(value)
        return None

    def _dispatch(self) -> SseEvent | RetryHint | None:
        self.last_event_id = self._id_buffer
        fields, self._block_fields = self._block_fields, []
        retry, self._retry_in_block = self._retry_in_block, None
        data, self._data = self._data, []
        event, self._event = self._event, ""
        if data:
            return SseEvent(self.last_event_id, event or "message", "\n".join(data))
        if retry is not None and fields == ["retry"]:
            return RetryHint(retry)
        return None


# -- the resuming client ------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class SseConnection:
    """One connection of a subscription."""

    started: float
    last_event_id_sent: str | None
    status: int | None = None
    blocks: list[SseEvent | RetryHint] = field(default_factory=list)
    first_event_at: float | None = None
    ended_at: float | None = None
    end: str = "open"
    """"open" (still reading when the client stopped), "end" (the body ended: chunked
    terminator, then the connection closed), "eof" (closed without a body end),
    "refused" (a status other than 200) or "error: ..." (reset, protocol error)."""
    at_boundary_at_end: bool = False

    @property
    def ids(self) -> list[int]:
        return [int(b.id) for b in self.blocks if isinstance(b, SseEvent)]

    @property
    def ended_with_retry(self) -> int | None:
        """The ``retry`` value when the last block was a retry-only block and the stream
        ended cleanly between blocks right after it, else None."""
        if self.end != "end" or not self.at_boundary_at_end or not self.blocks:
            return None
        last = self.blocks[-1]
        return last.milliseconds if isinstance(last, RetryHint) else None


class ResumingSseClient:
    """Subscribes to ``path`` until cancelled, reconnecting like ``EventSource``."""

    def __init__(self, port: int, path: str, *, default_retry_ms: int = 3000) -> None:
        self.port = port
        self.path = path
        self.retry_ms = default_retry_ms
        self.last_event_id: str | None = None
        self.connections: list[SseConnection] = []
        self.events_seen = 0

    async def run(self) -> None:
        while True:
            await self._connect_once()
            await trio.sleep(self.retry_ms / 1000)

    async def _connect_once(self) -> None:
        record = SseConnection(trio.current_time(), self.last_event_id)
        self.connections.append(record)
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        except OSError as exc:
            record.end = f"error: connect: {exc!r}"
            record.ended_at = trio.current_time()
            return
        try:
            await self._read(stream, record)
        except (*_CLOSED, h11.ProtocolError) as exc:
            record.end = f"error: {exc!r}"
        finally:
            if record.end != "open":
                record.ended_at = trio.current_time()
            await trio.aclose_forcefully(stream)

    async def _read(self, stream: trio.SocketStream, record: SseConnection) -> None:
        conn = h11.Connection(h11.CLIENT)
        headers = [
            (b"host", f"127.0.0.1:{self.port}".encode()),
            (b"accept", b"text/event-stream"),
            (b"cache-control", b"no-cache"),
        ]
        if self.last_event_id is not None:
            headers.append((b"last-event-id", self.last_event_id.encode()))
        request = conn.send(h11.Request(method="GET", target=self.path, headers=headers))
        await stream.send_all((request or b"") + (conn.send(h11.EndOfMessage()) or b""))
        parser = SseParser()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(RECV_SIZE))
                continue
            if type(event) is h11.Response:
                record.status = event.status_code
                if event.status_code != 200:
                    record.end = "refused"
                    return
            elif type(event) is h11.Data:
                for block in parser.feed(event.data):
                    record.blocks.append(block)
                    if isinstance(block, SseEvent):
                        if record.first_event_at is None:
                            record.first_event_at = trio.current_time()
                        self.events_seen += 1
                if parser.last_event_id:
                    self.last_event_id = parser.last_event_id
                if parser.retry_ms is not None:
                    self.retry_ms = parser.retry_ms
            elif type(event) is h11.EndOfMessage:
                record.at_boundary_at_end = parser.at_boundary
                # The proxy closes the connection after a stream it ended: wait for that.
                with trio.move_on_after(5):
                    rest = await stream.receive_some(RECV_SIZE)
                    record.end = "end" if rest == b"" else f"error: bytes after end {rest!r}"
                    return
                record.end = "error: not closed after the body ended"
                return
            elif type(event) is h11.ConnectionClosed:
                record.at_boundary_at_end = parser.at_boundary
                record.end = "eof"
                return
            else:
                raise h11.RemoteProtocolError(f"unexpected {event!r}")


# -- the backend --------------------------------------------------------------------------


def event_block(index: int) -> bytes:
    return f'id: {index}\nevent: tick\ndata: {{"i": {index}}}\n\n'.encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass(eq=False)
class EventBackend:
    """Raw HTTP/1.1 backend: endless resumable SSE and slow responses (see module doc)."""

    port: int = 0
    streams_started: int = 0
    streams_open: int = 0
    last_event_ids: list[str | None] = field(default_factory=list)
    """The Last-Event-ID of every /events request, in arrival order (None: absent)."""
    slow_received: int = 0
    slow_answered: int = 0
    slow_gate: trio.Event | None = None
    """When set to an Event, /slow waits for it before its ``delay`` starts (so a test
    can hold requests in flight for as long as it needs)."""
    events_gate: trio.Event | None = None
    """When set to an Event, /events sends its first event at once but the following
    ones only after it (so opening many streams does not compete with their traffic);
    stream ``n`` then starts its cycle ``(n % 10) / 10`` of an interval late, so the
    streams' phases are spread over the interval."""

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
        self.port = int(listeners[0].socket.getsockname()[1])
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(RECV_SIZE)
                    if not data:
                        return
                    buffer += data
                    if len(buffer) > 65536:
                        return
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, target, _version = request_line.split(" ")
                headers = {}
                for line in header_lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                if method != "GET" or "content-length" in headers:
                    await stream.send_all(
                        b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n"
                        b"connection: close\r\n\r\n"
                    )
                    return
                parts = urlsplit(target)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                if parts.path == "/events":
                    await self._events(stream, headers.get("last-event-id"), query)
                    return
                if parts.path == "/slow":
                    await self._slow(stream, query)
                    continue
                await stream.send_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                )
                return
        except _CLOSED:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _events(
        self, stream: trio.SocketStream, last_event_id: str | None, query: dict[str, str]
    ) -> None:
        """Endless; ``interval`` seconds apart; ``split`` > 0: every event after the first
        goes in two writes that many seconds apart (a drain then finds it mid-event)."""
        interval = float(query.get("interval", "0.1"))
        split = float(query.get("split", "0"))
        self.last_event_ids.append(last_event_id)
        index = int(last_event_id) + 1 if last_event_id is not None else 0
        self.streams_started += 1
        ordinal = self.streams_started
        self.streams_open += 1
        try:
            head = (
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            await stream.send_all(head + _chunk(event_block(index)))
            next_at = trio.current_time()
            if self.events_gate is not None:
                await self.events_gate.wait()
                next_at = trio.current_time() + (ordinal % 10) / 10 * interval
            while True:
                index += 1
                next_at += interval
                await trio.sleep_until(next_at)
                block = event_block(index)
                if split > 0:
                    cut = len(block) // 2
                    await stream.send_all(_chunk(block[:cut]))
                    await trio.sleep(split)
                    await stream.send_all(_chunk(block[cut:]))
                else:
                    await stream.send_all(_chunk(block))
        finally:
            self.streams_open -= 1

    async def _slow(self, stream: trio.SocketStream, query: dict[str, str]) -> None:
        delay = float(query.get("delay", "2"))
        size = int(query.get("size", "100000"))
        seed = int(query.get("seed", "0"))
        self.slow_received += 1
        if self.slow_gate is not None:
            await self.slow_gate.wait()
        await trio.sleep(delay)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            b"content-length: %d\r\n\r\n" % size
        )
        for chunk in pattern_chunks(size, seed=seed):
            await stream.send_all(chunk)
        self.slow_answered += 1
