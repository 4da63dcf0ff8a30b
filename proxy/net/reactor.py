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
when it fires.

Waiting: when nothing is ready and no other task of the worker can run, the loop waits
in its own epoll set, which also holds Trio's epoll descriptor, until Trio's next
deadline. A socket that becomes ready is then served at once, without a trip through
Trio's scheduler (that trip cost more than the rest of a wake-up); Trio's own I/O, a
signal or a deadline hands the turn to Trio. Busy, the loop passes a checkpoint every few
batches, so the worker's other tasks (control plane, health checks, admission checks,
the drain) keep running.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import os
import select
import socket
import time
from typing import TYPE_CHECKING, Final

import trio
import trio.testing

from proxy.net.accepting import Listener
from proxy.net.client_io import ClientIO
from proxy.net.listener import stop_new_handshakes
from proxy.net.trio_loop import TrioLoop, task_name
from proxy.net.upstream import UpstreamIO, UpstreamPool

if TYPE_CHECKING:
    from proxy.net.admission import Admission
    from proxy.net.context import WorkerContext

_IN = select.EPOLLIN
_BATCH = 512
_ROUNDS_PER_CHECKPOINT = 4
"""Batches handled between two Trio checkpoints while sockets keep being ready: each
checkpoint is a trip through Trio's scheduler (and its own epoll), which the other tasks
(deadlines, admission checks, the control plane) need only every millisecond or so."""
_BUSY_BATCH = 4
"""A batch this large suggests more sockets are ready already: the loop polls again at
once instead of going through the wait."""
_HANDSHAKE_GRACE = 0.2
"""How long sealed listening sockets stay open for handshakes already under way (a
round trip, with room to spare, for clients on the same network)."""
SEAL_LEAD = _HANDSHAKE_GRACE + 0.3
"""How long before a last worker's drain deadline its listening sockets are sealed: the
grace, then time to answer what was accepted."""
_LONGEST_WAIT = 1.0
"""At most this long in one wait of the reactor's own: Trio checks its deadlines and
signals in between even if every wake-up were missed."""


_TRIO: Final = object()
"""The handler entry of Trio's own epoll descriptor in the reactor's set."""


