"""Real backends (and a raw HTTP/1.1 client) that network tests run in their own trio loop.

Every server binds 127.0.0.1:0 and is started with ``port = await nursery.start(b.serve)``.
Nothing here holds a whole body in memory: bodies are generated in chunks and hashed
while they stream, so a 50 MB transfer costs one receive buffer on either side.

- ``HttpBackend``: records every request (method, target, headers, body length and
  sha256, the proxy's source port); echoes POST/PUT bodies back while still receiving
  them (Content-Length framing when the request had one, chunked otherwise); ``/sink``
  only hashes the body and answers with JSON; ``GET /blob?size=N[&chunked=1][&seed=S]``
  streams ``N`` deterministic bytes (``pattern_chunks``).
- ``SseBackend``: ``GET`` answers ``text/event-stream`` with ``n`` events ``interval``
  seconds apart, each carrying its ``time.time()`` emission timestamp, then ends.
- ``WebSocketEchoBackend``: trio-websocket echo server; the text message
  ``"close-please"`` makes it close with code 4000, reason "bye".
- ``HttpClient``: one client connection (h11 over a real socket) that sends a request
  body while it reads the response, as a full-duplex proxy allows.
- ``proxy_running``: ``run_proxy`` as an async context manager whose blocking start and
  stop run in a thread, so these backends keep serving meanwhile; ``wait_for_line`` and
  ``poll_until`` wait for log lines / outside state without blocking the loop.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio
import trio_websocket

from tests.support.proxy_process import ProxyProcess, run_proxy
from tests.support.threads import entered_in_thread

RECV_SIZE = 65536
CHUNK_SIZE = 65536
MAX_WS_MESSAGE = 8 * 1024 * 1024
Headers = list[tuple[bytes, bytes]]

# -- deterministic bodies -----------------------------------------------------------------

_SHIFT_MODULUS = 4093  # prime: consecutive chunks start at different offsets
_PATTERN = random.Random(20240611).randbytes(CHUNK_SIZE + _SHIFT_MODULUS)


def pattern_chunks(size: int, *, seed: int = 0, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The first ``size`` bytes of a deterministic pseudo-random stream, in pieces of at
    most ``chunk_size`` (the bytes do not depend on ``chunk_size``).

    Each 64 KiB block of the stream is a different window of one fixed random block, so a
    lost, repeated or reordered piece changes the sha256 of the whole.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    offset = 0
    while offset < size:
        block, within = divmod(offset, CHUNK_SIZE)
        n = min(chunk_size, size - offset, CHUNK_SIZE - within)
        start = (block * 7919 + seed * 104729) % _SHIFT_MODULUS + within
        yield _PATTERN[start : start + n]
        offset += n


def pattern_sha256(size: int, *, seed: int = 0) -> str:
    digest = hashlib.sha256()
    for chunk in pattern_chunks(size, seed=seed):
        digest.update(chunk)
    return digest.hexdigest()


def header_values(headers: Sequence[tuple[bytes, bytes]], name: str) -> list[str]:
    wanted = name.lower().encode("ascii")
    return [value.decode("latin-1") for key, value in headers if key.lower() == wanted]


# -- h11 plumbing shared by the servers and the client ---------------------------------------


class _H11Stream:
    """An h11 connection bound to a socket stream."""

    def __init__(
        self, stream: trio.SocketStream, role: type[h11.CLIENT] | type[h11.SERVER]
    ) -> None:
        self.stream = stream
        self.conn = h11.Connection(role)

    async def next_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(RECV_SIZE))
                continue
            if event is h11.PAUSED:
                raise RuntimeError("h11 paused (protocol switch or pipelining)")
            assert isinstance(event, h11.Event)
            return event

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)


@dataclass(slots=True)
class RecordedRequest:
    """One request as the backend received it (body reduced to length and hash)."""

    method: str
    target: str
    headers: Headers
    body_length: int
    body_sha256: str
    peer_port: int
    """The proxy's source port: equal ports mean a reused upstream connection."""

    def header(self, name: str) -> list[str]:
        return header_values(self.headers, name)


