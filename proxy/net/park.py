"""One readiness set for the two sockets of every event stream in a worker.

An SSE stream is idle nearly all its life. Waiting for it the plain Trio way costs two
blocked receives in two tasks (the relay reading the backend, a watcher reading the
client to notice it leaving), each a chain of suspended coroutines plus a nursery: most
of what a held stream costs in memory. Here both sockets of every stream sit in one
edge-triggered epoll set owned by the worker, watched by one system task; a stream's
relay waits for "either side has something" in a single suspension and then reads with
plain non-blocking calls.

Edge-triggered means a side is reported once per arrival, so ``ready`` keeps a bit per
side until a read of that side comes back empty (``settle``).
"""

from __future__ import annotations

import contextlib
import select

import trio

BACKEND = 1
CLIENT = 2
_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_BATCH = 1024


class ParkedStream:
    """The two sockets of one stream in the park; ``ready`` has a bit per side that may
    have bytes (or its end) to read."""

    __slots__ = ("_task", "backend_fd", "client_fd", "ready")

    def __init__(self, backend_fd: int, client_fd: int) -> None:
        self.backend_fd = backend_fd
        self.client_fd = client_fd
        self.ready = BACKEND | CLIENT  # bytes may have come before it entered
        self._task: trio.lowlevel.Task | None = None

    def settle(self, side: int) -> None:
        """A read of ``side`` came back empty: wait for its next arrival."""
        self.ready &= ~side


class StreamPark:
    """The worker's readiness set; its watcher starts with the first stream of a run."""

    __slots__ = ("_epoll", "_members", "_token")

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._members: dict[int, tuple[ParkedStream, int]] = {}
        self._token: trio.lowlevel.TrioToken | None = None

    def enter(self, backend_fd: int, client_fd: int) -> ParkedStream:
        """Watch both sockets of a stream (until ``leave``)."""
        epoll = self._started()
        member = ParkedStream(backend_fd, client_fd)
        for fd, side in ((backend_fd, BACKEND), (client_fd, CLIENT)):
            self._members[fd] = (member, side)
            try:
                epoll.register(fd, _EVENTS)
            except FileExistsError:
                # Left registered by a stream whose socket closed before it left.
                epoll.modify(fd, _EVENTS)
        return member

    def leave(self, member: ParkedStream) -> None:
        for fd in (member.backend_fd, member.client_fd):
            if self._members.get(fd, (None, 0))[0] is member:
                del self._members[fd]
                if self._epoll is not None:
                    # Closed already: the kernel dropped it from the set.
                    with contextlib.suppress(OSError, ValueError):
                        self._epoll.unregister(fd)

    async def wait(self, member: ParkedStream) -> None:
        """Until a side of ``member`` is ready (at once if one is); cancellable."""
        if member.ready:
            await trio.lowlevel.checkpoint()
            return
        member._task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            member._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _started(self) -> select.epoll:
        token = trio.lowlevel.current_trio_token()
        if self._epoll is None or self._token is not token:
            # A new Trio run (tests start several): a fresh set and watcher.
            self._members.clear()
            self._epoll = select.epoll()
            self._token = token
            trio.lowlevel.spawn_system_task(self._watch, self._epoll, name="stream-park")
        return self._epoll

    async def _watch(self, epoll: select.epoll) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0, _BATCH):
                    found = self._members.get(fd)
                    if found is None:
                        continue
                    member, side = found
                    member.ready |= side
                    task = member._task
                    if task is not None:
                        member._task = None
                        trio.lowlevel.reschedule(task)
        finally:
            epoll.close()
            if self._epoll is epoll:
                self._epoll = None
