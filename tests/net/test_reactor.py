"""The worker's reactor and its transport on real sockets, with the worker in this process.

``proxy.worker.serve`` runs in the test's trio loop, so the tests can look at what the
worker holds (its tasks, a connection's buffers, its pools) while clients and backends
talk to it over loopback. The backends run in a trio loop of their own, in a thread:
their tasks are not the worker's, and a backend that blocks does not block the worker.

What is shown: a connection holds no task, whatever it is waiting for; backpressure
pauses the side that is ahead instead of buffering it; deadlines fire from the
timekeeper with nothing else happening; a drain ends each kind of connection the way
it should; a bug in one connection costs that connection only; and backends that refuse,
reset or drop pooled connections cost the requests they must and nothing more.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import signal
import socket
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Request, TextMessage

from proxy.config import Config, LimitsConfig, LogConfig, RouteConfig, ServerConfig, UpstreamConfig
from proxy.net import accepting
from proxy.net.client_io import ClientIO
from proxy.net.context import WorkerContext
from proxy.net.reactor import Reactor
from proxy.net.upstream import RECV_SIZE
from proxy.protocol.connection import Connection
from proxy.worker import serve
from tests.support.backends import WebSocketEchoBackend, pattern_chunks, pattern_sha256
from tests.support.proxy_process import free_port

WAIT = 20.0
"""Seconds a test waits for something to happen: a guard, not a measure of speed."""
BIG = 8 * 1024 * 1024
"""The upload."""
DOWNLOAD = 32 * 1024 * 1024
"""The slow reader's response: beyond what the kernel buffers between backend and client
hold (the worker's sockets autotune theirs: 4.5 to 6 MiB were in flight on a test
machine), so that a backend that must wait for the client is seen waiting."""
HELD_LIMIT = RECV_SIZE + 4096
"""What the worker may hold for one exchange while a side is backlogged: one read of the
side that is ahead (and a head's worth of framing)."""
SMALL_BUFFER = 32 * 1024
"""Socket buffers of the slow peers, so that kernel buffers cannot hide a worker that
reads ahead."""
IDLE_KEEPALIVE = 200
IDLE_STREAMS = 40
IDLE_TUNNELS = 20


# -- backends, in a loop of their own ---------------------------------------------------------


class Backend:
    """An HTTP/1.1 backend (h11) whose answers the test steers by path:

    ``/ok`` a small answer; ``/events`` an event stream that sends one event, waits for
    ``release`` and then sends another and ends; ``/slow`` answers once ``release`` is
    set; ``/blob`` ``DOWNLOAD`` bytes, counted into ``sent`` as the socket takes them;
    ``/upload`` waits for ``go``, then reads the body in small pieces; ``/cut`` promises
    1000 bytes, sends 100 and resets the connection; ``/boom`` a body that contains BOOM.
    It counts the connections it accepted and keeps every request target."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self.targets: list[bytes] = []
        self.sent = 0
        self.upload: tuple[int, str] | None = None
        self.release: trio.Event
        self.go: trio.Event
        self.streams_waiting = 0
        self._open: list[trio.SocketStream] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        self.release = trio.Event()
        self.go = trio.Event()
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        # Inherited by every socket it accepts: a backend with small buffers blocks as soon
        # as the worker stops taking its bytes (and stops taking the worker's soon).
        listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        self.port = int(listener.socket.getsockname()[1])
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, [listener])

    @property
    def idle_connections(self) -> int:
        """Connections waiting for their next request."""
        return len(self._open)

    def close_idle(self) -> None:
        """Close every connection not in the middle of an exchange (from its loop)."""
        for stream in self._open:
            stream.socket.close()
        self._open.clear()

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                self._open.append(stream)
                request = await self._next(stream, conn)
                self._open.remove(stream)
                if not isinstance(request, h11.Request):
                    return
                self.targets.append(request.target)
                if not await self._answer(stream, conn, request):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
            pass
        finally:
            if stream in self._open:
                self._open.remove(stream)
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def _next(stream: trio.SocketStream, conn: h11.Connection) -> h11.Event:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event), event
                return event
            conn.receive_data(await stream.receive_some(65536))

    async def _send(
        self, stream: trio.SocketStream, conn: h11.Connection, *events: h11.Event
    ) -> None:
        await stream.send_all(b"".join(conn.send(e) or b"" for e in events))

    async def _drain(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        while not isinstance(await self._next(stream, conn), h11.EndOfMessage):
            pass

    async def _answer(
        self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request
    ) -> bool:
        """Answer ``request``; False when the connection is to end."""
        target = request.target
        if target == b"/upload":
            await self.go.wait()
            digest = hashlib.sha256()
            length = 0
            while True:
                event = await self._next(stream, conn)
                if isinstance(event, h11.EndOfMessage):
                    break
                assert isinstance(event, h11.Data), event
                digest.update(event.data)
                length += len(event.data)
                await trio.sleep(0.0005)  # a backend slower than its client
            self.upload = (length, digest.hexdigest())
            body = json.dumps({"length": length, "sha256": digest.hexdigest()}).encode()
            await self._send(stream, conn, *_small(body))
            return True
        await self._drain(stream, conn)
        if target == b"/events":
            head = h11.Response(status_code=200, headers=[(b"content-type", b"text/event-stream")])
            await self._send(stream, conn, head, h11.Data(data=b"data: first\n\n"))
            self.streams_waiting += 1
            await self.release.wait()
            self.streams_waiting -= 1
            await self._send(stream, conn, h11.Data(data=b"data: second\n\n"), h11.EndOfMessage())
        elif target == b"/slow":
            await self.release.wait()
            await self._send(stream, conn, *_small(b"slow"))
        elif target == b"/blob":
            head = h11.Response(status_code=200, headers=[(b"content-length", b"%d" % DOWNLOAD)])
            await self._send(stream, conn, head)
            for chunk in pattern_chunks(DOWNLOAD, seed=3):
                await self._send(stream, conn, h11.Data(data=chunk))
                self.sent += len(chunk)
            await self._send(stream, conn, h11.EndOfMessage())
        elif target == b"/cut":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
            # SO_LINGER with a zero timeout: close() sends a reset, not a FIN.
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            stream.socket.close()
            return False
        elif target == b"/boom":
            await self._send(stream, conn, *_small(b"BOOM" * 10))
        else:
            await self._send(stream, conn, *_small(b"ok"))
        return True


def _small(body: bytes) -> tuple[h11.Event, ...]:
    head = h11.Response(status_code=200, headers=[(b"content-length", b"%d" % len(body))])
    return head, h11.Data(data=body), h11.EndOfMessage()


@dataclass
class BackendLoop:
    """The backends' loop, running in its thread."""

    token: trio.lowlevel.TrioToken

    def call(self, fn: Callable[[], object]) -> None:
        """Have ``fn`` run in the backends' loop (a trio.Event is that loop's) soon."""
        self.token.run_sync_soon(fn)


@asynccontextmanager
async def backends_in_thread(
    *servers: Callable[..., Awaitable[object]],
) -> AsyncIterator[BackendLoop]:
    started = threading.Event()
    loop: list[tuple[trio.lowlevel.TrioToken, trio.CancelScope]] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for server in servers:
                await nursery.start(server)
            loop.append((trio.lowlevel.current_trio_token(), nursery.cancel_scope))
            started.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert await trio.to_thread.run_sync(started.wait, WAIT), "the backends did not start"
    token, scope = loop[0]
    try:
        yield BackendLoop(token)
    finally:
        token.run_sync_soon(scope.cancel)
        await trio.to_thread.run_sync(thread.join, WAIT)


# -- the worker, in this loop -----------------------------------------------------------------


@dataclass
class Worker:
    port: int
    ctx: WorkerContext
    reactor: Reactor
    stopped: trio.Event
    """``serve`` returned by itself (a drain ended)."""

    def connection(self, client_port: int) -> ClientIO:
        """The worker's side of the client connection from ``client_port``."""
        for io in self.reactor.connections:
            if io.m.peer[1] == client_port:
                return io
        raise LookupError(client_port)


def route(prefix: str, backend: str, **extra: Any) -> RouteConfig:
    return RouteConfig(prefix=prefix, backends=(backend,), **extra)


@asynccontextmanager
async def running_worker(
    routes: Sequence[RouteConfig],
    *,
    limits: LimitsConfig | None = None,
    upstream: UpstreamConfig | None = None,
    drain_timeout: float = 5.0,
) -> AsyncIterator[Worker]:
    """``serve`` in this loop until the block ends (or the worker drains and exits)."""
    port = free_port()
    config = Config(
        server=ServerConfig(listen=(f"127.0.0.1:{port}",), workers=1, drain_timeout=drain_timeout),
        limits=limits or LimitsConfig(),
        upstream=upstream or UpstreamConfig(),
        log=LogConfig(access_log=False),
        routes=tuple(routes),
    )
    # The worker tunes the collector for its own process; this one goes on after it.
    thresholds = gc.get_threshold()
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[WorkerContext]) -> None:
        await serve(config, task_status=task_status)
        stopped.set()

    try:
        async with trio.open_nursery() as nursery:
            ctx: WorkerContext = await nursery.start(run)
            # Serving from the first connection on: the reactor's loop and timekeeper run.
            await eventually(
                lambda: any(t.name.endswith("Reactor._keep_time") for t in all_tasks()),
                "the reactor's timekeeper started",
            )
            assert ctx.reactor is not None
            yield Worker(port, ctx, ctx.reactor, stopped)
            nursery.cancel_scope.cancel()
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def all_tasks() -> list[trio.lowlevel.Task]:
    """Every task of this loop, found from the root task down its nurseries."""
    found: list[trio.lowlevel.Task] = []
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is None:
            continue
        found.append(task)
        pending.extend(t for n in task.child_nurseries for t in n.child_tasks)
    return found


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Poll until ``condition()`` holds; fail after ``WAIT`` seconds, saying ``what``."""
    with trio.move_on_after(WAIT):
        while True:
            if condition():
                return
            await trio.sleep(0.005)
    raise AssertionError(f"not within {WAIT} s: {what}")


# -- clients ----------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool
    """The message ended as its framing said (not cut by the connection's end)."""

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


@dataclass
class Client:
    """One client connection, spoken to with h11 from the test's own task: a client
    waiting for its answer is a socket, not a task."""

    stream: trio.SocketStream
    conn: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))

    @classmethod
    async def connect(cls, port: int, *, receive_buffer: int = 0) -> Client:
        sock = trio.socket.socket()
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        return cls(trio.SocketStream(sock))

    @property
    def port(self) -> int:
        return int(self.stream.socket.getsockname()[1])

    def request_bytes(self, method: str, target: str, body: bytes = b"") -> bytes:
        """A whole request, as h11 writes it (its state moves on as if it were sent)."""
        headers = [(b"host", b"switchboard.test"), (b"content-length", b"%d" % len(body))]
        events = (h11.Request(method=method, target=target, headers=headers), h11.Data(data=body))
        return b"".join(self.conn.send(e) or b"" for e in (*events, h11.EndOfMessage()))

    async def send_request(self, method: str, target: str) -> None:
        await self.stream.send_all(self.request_bytes(method, target))

    async def event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event), event
                return event
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""  # a reset reads as the end here
            self.conn.receive_data(data)

    async def head(self) -> h11.Response:
        event = await self.event()
        assert isinstance(event, h11.Response), event
        return event

    async def body_until(self, done: Callable[[bytes], bool]) -> bytes:
        """Body bytes until ``done(body so far)``; the message may go on."""
        body = b""
        while not done(body):
            event = await self.event()
            assert isinstance(event, h11.Data), (event, body)
            body += event.data
        return body

    async def rest(self, response: h11.Response, body: bytes = b"") -> Answer:
        """The rest of ``response``: to its end, or to the connection's end."""
        try:
            while True:
                event = await self.event()
                if isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise AssertionError(event)
        except h11.RemoteProtocolError:
            return Answer(response.status_code, list(response.headers), body, complete=False)
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Answer(response.status_code, list(response.headers), body, complete=True)

    async def get(self, target: str) -> Answer:
        await self.send_request("GET", target)
        return await self.rest(await self.head())

    async def closed(self) -> bool:
        """Whether the worker ends the connection (its FIN, or a reset) before sending
        anything more."""
        try:
            return await self.stream.receive_some(65536) == b""
        except trio.BrokenResourceError:
            return True

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


