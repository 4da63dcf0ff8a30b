"""The worker's reactor: one Trio task driving one private epoll set that holds every
client socket, every backend socket and the listening sockets, each registered once for
its life.

Why: Trio's per-operation machinery (a task switch, a ``SocketStream``, a cancel scope
and an epoll re-arm per wait) cost more than everything else a proxied request does
(docs/design.md has the numbers). Here a ready socket costs one ``recv`` and a call into
its connection machine (``proxy.protocol.connection``), which answers with writes that
are tried at once. Level-triggered epoll: a socket whose bytes the machine does not want
yet (backpressure) has its read interest removed until it does.

Deadlines are one heap of (deadline, ticket, connection) with at most one live entry per
connection: a deadline that moves later (the usual case: each request pushes the
keep-alive or response deadline on) is not pushed, the old entry finds the new deadline
when it fires. The task waits on the epoll descriptor through Trio only when nothing is
ready, and passes a checkpoint after every batch, so the worker's other tasks (control
plane, health checks, admission checks, the drain) keep running.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import math
import os
import select
import socket
import time
from typing import TYPE_CHECKING

import trio

from proxy.net.client_io import ClientIO
from proxy.net.upstream import UpstreamIO, UpstreamPool
from proxy.protocol.connection import Connection

if TYPE_CHECKING:
    from proxy.net.admission import Admission
    from proxy.net.context import WorkerContext

_IN = select.EPOLLIN
_BATCH = 512
_ACCEPT_BATCH = 64
# accept() failures that mean "out of resources right now", worth a pause, not a crash.
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_BACKOFF = 0.1
_ROUNDS_PER_CHECKPOINT = 4
"""Batches handled between two Trio checkpoints while sockets keep being ready: each
checkpoint is a trip through Trio's scheduler (and its own epoll), which the other tasks
(deadlines, admission checks, the control plane) need only every millisecond or so."""
_MAX_PENDING_REFUSALS = 256
"""Overload refusals lingering at once; past that, extra connections are closed unanswered
so that refusals cannot exhaust descriptors in a flood."""


class Listener:
    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock


class Reactor:
    def __init__(self, ctx: WorkerContext, admission: Admission) -> None:
        self.ctx = ctx
        self.admission = admission
        self.epoll = select.epoll()
        self.handlers: dict[int, ClientIO | UpstreamIO | Listener] = {}
        self.timers: list[tuple[float, int, ClientIO]] = []
        self._ticket = 0
        self.connections: set[ClientIO] = set()
        self.listeners: list[Listener] = []
        self.dirty: list[ClientIO] = []
        """Connections affected by another one's events (a freed pool slot), to settle."""
        self.stopping = False
        self.refusing = 0
        """Connections being refused for overload, lingering."""
        self._time_scope: trio.CancelScope | None = None
        self._time_target = math.inf
        """The deadline the timekeeper sleeps until."""
        self._waker = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.epoll.register(self._waker, _IN)
        self.now = time.monotonic

    # -- registration ---------------------------------------------------------------------

    def register(self, fd: int, handler: ClientIO | UpstreamIO | Listener, mask: int) -> None:
        self.handlers[fd] = handler
        self.epoll.register(fd, mask)

    def unregister(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)

    def modify(self, fd: int, mask: int) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.epoll.modify(fd, mask)

    def set_mask(self, up: UpstreamIO, mask: int) -> None:
        if mask != up.mask and up.sock is not None:
            up.mask = mask
            self.modify(up.fd, mask)

    def schedule(self, io: ClientIO, deadline: float) -> None:
        self._ticket += 1
        io.timer_at = deadline
        heapq.heappush(self.timers, (deadline, self._ticket, io))
        if deadline < self._time_target:
            self._time_target = deadline
            scope = self._time_scope
            if scope is not None:
                scope.deadline = trio.current_time() + max(0.0, deadline - self.now())

    def add_listener(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        listener = Listener(sock)
        self.listeners.append(listener)
        self.register(sock.fileno(), listener, _IN)

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until a drain is over; connections left then are closed."""
        poll = self.epoll.poll
        checkpoint = trio.lowlevel.checkpoint
        wait_readable = trio.lowlevel.wait_readable
        epfd = self.epoll.fileno()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_time)
                # Draining, the loop ends once only connections refused on arrival are left.
                rounds = 0
                while not self.stopping or len(self.connections) > self.refusing:
                    events = poll(0, _BATCH)
                    if events:
                        self.handle(events)
                        rounds += 1
                        if rounds == _ROUNDS_PER_CHECKPOINT:
                            rounds = 0
                            await checkpoint()
                    else:
                        # No cancel scope per wait: deadlines are the timekeeper's, and
                        # whatever else must wake the loop writes to ``_waker``.
                        await wait_readable(epfd)
                nursery.cancel_scope.cancel()
        finally:
            self._close_everything()

    async def _keep_time(self) -> None:
        """Fire connections' deadlines as they pass. It runs between the loop's batches,
        so deadlines cost the request path nothing: one sleep here lasts until the
        earliest deadline, cut short only when an earlier one is set (``schedule``)."""
        timers = self.timers
        while True:
            deadline = timers[0][0] if timers else math.inf
            scope = trio.CancelScope()
            if deadline < math.inf:
                scope.deadline = trio.current_time() + max(0.0, deadline - self.now())
            self._time_scope = scope
            self._time_target = deadline
            with scope:
                await trio.sleep_forever()
            self._fire_timers()
            if self.dirty:
                self._settle_dirty()

    def handle(self, events: list[tuple[int, int]]) -> None:
        """One batch of ready sockets, each handed to its connection."""
        handlers = self.handlers
        for fd, mask in events:
            handler = handlers.get(fd)
            try:
                if type(handler) is ClientIO:
                    handler.on_event(mask)
                elif type(handler) is UpstreamIO:
                    owner = handler.owner
                    if owner is not None:
                        owner.on_upstream_event(handler, mask)
                    else:
                        handler.pool.dropped_while_idle(self, handler)
                elif type(handler) is Listener:
                    self._accept(handler)
                elif fd == self._waker:
                    os.eventfd_read(self._waker)
            except Exception:
                # A bug must cost one connection, never the worker.
                self._failed(handler)
        if self.dirty:
            self._settle_dirty()

    def wake(self) -> None:
        """Make the loop look at its state again (a drain began, a connection ended)."""
        os.eventfd_write(self._waker, 1)

    def _failed(self, handler: ClientIO | UpstreamIO | Listener | None) -> None:
        io = handler.owner if isinstance(handler, UpstreamIO) else handler
        self.ctx.log.exception("connection_failed")
        if isinstance(io, ClientIO) and not io.closed:
            up = io.up
            io.up = None
            if up is not None:
                self.upstream_finished(up, reusable=False, ok=None, failure=None)
            io.out.clear()
            io._close_now()

    def _settle_dirty(self) -> None:
        dirty, self.dirty = self.dirty, []
        for io in dirty:
            if not io.closed:
                try:
                    io.settle()
                except Exception:
                    self._failed(io)

    def _fire_timers(self) -> None:
        timers = self.timers
        now = self.now()
        while timers and timers[0][0] <= now:
            deadline, _, io = heapq.heappop(timers)
            if io.timer_at != deadline:
                continue  # superseded by an earlier entry
            io.timer_at = math.inf
            if io.closed:
                continue
            if io.close_when_flushed:
                io._close_now()  # its last bytes did not go out within send_timeout
                continue
            try:
                if io.m.deadline <= now:
                    io.m.timer()
                io.settle()
            except Exception:
                self._failed(io)

    # -- connections ------------------------------------------------------------------------

    def _accept(self, listener: Listener) -> None:
        ctx = self.ctx
        config = ctx.config
        limit = config.server.max_connections_per_worker
        proxy_header = config.proxy_protocol.enabled
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _CAPACITY_ERRNOS:
                    ctx.log.warning("accept_backoff", error=errno.errorcode.get(exc.errno or 0))
                    self._pause_accepting(listener)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            overloaded = len(self.connections) - self.refusing >= limit
            if overloaded and self.refusing >= _MAX_PENDING_REFUSALS:
                ctx.overloaded(address)
                sock.close()
                continue
            io = ClientIO(self, sock)
            ip = address[0]
            io.m = Connection(
                ctx,
                io,
                (ip, address[1]),
                proxy_header=proxy_header,
                trusted=proxy_header and ctx.is_trusted_proxy(ip),
            )
            self.register(io.fd, io, _IN)
            self.connections.add(io)
            ctx.connection_opened()
            if overloaded or self.stopping:
                # Full (or a drain refusing new work): the client learns why and when to
                # come back, instead of waiting in a backlog.
                self.refusing += 1
                io.m.refuse_new(self.stopping)
            io.settle()

    def _pause_accepting(self, listener: Listener) -> None:
        self.unregister(listener.sock.fileno())

        async def resume() -> None:
            await trio.sleep(_ACCEPT_BACKOFF)
            if listener in self.listeners:
                self.register(listener.sock.fileno(), listener, _IN)

        self.ctx.nursery.start_soon(resume)

    def client_closed(self, io: ClientIO) -> None:
        self.unregister(io.fd)
        if io in self.connections:
            self.connections.discard(io)
            self.ctx.connection_closed()
            if io.m is not None and io.m.refused_new:
                self.refusing -= 1
            if self.stopping:
                self.wake()  # perhaps the last one: the loop checks whether it is done
        up = io.up
        if up is not None:
            io.up = None
            self.upstream_finished(up, reusable=False, ok=None, failure=None)

    def upstream_finished(
        self, up: UpstreamIO, *, reusable: bool, ok: bool | None, failure: str | None
    ) -> None:
        """A backend connection's exchange is over (its client connection went)."""
        pool = up.pool
        self.upstream_outcome(pool, ok, failure)
        pool.give_back(self, up, reusable=reusable)

    def upstream_outcome(self, pool: UpstreamPool, ok: bool | None, failure: str | None) -> None:
        """Passive health and failure counts of an exchange with ``pool``'s backend."""
        if ok is not None:
            self.ctx.backend_outcome(pool, ok)
        if failure is not None:
            self.ctx.upstream_failure(pool, failure)

    def note_upstream_failure(self, up: UpstreamIO, code: int) -> None:
        """A connection to a backend could not be made: the next address if the backend
        has another, else the exchange hears of it."""
        up.failed = True
        owner = up.owner
        if owner is not None:
            owner.upstream_failed(up, code)
            if owner not in self.dirty:
                self.dirty.append(owner)

    def note_progress(self, up: UpstreamIO) -> None:
        """A queued connection got its slot and is being made."""
        owner = up.owner
        if owner is not None and owner not in self.dirty:
            self.dirty.append(owner)

    # -- stopping ---------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        for listener in self.listeners:
            self.unregister(listener.sock.fileno())
            listener.sock.close()
        self.listeners.clear()

    def drain(self, *, keep_listening: bool) -> None:
        """Every connection finishes what has arrived and ends. ``keep_listening``: new
        connections are still accepted, and answered 503 (the sockets close with the
        worker); else the listening sockets are given up now (a new generation of
        workers is taking them over)."""
        self.stopping = True
        if not keep_listening:
            self.stop_accepting()
        for io in list(self.connections):
            if not io.closed:
                try:
                    io.m.drain()
                    io.settle()
                except Exception:
                    self._failed(io)
        self.wake()

    def _close_everything(self) -> None:
        for io in list(self.connections):
            if not io.closed:
                io.out.clear()
                io.m.abandon()
                io._close_now()
        self.stop_accepting()
        for pool in self.ctx.pools.values():
            pool.close_all(self)
        self.epoll.close()
        os.close(self._waker)
