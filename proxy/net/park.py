"""One readiness set for the two sockets of every event stream in a worker.

An SSE stream is idle nearly all its life. Waiting for it the plain Trio way costs two
blocked receives in two tasks (the relay reading the backend, a watcher reading the
client to notice it leaving), each a chain of suspended coroutines plus a nursery: most
of what a held stream costs in memory. Here both sockets of every stream sit in one
edge-triggered epoll set owned by the worker, watched by one system task.

A stream waits in one of two ways:

- **parked** (the usual case): its task ends. Nothing of it stays but its objects (the
  sockets, the two h11 connections, the relay); no coroutine, task or cancel scope. When
  a side has bytes, or the stream's own deadline passes (idle timeout, keep-alive
  comment), or a drain begins, the park starts a new task in the worker's connection
  nursery with the stream's ``wake`` callback, which carries on where the old one
  stopped (``proxy.net.http_conn.ClientConnection.resume_stream``);
- **in its task** (``wait``), when parking is not possible: during a drain, or while the
  request body is still being uploaded by a sibling task.

Edge-triggered means a side is reported once per arrival, so ``ready`` keeps a bit per
side until a read of that side comes back empty (``settle``).
"""

from __future__ import annotations

import contextlib
import heapq
import math
import select
from collections.abc import Awaitable, Callable

import trio

BACKEND = 1
CLIENT = 2
BACKEND_OUT = 4
CLIENT_OUT = 8
"""Bits of ``ParkedStream.ready``: a side may have bytes (or its end) to read, or room
to write (``OUT``, for streams entered with ``writes``)."""
_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_BATCH = 1024

Wake = Callable[[], Awaitable[None]]


class ParkedStream:
    """The two sockets of one stream in the park. ``ready`` has a bit per side that may
    have bytes (or its end) to read, and for streams entered with ``writes`` one per side
    that may have room to write; ``interest`` says which of them wake the stream."""

    __slots__ = (
        "_deadline",
        "_task",
        "_timer",
        "_wake",
        "backend_fd",
        "client_fd",
        "interest",
        "ready",
    )

    def __init__(self, backend_fd: int, client_fd: int) -> None:
        self.backend_fd = backend_fd
        self.client_fd = client_fd
        self.ready = BACKEND | CLIENT  # bytes may have come before it entered
        self.interest = BACKEND | CLIENT
        """The ``ready`` bits that wake the stream."""
        self._task: trio.lowlevel.Task | None = None
        self._wake: Wake | None = None
        """Set while parked: what carries the stream on."""
        self._deadline = math.inf
        self._timer = math.inf
        """The deadline of this stream's live entry in the park's timer heap."""

    def settle(self, side: int) -> None:
        """A read of ``side`` came back empty: wait for its next arrival."""
        self.ready &= ~side

    @property
    def parked(self) -> bool:
        return self._wake is not None


