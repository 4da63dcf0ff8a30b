"""Idle SSE streams and WebSocket tunnels are parked (``proxy.net.park``): they hold no
task while silent, and everything a stream's task did still happens once it wakes.

A worker runs in this process so the test can look at its tasks; the backend is a small
trio server whose streams send exactly what the test tells them to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio

from proxy.config import Config, from_mapping
from proxy.net.context import WorkerContext
from proxy.observability import configure_logging
from proxy.worker import serve
from tests.support.proxy_process import free_port
from tests.support.raw_backend import eventually

WAIT = 30.0
"""A guard for what must happen, never a measure of how fast."""
IDLE = 0.5
"""stream_idle_timeout of the idle-timeout tests."""

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass(eq=False)
class HeldStream:
    """One backend-side stream: the test writes events to it and ends it."""

    stream: trio.SocketStream
    gone: trio.Event = field(default_factory=trio.Event)
    """The proxy closed this upstream connection."""
    ended: bool = False

    async def event(self, data: bytes) -> None:
        await self.stream.send_all(_chunk(data))

    async def end(self) -> None:
        self.ended = True
        await self.stream.send_all(b"0\r\n\r\n")


class StreamBackend:
    """Answers ``GET /sse`` with an SSE head and then only what the test sends; answers
    any other request with a small 200. Keeps the upstream connections open."""

    def __init__(self) -> None:
        self.port = 0
        self.streams: list[HeldStream] = []
        self.tunnels: list[trio.SocketStream] = []
        """Backend ends of ``GET /ws`` tunnels (101, then raw bytes the test drives)."""
        self.arrived = trio.Condition()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            if head.startswith(b"GET /ws"):
                await stream.send_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                    b"connection: upgrade\r\n\r\n" + buffer
                )
                async with self.arrived:
                    self.tunnels.append(stream)
                    self.arrived.notify_all()
                await trio.sleep_forever()  # the test drives the stream
            if not head.startswith(b"GET /sse"):
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain")
                continue
            await stream.send_all(SSE_HEAD)
            held = HeldStream(stream)
            async with self.arrived:
                self.streams.append(held)
                self.arrived.notify_all()
            # Until the test ends the stream, the proxy sends nothing; after it, what
            # comes is the next request on this (reused) connection.
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                held.gone.set()
                return
            assert held.ended, f"bytes on a stream's upstream connection: {data!r}"
            buffer += data

    async def wait_for_streams(self, count: int) -> None:
        with trio.fail_after(WAIT):
            async with self.arrived:
                while len(self.streams) < count:
                    await self.arrived.wait()

    async def wait_for_tunnels(self, count: int) -> None:
        with trio.fail_after(WAIT):
            async with self.arrived:
                while len(self.tunnels) < count:
                    await self.arrived.wait()


class Client:
    """A raw client of the proxy that reads the chunked SSE body as it comes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.received = b""

    @classmethod
    async def open(cls, port: int, index: int) -> Client:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = cls(stream)
        await stream.send_all(
            b"GET /sse?c=%d HTTP/1.1\r\nhost: proxy\r\naccept: text/event-stream\r\n\r\n" % index
        )
        return client

    async def read_until(self, marker: bytes) -> None:
        with trio.fail_after(WAIT):
            while marker not in self.received:
                data = await self.stream.receive_some(65536)
                assert data, f"the proxy closed the stream before {marker!r}: {self.received!r}"
                self.received += data

    async def read_to_eof(self) -> None:
        with trio.fail_after(WAIT):
            while data := await self.stream.receive_some(65536):
                self.received += data


