"""What the reactor reads of Trio's own run loop.

The reactor waits in its own epoll set once no other task can run (``Reactor._wait``):
for that it needs Trio's epoll descriptor (put in its set, so Trio's I/O wakes it), and,
before each wait, whether any task can run and when Trio's next deadline is. Trio has
public ways to ask only some of this (``current_statistics`` builds a record and counts
every registered descriptor, 1.4 µs, twice per request when requests come one by one),
so this reads the runner's own fields where this Trio has them, and falls back on the
public calls (or on waiting through Trio alone) where it does not.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any

import trio

_RUNNER_FIELDS = ("runq", "entry_queue", "deadlines", "clock")


def _current_runner() -> Any:
    """The running Trio loop's runner (Trio has no public name for it)."""
    return getattr(getattr(trio._core._run, "GLOBAL_RUN_CONTEXT", None), "runner", None)


class TrioLoop:
    """The running loop, as the reactor sees it (made inside ``trio.run``)."""

    __slots__ = ("_runner", "epoll_fd")

    def __init__(self) -> None:
        runner = _current_runner()
        epoll = getattr(getattr(runner, "io_manager", None), "_epoll", None)
        self.epoll_fd: int | None = epoll.fileno() if isinstance(epoll, select.epoll) else None
        """The epoll descriptor of Trio's I/O manager (on Linux), or None where this Trio
        keeps it elsewhere (the reactor then waits through Trio alone). The reactor only
        ever polls it, never changes it."""
        self._runner: Any = (
            runner if all(hasattr(runner, name) for name in _RUNNER_FIELDS) else None
        )

    def state(self) -> tuple[bool, float]:
        """Whether no task can run (none runnable, nothing queued to run soon), and the
        seconds to Trio's next deadline (negative when it has passed)."""
        runner = self._runner
        if runner is None:
            stats = trio.lowlevel.current_statistics()
            idle = not stats.tasks_runnable and not stats.run_sync_soon_queue_size
            return idle, stats.seconds_to_next_deadline
        idle = not runner.runq and not runner.entry_queue.size()
        return idle, runner.deadlines.next_deadline() - runner.clock.current_time()


def task_name(owner: type, method: Callable[..., object]) -> str:
    """A Trio task's name for a method of ``owner``, as Trio makes it from the function's
    module and qualified name: a compiled method has neither, and its tasks would all be
    named "None.None"."""
    return f"{owner.__module__}.{getattr(method, '__qualname__', None) or method.__name__}"