@dataclass
class WebSocket:
    """A WebSocket client (wsproto) over one socket, from the test's own task."""

    stream: trio.SocketStream
    ws: WSConnection = field(default_factory=lambda: WSConnection(ConnectionType.CLIENT))
    pending: list[Event] = field(default_factory=list)

    @classmethod
    async def connect(cls, port: int, target: str) -> WebSocket:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await client.send(Request(host="switchboard.test", target=target))
        assert isinstance(await client.event(), AcceptConnection)
        return client

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def event(self) -> Event:
        while not self.pending:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the connection ended")
            self.ws.receive_data(data)
            self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def echo(self, text: str) -> str:
        await self.send(TextMessage(data=text))
        event = await self.event()
        assert isinstance(event, TextMessage) and event.message_finished, event
        return event.data


# -- connections hold no task -----------------------------------------------------------------


async def test_idle_connections_streams_and_tunnels_hold_no_task() -> None:
    backend = Backend()
    echo = WebSocketEchoBackend()
    async with backends_in_thread(backend.serve, echo.serve) as loop:
        routes = [
            route("/ws", f"http://127.0.0.1:{echo.port}"),
            route("/", backend.url),
        ]
        async with running_worker(routes) as worker:
            before = len(all_tasks())
            keepalive = []
            for _ in range(IDLE_KEEPALIVE):
                client = await Client.connect(worker.port)
                answer = await client.get("/ok")
                assert (answer.status, answer.body) == (200, b"ok")
                keepalive.append(client)
            streams = []
            for _ in range(IDLE_STREAMS):
                client = await Client.connect(worker.port)
                await client.send_request("GET", "/events")
                head = await client.head()
                assert head.status_code == 200
                first = await client.body_until(lambda body: body.endswith(b"\n\n"))
                assert first == b"data: first\n\n"
                streams.append((client, head, first))
            tunnels = [
                await WebSocket.connect(worker.port, f"/ws/{i}") for i in range(IDLE_TUNNELS)
            ]
            for i, tunnel in enumerate(tunnels):
                assert await tunnel.echo(f"hello {i}") == f"hello {i}"
            await eventually(lambda: backend.streams_waiting == IDLE_STREAMS, "streams parked")

            # Everything is idle: the worker holds sockets and machines, no task.
            assert worker.ctx.active_connections == IDLE_KEEPALIVE + IDLE_STREAMS + IDLE_TUNNELS
            assert len(all_tasks()) == before

            # And every one of them still works.
            for client in keepalive:
                answer = await client.get("/ok")
                assert (answer.status, answer.body, answer.complete) == (200, b"ok", True)
            loop.call(backend.release.set)
            for client, head, first in streams:
                answer = await client.rest(head, first)
                assert answer.body == b"data: first\n\ndata: second\n\n" and answer.complete
            for i, tunnel in enumerate(tunnels):
                assert await tunnel.echo(f"again {i}") == f"again {i}"
            assert len(all_tasks()) == before
            for client in keepalive:
                await client.aclose()
            for client, _, _ in streams:
                await client.aclose()
            for tunnel in tunnels:
                await trio.aclose_forcefully(tunnel.stream)