class Reactor:
    def __init__(self, ctx: WorkerContext, admission: Admission) -> None:
        self.ctx = ctx
        self.admission = admission
        self.epoll = select.epoll()
        self.handlers: dict[int, ClientIO | UpstreamIO | Listener | object] = {}
        self.timers: list[tuple[float, int, ClientIO]] = []
        self._ticket = 0
        self.connections: set[ClientIO] = set()
        self.listeners: list[Listener] = []
        self.dirty: list[ClientIO] = []
        """Connections affected by another one's events (a freed pool slot), to settle."""
        self.stopping = False
        self.refusing = 0
        """Connections being refused for overload, lingering."""
        self.last_worker = False
        """Draining, and no worker will take the listening sockets over."""
        self.sealed = False
        """The listening sockets take no new handshake (``_seal_listeners``)."""
        self.trio_due = False
        """Trio's own I/O became ready during a batch: a checkpoint is due."""
        self.trio_idle = False
        """Every other task was waiting when the loop last waited, and the loop has not
        yielded to Trio since."""
        self._time_scope: trio.CancelScope | None = None
        self._time_target = math.inf
        """The deadline the timekeeper sleeps until."""
        self._trio = TrioLoop()
        """What the loop reads of Trio's own run loop (the worker makes its reactor inside
        ``trio.run``)."""
        self._waker = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.epoll.register(self._waker, _IN)
        self.now = time.monotonic

    # -- registration ---------------------------------------------------------------------

    def register(
        self, fd: int, handler: ClientIO | UpstreamIO | Listener | object, mask: int
    ) -> None:
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
        listener = Listener(sock, self)
        self.listeners.append(listener)
        self.register(sock.fileno(), listener, _IN)

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until a drain is over; connections left then are closed."""
        poll = self.epoll.poll
        checkpoint = trio.lowlevel.checkpoint
        trio_fd = self._trio.epoll_fd
        if trio_fd is not None:
            self.register(trio_fd, _TRIO, _IN)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_time, name=task_name(Reactor, Reactor._keep_time))
                rounds = 0
                busy = True
                while True:
                    if self.stopping and len(self.connections) <= self.refusing:
                        # Draining, and only connections refused on arrival are left:
                        # no more are let in, and the loop ends once those are answered.
                        if self.listeners:
                            if self.last_worker:
                                if not self.sealed:
                                    self._seal_listeners()
                            else:
                                # Whatever waits in the queues is left to the worker
                                # that takes this one's place.
                                self.stop_accepting()
                        elif not self.connections:
                            break
                    # After a small batch the set is most likely empty: straight to the
                    # wait, which returns at once if it is not (one system call, not two,
                    # per wake-up when requests come one by one).
                    events = poll(0, _BATCH) if busy else []
                    if not events:
                        if trio_fd is None:
                            # No cancel scope per wait: deadlines are the timekeeper's,
                            # and whatever else must wake the loop writes to ``_waker``.
                            await trio.lowlevel.wait_readable(self.epoll.fileno())
                            continue
                        # (The loop went idle: the batches before were not back to back,
                        # and other tasks could run if they had anything to do.)
                        rounds = 0
                        stopping = self.stopping
                        events = await self._wait(trio_fd)
                        if self.stopping != stopping:
                            continue  # a drain began meanwhile: the check above comes first
                        if not events:
                            self.trio_idle = False
                            await checkpoint()  # Trio's deadline: its turn
                            continue
                    self.handle(events)
                    busy = len(events) >= _BUSY_BATCH
                    rounds += 1
                    if rounds == _ROUNDS_PER_CHECKPOINT or self.trio_due:
                        # Trio's I/O is ready, or other tasks have waited long enough.
                        rounds = 0
                        self.trio_due = self.trio_idle = False
                        await checkpoint()
                nursery.cancel_scope.cancel()
        finally:
            self._close_everything()

    async def _wait(self, trio_fd: int) -> list[tuple[int, int]]:
        """Nothing is ready: wait in this epoll set, once no other task can run, until
        Trio's next deadline (empty: the deadline came). The set holds Trio's own epoll
        descriptor, so Trio's I/O wakes it too; a socket that becomes ready is served
        without a trip through Trio's scheduler."""
        idle, wait = self._trio.state()
        if not (self.trio_idle and idle):
            # Since the loop last yielded, other tasks may have become runnable in ways
            # the statistics do not show (those later in the batch that resumed this
            # one): Trio says when all of them wait. (``wait_all_tasks_blocked`` is in
            # trio.testing, but an ordinary part of Trio's API.)
            await trio.testing.wait_all_tasks_blocked()
            self.trio_idle = True
            events = self.epoll.poll(0, _BATCH)
            if events:
                return events
            wait = self._trio.state()[1]
        # Every other task waits, and only this loop's own calls (seen in the runner's
        # state) or Trio's I/O (``trio_due``) can have changed that since.
        if wait <= 0:
            return []
        return self.epoll.poll(min(wait, _LONGEST_WAIT), _BATCH)

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
                    handler.accept()
                elif handler is _TRIO:
                    self.trio_due = True
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

    def _failed(self, handler: ClientIO | UpstreamIO | Listener | object | None) -> None:
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
        """A connection to a backend could not be made (to any of its host's resolved
        addresses): the exchange hears of it, and may retry on another replica."""
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

    def seal(self) -> None:
        """Seal the listening sockets now, if they are still open (a last worker whose
        drain is about to reach its deadline)."""
        if self.listeners and not self.sealed:
            self._seal_listeners()

    def _seal_listeners(self) -> None:
        """The end of the last worker's drain: the sockets take no new handshake; the
        handshakes under way complete within ``_HANDSHAKE_GRACE`` and are accepted (and
        refused with a 503) like the rest, then the sockets are closed here. The
        supervisor closes its copies once this worker has exited."""
        self.sealed = True
        for listener in self.listeners:
            try:
                stop_new_handshakes(listener.sock)
            except OSError as exc:
                self.ctx.log.warning("listener_filter_failed", error=str(exc))
        self.ctx.nursery.start_soon(
            self._close_sealed_listeners, name=task_name(Reactor, Reactor._close_sealed_listeners)
        )

    async def _close_sealed_listeners(self) -> None:
        await trio.sleep(_HANDSHAKE_GRACE)
        for listener in self.listeners:
            while listener.accept():
                pass
        self.stop_accepting()
        self.wake()

    def stop_accepting(self) -> None:
        for listener in self.listeners:
            self.unregister(listener.sock.fileno())
            listener.sock.close()
        self.listeners.clear()

    def drain(self, *, keep_listening: bool, last_worker: bool = False) -> None:
        """Every connection finishes what has arrived and ends. ``keep_listening``: new
        connections are still accepted, and answered 503, until the rest is done; else
        the listening sockets are given up now (a new generation of workers is taking
        them over). ``last_worker``: no worker will take the sockets over, so at the end
        what waits in their queues is answered too (``_seal_listeners``)."""
        self.stopping = True
        self.last_worker = last_worker
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