async def _open_tunnel(port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        b"GET /ws HTTP/1.1\r\nhost: proxy\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
        b"sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    head = b""
    with trio.fail_after(WAIT):
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(1)
            assert data, f"closed before the 101: {head!r}"
            head += data
    assert head.startswith(b"HTTP/1.1 101"), head
    return stream


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    out = b""
    with trio.fail_after(WAIT * 2):
        while len(out) < size:
            data = await stream.receive_some(size - len(out))
            assert data, f"EOF after {len(out)} of {size} bytes"
            out += data
    return out


def _config(backend_port: int, **upstream: float) -> Config:
    return from_mapping(
        {
            "server": {"listen": [f"127.0.0.1:{free_port()}"], "workers": 1},
            "admin": {"listen": ""},
            "log": {"access_log": False},
            "upstream": dict(upstream),
            "routes": [{"prefix": "/", "backends": [f"http://127.0.0.1:{backend_port}"]}],
        },
        "test",
    )


@pytest.fixture
async def backend(nursery: trio.Nursery) -> StreamBackend:
    server = StreamBackend()
    await nursery.start(server.serve)
    return server


@pytest.fixture(autouse=True)
def quiet_logs() -> None:
    configure_logging("warning")


async def _worker(nursery: trio.Nursery, config: Config) -> tuple[WorkerContext, int]:
    ctx: WorkerContext = await nursery.start(serve, config)
    port = int(config.server.listen[0].rsplit(":", 1)[1])
    return ctx, port


def _connection_tasks(ctx: WorkerContext) -> int:
    """Tasks in the worker's connection nursery, the accept loop's not counted."""
    nursery = ctx.park.nursery
    assert nursery is not None
    return sum(1 for task in nursery.child_tasks if "accept" not in task.name)


async def _parked_streams(
    ctx: WorkerContext, port: int, backend: StreamBackend, count: int, event: bytes
) -> list[Client]:
    """``count`` SSE streams through the worker, each relayed ``event`` and then idle:
    parked, holding no task."""
    clients = [await Client.open(port, i) for i in range(count)]
    await backend.wait_for_streams(count)
    for held in backend.streams:
        await held.event(event)
    for client in clients:
        await client.read_until(event)
    await eventually(lambda: _connection_tasks(ctx) == 0)  # an idle stream loses its task
    return clients


@pytest.fixture
async def worker_nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


async def test_idle_streams_hold_no_task_and_every_event_still_arrives(
    backend: StreamBackend, worker_nursery: trio.Nursery
) -> None:
    ctx, port = await _worker(worker_nursery, _config(backend.port))
    clients = await _parked_streams(ctx, port, backend, 40, b"data: one\n\n")
    for round_ in (b"two", b"three"):
        for held in backend.streams:
            await held.event(b"data: %s\n\n" % round_)
        for client in clients:
            await client.read_until(b"data: %s\n\n" % round_)
    await eventually(lambda: _connection_tasks(ctx) == 0)
    assert ctx.stats.active_connections == 40
    for client in clients:
        await client.stream.aclose()
    with trio.fail_after(WAIT):
        for held in backend.streams:
            await held.gone.wait()  # a parked stream notices its client leaving
    await eventually(lambda: ctx.stats.active_connections == 0)


async def test_a_stream_that_ends_while_parked_lets_the_connection_serve_again(
    backend: StreamBackend, worker_nursery: trio.Nursery
) -> None:
    ctx, port = await _worker(worker_nursery, _config(backend.port))
    client = await Client.open(port, 0)
    await backend.wait_for_streams(1)
    await backend.streams[0].event(b"data: only\n\n")
    await client.read_until(b"data: only\n\n")
    await eventually(lambda: _connection_tasks(ctx) == 0)
    await backend.streams[0].end()
    await client.read_until(b"0\r\n\r\n")
    # The same connection carries the next request: the woken task served it.
    await client.stream.send_all(b"GET /next HTTP/1.1\r\nhost: proxy\r\n\r\n")
    await client.read_until(b"plain")
    assert b"HTTP/1.1 200" in client.received.rpartition(b"0\r\n\r\n")[2]
    await client.stream.aclose()


async def test_a_parked_stream_wakes_for_its_idle_timeout(
    backend: StreamBackend, worker_nursery: trio.Nursery
) -> None:
    ctx, port = await _worker(worker_nursery, _config(backend.port, stream_idle_timeout=IDLE))
    client = await Client.open(port, 0)
    await backend.wait_for_streams(1)
    started = trio.current_time()  # before the stream's last activity: a lower bound
    await backend.streams[0].event(b"data: first\n\n")
    await client.read_until(b"data: first\n\n")
    with trio.fail_after(WAIT):
        await client.read_to_eof()  # the proxy ends the silent stream
    assert trio.current_time() - started >= IDLE  # by its idle timeout: never sooner
    assert not client.received.endswith(b"0\r\n\r\n"), "an idle timeout is no clean end"
    with trio.fail_after(WAIT):
        await backend.streams[0].gone.wait()
    assert ctx.stats.active_connections == 0


async def test_a_drain_wakes_parked_streams_and_ends_them_with_a_retry_hint(
    backend: StreamBackend, worker_nursery: trio.Nursery
) -> None:
    ctx, port = await _worker(worker_nursery, _config(backend.port))
    clients = await _parked_streams(ctx, port, backend, 5, b"data: before\n\n")
    ctx.start_drain()
    for client in clients:
        await client.read_to_eof()
        assert b"retry: " in client.received
        assert client.received.endswith(b"0\r\n\r\n")


async def test_idle_tunnels_hold_no_task_and_bytes_flow_both_ways(
    backend: StreamBackend, worker_nursery: trio.Nursery
) -> None:
    config = _config(backend.port, tunnel_half_close_timeout=0.5)
    ctx, port = await _worker(worker_nursery, config)
    clients = [await _open_tunnel(port) for _ in range(20)]
    await backend.wait_for_tunnels(20)
    await eventually(lambda: _connection_tasks(ctx) == 0)  # an idle tunnel loses its task
    for round_ in range(3):
        for i, (client, tunnel) in enumerate(zip(clients, backend.tunnels, strict=True)):
            up = b"up %d %d;" % (round_, i)
            down = b"down %d %d;" % (round_, i)
            await client.send_all(up)
            assert await _receive_exactly(tunnel, len(up)) == up
            await tunnel.send_all(down)
            assert await _receive_exactly(client, len(down)) == down
        await eventually(lambda: _connection_tasks(ctx) == 0)
    # The clients leave; the backend never closes its side, so each parked tunnel ends
    # when its half-close timeout passes.
    for client in clients:
        await client.aclose()
    await eventually(lambda: ctx.stats.active_connections == 0)


async def test_a_tunnel_direction_that_is_full_does_not_stop_the_other(
    backend: StreamBackend, worker_nursery: trio.Nursery
) -> None:
    """The client sends far more than the socket buffers hold while the backend does not
    read; the backend's messages must still reach the client meanwhile, and every byte
    must arrive once the backend reads."""
    _, port = await _worker(worker_nursery, _config(backend.port))
    client = await _open_tunnel(port)
    await backend.wait_for_tunnels(1)
    tunnel = backend.tunnels[0]
    upload = bytes(range(256)) * (32 * 1024)  # 8 MiB

    async def send_upload() -> None:
        await client.send_all(upload)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_upload)
        await trio.sleep(0.5)  # the upload fills the buffers on the way to the backend
        for i in range(5):
            message = b"still here %d\n" % i
            await tunnel.send_all(message)
            assert await _receive_exactly(client, len(message)) == message
        received = await _receive_exactly(tunnel, len(upload))
    assert received == upload
    await client.aclose()