# -- backpressure -----------------------------------------------------------------------------


def held(io: ClientIO) -> int:
    """Bytes the worker holds for this connection's exchange, in its own buffers."""
    up = io.up
    return sum(map(len, io.out)) + (sum(map(len, up.out)) if up is not None else 0) + len(io.m.buf)


async def test_a_slow_reader_pauses_the_backend_and_gets_every_byte_in_order() -> None:
    backend = Backend()
    async with (
        backends_in_thread(backend.serve),
        running_worker([route("/", backend.url)]) as worker,
    ):
        client = await Client.connect(worker.port, receive_buffer=SMALL_BUFFER)
        await client.send_request("GET", "/blob")
        io = await _connection_of(worker, client)
        # The client reads nothing: the worker stops reading the backend once the
        # client's socket is full, and the backend's writes then block.
        await eventually(lambda: io.up is not None and io.up.paused, "backend paused")
        x = io.m.x
        assert x is not None
        read_when_paused = x.bytes_out
        progress: list[int] = []

        def backend_blocked() -> bool:
            # The backend's count stays put for a while: its writes wait.
            progress.append(backend.sent)
            return len(progress) > 20 and len(set(progress[-20:])) == 1

        await eventually(backend_blocked, "backend blocked")
        assert backend.sent < DOWNLOAD
        assert x.bytes_out == read_when_paused  # the worker read nothing more meanwhile
        assert held(io) <= HELD_LIMIT

        # Read it all, a little at a time; the worker never holds more than one read.
        response = await client.head()
        assert response.status_code == 200
        digest = hashlib.sha256()
        length = 0
        most = 0
        reads = 0
        while True:
            event = await client.event()
            if isinstance(event, h11.EndOfMessage):
                break
            assert isinstance(event, h11.Data), event
            digest.update(event.data)
            length += len(event.data)
            if not io.closed:
                most = max(most, held(io))
            reads += 1
            if reads % 4 == 0:
                await trio.sleep(0.001)  # a slow reader
        assert (length, digest.hexdigest()) == (DOWNLOAD, pattern_sha256(DOWNLOAD, seed=3))
        assert most <= HELD_LIMIT
        await client.aclose()


