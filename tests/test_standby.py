"""The standby worker with a real supervisor: it holds every slot's listening socket
while it waits, keeps only the slot it takes, and stops quietly with the proxy."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
import trio

from proxy.standby import slot_fds_from_env, slot_fds_to_env
from tests.support.backends import HttpBackend, backend_route, poll_until, proxy_running
from tests.support.proxy_process import ProxyProcess


@pytest.fixture
async def backend(nursery: trio.Nursery) -> HttpBackend:
    server = HttpBackend()
    await nursery.start(server.serve)
    return server


def _listening(pid: int, port: int) -> int:
    """How many listening sockets on ``port`` the process holds."""
    return sum(
        1
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port
    )


def test_slot_fds_travel_in_one_variable() -> None:
    slots = {0: [5, 6], 1: [7, 8], 2: [9, 10]}
    assert slot_fds_from_env(slot_fds_to_env(slots)) == slots


async def _standby(proxy: ProxyProcess) -> int:
    await poll_until(lambda: proxy.standby_pid() is not None, limit=30)
    pid = proxy.standby_pid()
    assert pid is not None
    return pid


async def test_the_standby_keeps_only_the_slot_it_takes(
    tmp_path: Path, backend: HttpBackend
) -> None:
    async with proxy_running(tmp_path, [backend_route(backend.port)], workers=3) as proxy:
        standby = await _standby(proxy)
        assert standby not in proxy.worker_pids()
        assert _listening(standby, proxy.port) == 3  # every slot's, accepting on none
        victim = proxy.worker_pids()[1]
        os.kill(victim, signal.SIGKILL)
        await poll_until(lambda: standby in proxy.worker_pids(), limit=30)
        # One socket: had it kept the others, connections the kernel hashed to a retired
        # slot's socket would wait for an accept that never comes.
        assert _listening(standby, proxy.port) == 1
        started = {
            line["pid"]: line for line in proxy.lines if line.get("event") == "worker_started"
        }
        assert started[standby]["standby"] is True
        assert started[standby]["worker"] == started[victim]["worker"]
        # And a new standby waits for the next crash.
        await poll_until(lambda: proxy.standby_pid() not in (None, standby), limit=30)
    assert "standby_died" not in {line.get("event") for line in proxy.lines}


async def test_the_standby_stops_with_the_proxy(tmp_path: Path, backend: HttpBackend) -> None:
    async with proxy_running(tmp_path, [backend_route(backend.port)]) as proxy:
        standby = await _standby(proxy)
        process = psutil.Process(standby)
    assert proxy.process.returncode == 0
    assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    assert "standby_died" not in {line.get("event") for line in proxy.lines}


async def test_without_a_standby_a_dead_worker_is_started_again(
    tmp_path: Path, backend: HttpBackend
) -> None:
    sections = {"server": {"standby_worker": False}}
    async with proxy_running(tmp_path, [backend_route(backend.port)], sections=sections) as proxy:
        victim = proxy.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)

        def started() -> list[dict[str, object]]:
            return [line for line in proxy.lines if line.get("event") == "worker_started"]

        await poll_until(lambda: len(started()) == 3, limit=30)
        assert victim not in proxy.worker_pids()
        assert len(proxy.worker_pids()) == 2
    assert [line["standby"] for line in started()] == [False, False, False]
    assert "standby_ready" not in {line.get("event") for line in proxy.lines}
