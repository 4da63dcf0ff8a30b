"""What the reactor reads of Trio's run loop agrees with Trio's public statistics."""

from __future__ import annotations

import math

import trio

from proxy.net.reactor import Reactor
from proxy.net.trio_loop import TrioLoop, task_name


async def test_the_state_read_from_the_runner_is_what_trio_reports() -> None:
    loop = TrioLoop()
    assert loop.epoll_fd is not None  # Linux: Trio's I/O manager is epoll
    idle, wait = loop.state()
    stats = trio.lowlevel.current_statistics()
    assert idle == (not stats.tasks_runnable and not stats.run_sync_soon_queue_size)
    assert _close(wait, stats.seconds_to_next_deadline)
    with trio.move_on_after(0.5):
        idle, wait = loop.state()
        assert 0 < wait <= 0.5  # this scope's deadline is now the next one
        assert _close(wait, trio.lowlevel.current_statistics().seconds_to_next_deadline)
        await trio.sleep_forever()
    assert loop.state()[1] > 0.5 or loop.state()[1] == math.inf


def _close(a: float, b: float) -> bool:
    return a == b or abs(a - b) < 0.05


async def test_a_runnable_task_makes_the_loop_busy() -> None:
    loop = TrioLoop()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)  # runnable until the nursery's body yields
        assert loop.state()[0] is False
        assert trio.lowlevel.current_statistics().tasks_runnable
    await trio.testing.wait_all_tasks_blocked()
    assert loop.state()[0] is True


def test_the_public_statistics_stand_in_where_the_runner_is_not_readable() -> None:
    async def main() -> tuple[bool, float]:
        loop = TrioLoop()
        loop._runner = None
        return loop.state()

    idle, wait = trio.run(main)
    assert idle is True and wait == math.inf


def test_task_names_are_module_and_qualified_name() -> None:
    assert task_name(Reactor, Reactor.run) == "proxy.net.reactor.Reactor.run"
    assert task_name(Reactor, Reactor._keep_time) == "proxy.net.reactor.Reactor._keep_time"