async def test_an_upload_into_a_slow_backend_arrives_whole() -> None:
    backend = Backend()
    body = b"".join(pattern_chunks(BIG, seed=5))
    async with (
        backends_in_thread(backend.serve) as loop,
        running_worker([route("/", backend.url)]) as worker,
    ):
        client = await Client.connect(worker.port)
        upload = client.request_bytes("POST", "/upload", body)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.stream.send_all, upload)
            io = await _connection_of(worker, client)
            # The backend does not read yet: the worker stops reading the client
            # instead of taking the upload into memory.
            await eventually(lambda: not io.mask & 0x001, "client paused")
            assert held(io) <= HELD_LIMIT
            loop.call(backend.go.set)
        answer = await client.rest(await client.head())
        assert json.loads(answer.body) == {"length": BIG, "sha256": pattern_sha256(BIG, seed=5)}
        assert backend.upload == (BIG, pattern_sha256(BIG, seed=5))
        await client.aclose()


async def _connection_of(worker: Worker, client: Client) -> ClientIO:
    found: list[ClientIO] = []

    def accepted() -> bool:
        try:
            found.append(worker.connection(client.port))
        except LookupError:
            return False
        return True

    await eventually(accepted, "connection accepted")
    return found[0]


# -- deadlines --------------------------------------------------------------------------------