async def test_a_parked_tunnel_wakes_for_its_idle_timeout(
    backend: StreamBackend, worker_nursery: trio.Nursery
) -> None:
    ctx, port = await _worker(worker_nursery, _config(backend.port, stream_idle_timeout=IDLE))
    started = trio.current_time()  # before the tunnel's last activity: a lower bound
    client = await _open_tunnel(port)
    await backend.wait_for_tunnels(1)
    with trio.fail_after(WAIT):
        assert await client.receive_some(100) == b""  # the proxy closed the tunnel
    assert trio.current_time() - started >= IDLE  # by its idle timeout: never sooner
    await eventually(lambda: ctx.stats.active_connections == 0)


async def test_a_half_closed_tunnel_passes_the_eof_on(
    backend: StreamBackend, worker_nursery: trio.Nursery
) -> None:
    _, port = await _worker(worker_nursery, _config(backend.port, tunnel_half_close_timeout=5))
    client = await _open_tunnel(port)
    await backend.wait_for_tunnels(1)
    tunnel = backend.tunnels[0]
    await client.send_all(b"last words")
    await client.send_eof()
    assert await _receive_exactly(tunnel, 10) == b"last words"
    with trio.fail_after(WAIT):
        assert await tunnel.receive_some(100) == b"", "the client's FIN was not passed on"
    # The other direction still works until the backend closes too.
    await tunnel.send_all(b"reply")
    assert await _receive_exactly(client, 5) == b"reply"
    await tunnel.send_eof()
    with trio.fail_after(WAIT):
        assert await client.receive_some(100) == b""


async def test_a_drain_closes_parked_tunnels_with_1001_at_a_frame_boundary(
    backend: StreamBackend, worker_nursery: trio.Nursery
) -> None:
    ctx, port = await _worker(worker_nursery, _config(backend.port))
    whole, half = await _open_tunnel(port), await _open_tunnel(port)
    await backend.wait_for_tunnels(2)
    frame = b"\x81\x05hello"  # an unmasked text frame, as a server sends
    await backend.tunnels[0].send_all(frame)
    assert await _receive_exactly(whole, len(frame)) == frame
    await backend.tunnels[1].send_all(frame[:4])  # the drain finds this one mid-frame
    assert await _receive_exactly(half, 4) == frame[:4]
    await eventually(lambda: _connection_tasks(ctx) == 0)
    ctx.start_drain()
    # A close frame: FIN + opcode 8, an unmasked payload length, then the status code.
    close = await _receive_exactly(whole, 4)
    assert close[0] == 0x88
    assert int.from_bytes(close[2:4], "big") == 1001
    with trio.move_on_after(0.3):
        early = await half.receive_some(100)
        raise AssertionError(f"a close went out inside a frame: {early!r}")
    await backend.tunnels[1].send_all(frame[4:])
    rest = len(frame) - 4
    received = await _receive_exactly(half, rest + 4)
    assert received[:rest] == frame[4:]
    assert received[rest] == 0x88
    assert int.from_bytes(received[rest + 2 : rest + 4], "big") == 1001