class _H11Server:
    """Accepts connections and serves keep-alive HTTP/1.1 exchanges with ``handle``."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[RecordedRequest] = []
        self.connections_accepted = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections_accepted += 1
        peer_port = int(stream.socket.getpeername()[1])
        h = _H11Stream(stream, h11.SERVER)
        try:
            while True:
                event = await h.next_event()
                if type(event) is not h11.Request:
                    return  # ConnectionClosed between requests
                await self.handle(h, event, peer_port)
                if h.conn.our_state is not h11.DONE or h.conn.their_state is not h11.DONE:
                    return
                h.conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def handle(self, h: _H11Stream, request: h11.Request, peer_port: int) -> None:
        raise NotImplementedError

    async def _drain_body(self, h: _H11Stream) -> tuple[int, str]:
        """Read the request body to its end; (length, sha256)."""
        digest = hashlib.sha256()
        length = 0
        while True:
            event = await h.next_event()
            if type(event) is h11.Data:
                digest.update(event.data)
                length += len(event.data)
            elif type(event) is h11.EndOfMessage:
                return length, digest.hexdigest()
            else:
                raise h11.RemoteProtocolError(f"unexpected {event!r} in request body")

    def _record(self, request: h11.Request, length: int, sha256: str, peer_port: int) -> None:
        self.requests.append(
            RecordedRequest(
                method=request.method.decode("ascii"),
                target=request.target.decode("ascii"),
                headers=list(request.headers),
                body_length=length,
                body_sha256=sha256,
                peer_port=peer_port,
            )
        )


def _query(target: bytes) -> tuple[str, dict[str, str]]:
    parts = urlsplit(target.decode("ascii"))
    return parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}


class HttpBackend(_H11Server):
    """Echo / sink / blob backend; see the module docstring."""

    async def handle(self, h: _H11Stream, request: h11.Request, peer_port: int) -> None:
        path, query = _query(request.target)
        method = request.method.upper()
        if method in (b"POST", b"PUT") and path == "/sink":
            length, sha256 = await self._drain_body(h)
            self._record(request, length, sha256, peer_port)
            body = json.dumps({"length": length, "sha256": sha256}).encode()
            await self._small_response(h, body, b"application/json")
        elif method in (b"POST", b"PUT"):
            await self._echo(h, request, peer_port)
        elif path == "/blob":
            length, sha256 = await self._drain_body(h)
            self._record(request, length, sha256, peer_port)
            await self._blob(h, int(query["size"]), int(query.get("seed", "0")), query)
        else:
            length, sha256 = await self._drain_body(h)
            self._record(request, length, sha256, peer_port)
            body = json.dumps({"path": path, "seq": len(self.requests)}).encode()
            await self._small_response(h, body, b"application/json", hop_headers=True)

    async def _small_response(
        self, h: _H11Stream, body: bytes, content_type: bytes, *, hop_headers: bool = False
    ) -> None:
        headers: Headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"x-backend", b"http"),
        ]
        if hop_headers:
            # Response-direction hop-by-hop headers the proxy must not pass on.
            headers += [
                (b"connection", b"x-backend-hop"),
                (b"x-backend-hop", b"1"),
                (b"keep-alive", b"timeout=30"),
            ]
        await h.send(h11.Response(status_code=200, headers=headers))
        await h.send(h11.Data(data=body))
        await h.send(h11.EndOfMessage())

    async def _blob(self, h: _H11Stream, size: int, seed: int, query: dict[str, str]) -> None:
        headers: Headers = [(b"content-type", b"application/octet-stream")]
        if query.get("chunked") != "1":
            headers.append((b"content-length", str(size).encode()))
        await h.send(h11.Response(status_code=200, headers=headers))
        for chunk in pattern_chunks(size, seed=seed):
            await h.send(h11.Data(data=chunk))
        await h.send(h11.EndOfMessage())

    async def _echo(self, h: _H11Stream, request: h11.Request, peer_port: int) -> None:
        """Answer at once and send every body chunk back as it arrives."""
        headers: Headers = [
            (b"content-type", b"application/octet-stream"),
            (b"x-backend", b"echo"),
        ]
        headers += [(b"content-length", v) for k, v in request.headers if k == b"content-length"]
        await h.send(h11.Response(status_code=200, headers=headers))
        digest = hashlib.sha256()
        length = 0
        while True:
            event = await h.next_event()
            if type(event) is h11.Data:
                digest.update(event.data)
                length += len(event.data)
                await h.send(h11.Data(data=event.data))
            elif type(event) is h11.EndOfMessage:
                break
            else:
                raise h11.RemoteProtocolError(f"unexpected {event!r} in request body")
        self._record(request, length, digest.hexdigest(), peer_port)
        await h.send(h11.EndOfMessage())


class SseBackend(_H11Server):
    """``GET /...?n=N``: N SSE events (default 5), in lockstep with the test: event i+1
    is emitted only once the test reported event i arrived (``arrived(i)``). A proxy that
    held an event back until more data came would stall the stream, so a stream that
    completes proves each event was delivered before the next one existed."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, int]] = []
        """("emitted" | "arrived", index), in the order they happened."""
        self._arrived: dict[int, trio.Event] = {}

    def arrived(self, index: int) -> None:
        self.log.append(("arrived", index))
        self._arrived.setdefault(index, trio.Event()).set()

    async def handle(self, h: _H11Stream, request: h11.Request, peer_port: int) -> None:
        _, query = _query(request.target)
        count = int(query.get("n", "5"))
        length, sha256 = await self._drain_body(h)
        self._record(request, length, sha256, peer_port)
        await h.send(
            h11.Response(
                status_code=200,
                headers=[(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            )
        )
        for index in range(count):
            if index:
                await self._arrived.setdefault(index - 1, trio.Event()).wait()
            self.log.append(("emitted", index))
            payload = json.dumps({"i": index})
            await h.send(h11.Data(data=f"id: {index}\nevent: tick\ndata: {payload}\n\n".encode()))
        await h.send(h11.EndOfMessage())


@dataclass(slots=True)
class WsClose:
    initiator: str
    """"client" (the backend received a close) or "server" (the backend sent one)."""
    code: int | None
    reason: str | None


@dataclass(eq=False)
class WebSocketEchoBackend:
    """Echoes text and binary messages; ``"close-please"`` -> close(4000, "bye")."""

    port: int = 0
    received: list[str | bytes] = field(default_factory=list)
    closes: list[WsClose] = field(default_factory=list)
    request_headers: list[Headers] = field(default_factory=list)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(
                    trio_websocket.serve_websocket,
                    self._handle,
                    "127.0.0.1",
                    0,
                    None,
                    max_message_size=MAX_WS_MESSAGE,
                )
            )
            self.port = int(server.port)
            task_status.started(self.port)

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        self.request_headers.append(list(request.headers))
        ws = await request.accept()
        while True:
            try:
                message = await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                reason = exc.reason
                self.closes.append(
                    WsClose(
                        "client",
                        reason.code if reason is not None else None,
                        reason.reason if reason is not None else None,
                    )
                )
                return
            self.received.append(message)
            if message == "close-please":
                await ws.aclose(code=4000, reason="bye")
                closed = ws.closed
                self.closes.append(
                    WsClose(
                        "server",
                        closed.code if closed is not None else None,
                        closed.reason if closed is not None else None,
                    )
                )
                return
            try:
                await ws.send_message(message)
            except trio_websocket.ConnectionClosed:
                continue  # the next get_message records how it closed


# -- a raw HTTP/1.1 client ------------------------------------------------------------------


@dataclass(slots=True)
class HttpResponse:
    status: int
    headers: Headers
    body: bytes
    """The body when it was at most ``keep_body`` bytes, else b""."""
    length: int
    sha256: str
    reused_connection: bool
    """True when this exchange ran on a connection that had carried an earlier one."""

    def header(self, name: str) -> list[str]:
        return header_values(self.headers, name)


class HttpClient:
    """One keep-alive client connection over a real socket, driven with h11.

    ``request`` uploads the body in a separate task while it reads the response, so an
    echoed 50 MB body never has to fit in socket buffers.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._h = _H11Stream(stream, h11.CLIENT)
        self.stream = stream
        self.exchanges = 0
        self.local_port = int(stream.socket.getsockname()[1])
        self.peer = stream.socket.getpeername()

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> HttpClient:
        return cls(await trio.open_tcp_stream(host, port))

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def request(
        self,
        method: str,
        target: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | Iterable[bytes] | AsyncIterable[bytes] | None = None,
        content_length: int | None = None,
        keep_body: int = 1 << 20,
        on_data: Callable[[bytes], None] | None = None,
    ) -> HttpResponse:
        """Send one request and read its response.

        ``body`` as bytes goes with Content-Length; as an (async) iterable of chunks it
        goes chunked unless ``content_length`` is given. A Host header is added unless
        ``headers`` has one.
        """
        h = self._h
        head: Headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        names = {k.lower() for k, _ in head}
        if b"host" not in names:
            head.insert(0, (b"host", f"{self.peer[0]}:{self.peer[1]}".encode()))
        chunks: Iterable[bytes] | AsyncIterable[bytes] = ()
        if isinstance(body, bytes):
            head.append((b"content-length", str(len(body)).encode()))
            chunks = (body,)
        elif body is not None:
            chunks = body
            if content_length is not None:
                head.append((b"content-length", str(content_length).encode()))
            elif b"transfer-encoding" not in names:
                head.append((b"transfer-encoding", b"chunked"))
        reused = self.exchanges > 0
        self.exchanges += 1
        await h.send(h11.Request(method=method, target=target, headers=head))
        uploaded = trio.Event()

        async def upload() -> None:
            if isinstance(chunks, AsyncIterable):
                async for chunk in chunks:
                    await h.send(h11.Data(data=chunk))
            else:
                for chunk in chunks:
                    await h.send(h11.Data(data=chunk))
            await h.send(h11.EndOfMessage())
            uploaded.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload)
                response = await self._read_response(keep_body, on_data, reused)
                if not uploaded.is_set():
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Callers catch connection errors by type; the task nursery is an implementation detail.
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from None
            raise
        if h.conn.our_state is h11.DONE and h.conn.their_state is h11.DONE:
            h.conn.start_next_cycle()
        return response

    async def _read_response(
        self, keep_body: int, on_data: Callable[[bytes], None] | None, reused: bool
    ) -> HttpResponse:
        h = self._h
        event = await h.next_event()
        while type(event) is h11.InformationalResponse:
            event = await h.next_event()
        if type(event) is not h11.Response:
            raise ConnectionError(f"no response: {event!r}")
        digest = hashlib.sha256()
        kept: list[bytes] = []
        length = 0
        while True:
            body_event = await h.next_event()
            if type(body_event) is h11.Data:
                if on_data is not None:
                    on_data(body_event.data)
                digest.update(body_event.data)
                length += len(body_event.data)
                if length <= keep_body:
                    kept.append(body_event.data)
            elif type(body_event) is h11.EndOfMessage:
                break
            else:
                raise ConnectionError(f"response body ended by {body_event!r}")
        return HttpResponse(
            status=event.status_code,
            headers=list(event.headers),
            body=b"".join(kept) if length <= keep_body else b"",
            length=length,
            sha256=digest.hexdigest(),
            reused_connection=reused,
        )


# -- the proxy, started without blocking the trio loop -------------------------------------


@asynccontextmanager
async def proxy_running(
    tmp_path: Path,
    routes: Sequence[Mapping[str, Any]],
    *,
    workers: int = 2,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> AsyncIterator[ProxyProcess]:
    """``run_proxy`` with its blocking start and stop in a thread, so backends running in
    this trio loop keep serving meanwhile (a draining worker may still talk to them)."""
    manager = run_proxy(tmp_path, list(routes), workers=workers, sections=sections)
    async with entered_in_thread(manager) as proxy:
        yield proxy


async def poll_until(
    condition: Callable[[], bool], *, limit: float, interval: float = 0.01
) -> None:
    """Wait until ``condition()`` holds (state in another process has no trio.Event);
    raise TimeoutError after ``limit`` seconds."""
    with trio.move_on_after(limit):
        while True:
            if condition():
                return
            await trio.sleep(interval)
    raise TimeoutError(f"condition not met within {limit} s")


async def wait_for_line(
    proxy: ProxyProcess, predicate: Callable[[dict[str, Any]], bool], *, limit: float = 10.0
) -> dict[str, Any]:
    """The first collected log line matching ``predicate``, polling without blocking."""
    found: list[dict[str, Any]] = []

    def match() -> bool:
        found.extend(line for line in list(proxy.lines) if predicate(line))
        return bool(found)

    await poll_until(match, limit=limit, interval=0.02)
    return found[0]


def backend_route(port: int, prefix: str = "/", **extra: Any) -> dict[str, Any]:
    return {"prefix": prefix, "backends": [f"http://127.0.0.1:{port}"], **extra}