async def test_keepalive_timeout_closes_an_idle_connection_with_nothing_else_happening() -> None:
    backend = Backend()
    async with backends_in_thread(backend.serve):
        limits = LimitsConfig(keepalive_timeout=0.3)
        async with running_worker([route("/", backend.url)], limits=limits) as worker:
            client = await Client.connect(worker.port)
            assert (await client.get("/ok")).status == 200
            with trio.fail_after(WAIT):
                assert await client.closed()
            await eventually(lambda: worker.ctx.active_connections == 0, "connection gone")


async def test_stream_idle_timeout_ends_a_silent_stream() -> None:
    backend = Backend()
    async with backends_in_thread(backend.serve) as loop:
        upstream = UpstreamConfig(stream_idle_timeout=0.3)
        async with running_worker([route("/", backend.url)], upstream=upstream) as worker:
            client = await Client.connect(worker.port)
            await client.send_request("GET", "/events")
            head = await client.head()
            first = await client.body_until(lambda body: body.endswith(b"\n\n"))
            with trio.fail_after(WAIT):
                answer = await client.rest(head, first)
            # Cut, not ended: a client must not take a stream the proxy gave up on for
            # one the backend finished.
            assert answer.body == b"data: first\n\n" and not answer.complete
            await eventually(lambda: worker.ctx.active_connections == 0, "connection gone")
            loop.call(backend.release.set)