class StreamPark:
    """The worker's readiness set; its watcher starts with the first stream of a run.

    ``nursery`` is where woken streams get their tasks; without one (a connection
    served outside a worker) streams only wait in their tasks."""

    __slots__ = (
        "_epoll",
        "_left_timers",
        "_members",
        "_parked",
        "_ticket",
        "_timers",
        "_token",
        "_watcher_scope",
        "nursery",
    )

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._members: dict[int, tuple[ParkedStream, int]] = {}
        self._parked: set[ParkedStream] = set()
        self._timers: list[tuple[float, int, ParkedStream]] = []
        self._ticket = 0
        self._left_timers = 0
        """Heap entries of streams that left since the heap was last compacted."""
        self._token: trio.lowlevel.TrioToken | None = None
        self._watcher_scope: trio.CancelScope | None = None
        self.nursery: trio.Nursery | None = None

    def enter(self, backend_fd: int, client_fd: int, *, writes: bool = False) -> ParkedStream:
        """Watch both sockets of a stream (until ``leave``); for room to write too with
        ``writes``."""
        epoll = self._started()
        member = ParkedStream(backend_fd, client_fd)
        events = _EVENTS | (select.EPOLLOUT if writes else 0)
        for fd, side in ((backend_fd, BACKEND), (client_fd, CLIENT)):
            self._members[fd] = (member, side)
            try:
                epoll.register(fd, events)
            except FileExistsError:
                # Left registered by a stream whose socket closed before it left.
                epoll.modify(fd, events)
        return member

    def leave(self, member: ParkedStream) -> None:
        self._parked.discard(member)
        member._wake = None
        if member._timer < math.inf:
            # Its heap entry is dead now. With a long idle timeout and many short streams
            # such entries would pile up until their deadlines: drop them in batches.
            member._timer = math.inf
            self._left_timers += 1
            timers = self._timers
            if self._left_timers > 1024 and self._left_timers * 2 > len(timers):
                timers[:] = [entry for entry in timers if entry[2]._timer == entry[0]]
                heapq.heapify(timers)
                self._left_timers = 0
        for fd in (member.backend_fd, member.client_fd):
            if self._members.get(fd, (None, 0))[0] is member:
                del self._members[fd]
                if self._epoll is not None:
                    # Closed already: the kernel dropped it from the set.
                    with contextlib.suppress(OSError, ValueError):
                        self._epoll.unregister(fd)

    def can_park(self) -> bool:
        return self.nursery is not None

    def park(self, member: ParkedStream, deadline: float, wake: Wake) -> None:
        """Hand the stream over: ``wake`` runs in a new task when a side is ready (at
        once if one is), at ``deadline``, or when a drain begins (``wake_all``)."""
        member._wake = wake
        member._deadline = deadline
        self._parked.add(member)
        if member.ready & member.interest:
            self._wake(member)
        elif deadline < member._timer:
            # One live timer entry per stream: a later deadline is not pushed, the earlier
            # entry moves it on when it fires (re-parking every event would otherwise
            # leave an entry per event in the heap until its deadline).
            self._push_timer(member, deadline)

    def _push_timer(self, member: ParkedStream, deadline: float) -> None:
        self._ticket += 1
        member._timer = deadline
        heapq.heappush(self._timers, (deadline, self._ticket, member))
        scope = self._watcher_scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline

    def wake_all(self) -> None:
        """Every parked stream gets its task back (a drain: each decides how to end)."""
        for member in list(self._parked):
            self._wake(member)

    async def wait(self, member: ParkedStream) -> None:
        """Until a side of ``member`` is ready (at once if one is); cancellable."""
        if member.ready & member.interest:
            await trio.lowlevel.checkpoint()
            return
        member._task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            member._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _wake(self, member: ParkedStream) -> None:
        wake = member._wake
        if wake is None:
            return
        member._wake = None
        member._deadline = math.inf
        self._parked.discard(member)
        nursery = self.nursery
        try:
            if nursery is None:
                raise RuntimeError("no nursery")
            nursery.start_soon(wake)
        except RuntimeError:
            # The worker is past serving (its connection nursery closed): nobody is
            # left to carry the stream on. It is dropped; its sockets close with its
            # objects.
            self.leave(member)

    # -- the watcher ----------------------------------------------------------------------

    def _started(self) -> select.epoll:
        token = trio.lowlevel.current_trio_token()
        if self._epoll is None or self._token is not token:
            # A new Trio run (tests start several): a fresh set and watcher.
            self._members.clear()
            self._parked.clear()
            self._timers.clear()
            self._left_timers = 0
            self._epoll = select.epoll()
            self._token = token
            trio.lowlevel.spawn_system_task(self._watch, self._epoll, name="stream-park")
        return self._epoll

    async def _watch(self, epoll: select.epoll) -> None:
        timers = self._timers
        try:
            while True:
                scope = trio.CancelScope(deadline=timers[0][0] if timers else math.inf)
                self._watcher_scope = scope
                with scope:
                    await trio.lowlevel.wait_readable(epoll.fileno())
                self._watcher_scope = None
                now = trio.current_time()
                while timers and timers[0][0] <= now:
                    deadline, _, member = heapq.heappop(timers)
                    if member._timer != deadline:
                        continue  # superseded by an earlier entry
                    member._timer = math.inf
                    if member._wake is None:
                        continue  # woken already
                    if member._deadline <= now:
                        self._wake(member)
                    else:
                        self._push_timer(member, member._deadline)
                for fd, events in epoll.poll(0, _BATCH):
                    found = self._members.get(fd)
                    if found is None:
                        continue
                    member, side = found
                    bits = (side if events & _READ_EVENTS else 0) | (
                        side << 2 if events & _WRITE_EVENTS else 0
                    )
                    member.ready |= bits
                    if not bits & member.interest:
                        continue
                    task = member._task
                    if task is not None:
                        member._task = None
                        trio.lowlevel.reschedule(task)
                    elif member._wake is not None:
                        self._wake(member)
        finally:
            for member in list(self._parked):
                self.leave(member)  # dropped: see _wake
            epoll.close()
            if self._epoll is epoll:
                self._epoll = None