# -- drain ------------------------------------------------------------------------------------


async def test_drain_ends_each_kind_of_connection_as_it_should() -> None:
    backend = Backend()
    echo = WebSocketEchoBackend()
    async with backends_in_thread(backend.serve, echo.serve) as loop:
        routes = [route("/ws", f"http://127.0.0.1:{echo.port}"), route("/", backend.url)]
        async with running_worker(routes, drain_timeout=WAIT) as worker:
            idle = await Client.connect(worker.port)
            assert (await idle.get("/ok")).status == 200
            busy = await Client.connect(worker.port)
            await busy.send_request("GET", "/slow")
            stream = await Client.connect(worker.port)
            await stream.send_request("GET", "/events")
            stream_head = await stream.head()
            first = await stream.body_until(lambda body: body.endswith(b"\n\n"))
            tunnel = await WebSocket.connect(worker.port, "/ws/drain")
            assert await tunnel.echo("before") == "before"
            await eventually(lambda: b"/slow" in backend.targets, "request in flight")

            # What a worker does on SIGTERM (the signal goes to this process, where the
            # worker's signal receiver takes it).
            os.kill(os.getpid(), signal.SIGTERM)
            await eventually(lambda: worker.ctx.draining, "draining")

            with trio.fail_after(WAIT):
                assert await idle.closed()
                answer = await stream.rest(stream_head, first)
                assert answer.complete
                assert answer.body == first + b"retry: %d\n\n" % ServerConfig().drain_retry_ms
                assert await stream.closed()
                close = await tunnel.event()
                assert isinstance(close, CloseConnection) and close.code == 1001, close
                await tunnel.send(close.response())
                # The backend hears the close through the tunnel (and answers it with a
                # close of its own), then ends the connection: so does the worker.
                while await tunnel.stream.receive_some(65536):
                    pass
                await tunnel.stream.aclose()

                loop.call(backend.release.set)
                answer = await busy.rest(await busy.head())
                assert (answer.status, answer.body, answer.complete) == (200, b"slow", True)
                assert answer.header(b"connection") == [b"close"]
                assert await busy.closed()
                # Nothing is left to serve: the worker stops by itself.
                await worker.stopped.wait()
        for client in (idle, busy, stream):
            await client.aclose()
        await trio.aclose_forcefully(tunnel.stream)


# -- a bug costs one connection ---------------------------------------------------------------


async def test_a_bug_in_one_connection_costs_that_connection_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = Backend()

    class BuggyConnection(Connection):
        def upstream_data(self, data: bytes) -> None:
            if b"BOOM" in data:
                raise RuntimeError("a bug in the connection machine")
            super().upstream_data(data)

    # The reactor makes each connection's machine where it accepts (its module's name
    # for the class), so a subclass put there is what every new connection gets.
    monkeypatch.setattr(accepting, "Connection", BuggyConnection)
    async with (
        backends_in_thread(backend.serve),
        running_worker([route("/", backend.url)]) as worker,
    ):
        bystander = await Client.connect(worker.port)
        assert (await bystander.get("/ok")).status == 200
        victim = await Client.connect(worker.port)
        await victim.send_request("GET", "/boom")
        with trio.fail_after(WAIT):
            assert await victim.closed()
        pool = worker.ctx.pools[backend.url]
        await eventually(lambda: pool.in_use == 0, "backend connection given back")
        assert worker.ctx.active_connections == 1
        # The others never noticed; new connections are served as before.
        assert (await bystander.get("/ok")).body == b"ok"
        newcomer = await Client.connect(worker.port)
        assert (await newcomer.get("/ok")).body == b"ok"
        for client in (bystander, victim, newcomer):
            await client.aclose()


# -- backends that fail -----------------------------------------------------------------------


async def test_a_refusing_backend_costs_its_requests_only() -> None:
    backend = Backend()
    refusing = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with backends_in_thread(backend.serve):
        routes = [route("/refused", refusing), route("/", backend.url)]
        async with running_worker(routes) as worker:
            for attempt in range(3):
                # 502 until passive health ejects the backend, then 503: nothing to try.
                client = await Client.connect(worker.port)
                status = (await client.get("/refused")).status
                assert status == 502 or (attempt and status == 503), status
                other = await Client.connect(worker.port)
                assert (await other.get("/ok")).body == b"ok"
                for each in (client, other):
                    await each.aclose()


async def test_a_backend_whose_first_address_refuses_is_reached_on_the_next() -> None:
    # A name may resolve to addresses that do not all listen (``localhost``: ::1 and
    # 127.0.0.1, the backend bound to one of them).
    backend = Backend()
    refused_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with (
        backends_in_thread(backend.serve),
        running_worker([route("/refused", refused_url), route("/", backend.url)]) as worker,
    ):
        pool = worker.ctx.pools[backend.url]
        refusing: list[tuple[int, Any]] = [
            (socket.AF_INET, ("127.0.0.1", free_port())) for _ in range(2)
        ]
        pool.addresses = [*refusing, *pool.addresses]
        client = await Client.connect(worker.port)
        assert (await client.get("/ok")).body == b"ok"
        await client.aclose()
        # Every address refusing: one failure, answered 502, as with a single address.
        worker.ctx.pools[refused_url].addresses = refusing
        client = await Client.connect(worker.port)
        assert (await client.get("/refused")).status == 502
        await client.aclose()


async def test_a_backend_reset_mid_response_cuts_that_response_only() -> None:
    backend = Backend()
    async with (
        backends_in_thread(backend.serve),
        running_worker([route("/", backend.url)]) as worker,
    ):
        cut = await Client.connect(worker.port)
        await cut.send_request("GET", "/cut")
        with trio.fail_after(WAIT):
            answer = await cut.rest(await cut.head())
        assert answer.body == b"x" * 100 and not answer.complete
        client = await Client.connect(worker.port)
        assert (await client.get("/ok")).body == b"ok"
        await eventually(lambda: worker.ctx.pools[backend.url].open == 1, "cut one closed")
        for each in (cut, client):
            await each.aclose()


async def test_a_pooled_connection_closed_while_idle_is_dropped_without_a_failure() -> None:
    backend = Backend()
    async with (
        backends_in_thread(backend.serve) as loop,
        running_worker([route("/", backend.url)]) as worker,
    ):
        client = await Client.connect(worker.port)
        assert (await client.get("/ok")).body == b"ok"
        pool = worker.ctx.pools[backend.url]
        assert len(pool.idle) == 1 and backend.accepted == 1
        await eventually(lambda: backend.idle_connections == 1, "backend waiting")
        loop.call(backend.close_idle)
        # Noticed by the reactor at once, with no request to find out.
        await eventually(lambda: not pool.idle and pool.open == 0, "dropped")
        answer = await client.get("/ok")
        assert (answer.status, answer.body) == (200, b"ok")
        assert backend.accepted == 2
        await client.aclose()
