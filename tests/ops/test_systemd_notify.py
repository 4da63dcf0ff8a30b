"""The supervisor talks to systemd: the test plays systemd's part.

The test binds an ``AF_UNIX`` datagram socket, starts the real ``switchboard run`` with
``NOTIFY_SOCKET`` pointing at it and ``WATCHDOG_USEC=500000``, and reads what arrives:

- ``READY=1`` (with a ``STATUS``) is the first message; ``WATCHDOG=1`` then keeps
  arriving (every 250 ms, half of ``WATCHDOG_USEC``) before and after a reload;
- SIGHUP: ``RELOADING=1`` with a ``MONOTONIC_USEC`` taken between the signal and its
  receipt (``Type=notify-reload`` needs it), then ``READY=1`` once the new workers serve;
- SIGTERM: ``STOPPING=1``, and the process exits 0;
- a reload with an invalid config: ``RELOADING=1``, then ``READY=1`` with a ``STATUS``
  naming the failure, a ``reload_failed`` log line naming the key, the same workers still
  serving the old routes; a valid config after that is picked up by the next SIGHUP.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support.backends import (
    HttpBackend,
    HttpClient,
    backend_route,
    poll_until,
    wait_for_line,
)
from tests.support.proxy_process import ProxyProcess, run_proxy
from tests.support.threads import entered_in_thread

WATCHDOG_USEC = 500_000
# sockaddr_un.sun_path holds 108 bytes, NUL included.
_SUN_PATH_MAX = 107


@dataclass(slots=True, frozen=True)
class Notification:
    at: float
    """trio.current_time() when the datagram was read."""
    fields: dict[str, str]

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def has(self, key: str, value: str = "1") -> bool:
        return self.fields.get(key) == value


@dataclass(eq=False)
class FakeSystemd:
    """The listening end of ``NOTIFY_SOCKET``: collects every datagram."""

    path: str
    sock: trio.socket.SocketType
    received: list[Notification] = field(default_factory=list)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    closed: trio.Event = field(default_factory=trio.Event)
    _arrived: trio.Event = field(default_factory=trio.Event)

    async def listen(self) -> None:
        """Read datagrams until ``scope`` is cancelled, then close the socket."""
        try:
            with self.scope:
                while True:
                    payload = await self.sock.recv(4096)
                    lines = payload.decode().split("\n")
                    fields = dict(line.split("=", 1) for line in lines if line)
                    assert len(fields) == len(lines), f"malformed datagram {payload!r}"
                    self.received.append(Notification(trio.current_time(), fields))
                    self._arrived.set()
                    self._arrived = trio.Event()
        finally:
            self.sock.close()
            self.closed.set()

    async def wait_for(
        self, predicate: Callable[[Notification], bool], *, after: int = 0, limit: float = 10
    ) -> int:
        """The index of the first notification at ``after`` or later matching ``predicate``."""
        with trio.fail_after(limit):
            while True:
                for index in range(after, len(self.received)):
                    if predicate(self.received[index]):
                        return index
                await self._arrived.wait()

    def kinds(self) -> list[str]:
        """The non-watchdog messages, in order, by their first key."""
        return [next(iter(n.fields)) for n in self.received if not n.has("WATCHDOG")]


@pytest.fixture
async def systemd(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[FakeSystemd]:
    path = str(tmp_path / "notify.sock")
    short_dir = None
    if len(path.encode()) > _SUN_PATH_MAX:
        short_dir = tempfile.mkdtemp(prefix="sb-notify-")
        path = os.path.join(short_dir, "notify.sock")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(path)
    fake = FakeSystemd(path, sock)
    nursery.start_soon(fake.listen)
    try:
        yield fake
    finally:
        fake.scope.cancel()
        await fake.closed.wait()
        os.unlink(path)
        if short_dir is not None:
            os.rmdir(short_dir)


@pytest.fixture
async def backend(nursery: trio.Nursery) -> HttpBackend:
    server = HttpBackend()
    await nursery.start(server.serve)
    return server


@asynccontextmanager
async def proxy_with_env(
    tmp_path: Path,
    routes: Sequence[Mapping[str, Any]],
    env: Mapping[str, str],
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> AsyncIterator[ProxyProcess]:
    """``run_proxy`` with extra environment, started and stopped in a thread so the
    backends in this trio loop keep serving meanwhile."""
    manager = run_proxy(tmp_path, list(routes), env=env, sections=sections)
    async with entered_in_thread(manager) as proxy:
        yield proxy


def _env(systemd: FakeSystemd) -> dict[str, str]:
    assert "WATCHDOG_PID" not in os.environ  # it would have to name the supervisor
    return {"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _generation_pids(proxy: ProxyProcess, generation: int) -> set[int]:
    return {
        int(line["pid"])
        for line in list(proxy.lines)
        if line.get("event") == "worker_started" and line.get("generation") == generation
    }


def _generation_stopped(line: dict[str, Any]) -> bool:
    return line.get("event") == "generation_stopped" and line.get("generation") == 1


async def _get(proxy: ProxyProcess, path: str) -> int:
    client = await HttpClient.connect(proxy.port)
    try:
        return (await client.request("GET", path)).status
    finally:
        await client.aclose()


async def test_ready_watchdog_reload_stopping(
    tmp_path: Path, systemd: FakeSystemd, backend: HttpBackend
) -> None:
    async with proxy_with_env(tmp_path, [backend_route(backend.port)], _env(systemd)) as proxy:
        status = f"serving on 127.0.0.1:{proxy.port} with 2 workers"
        with trio.fail_after(30):
            ready = await systemd.wait_for(lambda n: n.has("READY"))
            # READY=1 is the first message; the watchdog pings only start after it.
            assert ready == 0
            assert systemd.received[ready].fields == {"READY": "1", "STATUS": status}
            second_ping = await systemd.wait_for(
                lambda n: n.has("WATCHDOG"),
                after=await systemd.wait_for(lambda n: n.has("WATCHDOG"), after=ready) + 1,
            )
            pings = [n for n in systemd.received[ready : second_ping + 1] if n.has("WATCHDOG")]
            assert all(n.fields == {"WATCHDOG": "1"} for n in pings)

            first_generation = _generation_pids(proxy, 1)
            assert first_generation == set(proxy.worker_pids())
            assert len(first_generation) == 2
            before = _monotonic_usec()
            proxy.process.send_signal(signal.SIGHUP)
            reloading = await systemd.wait_for(lambda n: n.has("RELOADING"), after=ready + 1)
            after = _monotonic_usec()
            assert set(systemd.received[reloading].fields) == {"RELOADING", "MONOTONIC_USEC"}
            assert before <= int(systemd.received[reloading]["MONOTONIC_USEC"]) <= after
            ready_again = await systemd.wait_for(lambda n: n.has("READY"), after=reloading + 1)
            reload_took = systemd.received[ready_again].at - systemd.received[reloading].at
            assert systemd.received[ready_again].fields == {"READY": "1", "STATUS": status}
            await wait_for_line(proxy, lambda line: line.get("event") == "reloaded")
            # READY=1 came once the new generation was up: its workers are distinct and
            # running, and the proxy serves.
            # (worker_started may be logged just after READY: wait for both lines)
            await poll_until(lambda: len(_generation_pids(proxy, 2)) == 2, limit=5)
            second_generation = _generation_pids(proxy, 2)
            assert not second_generation & first_generation
            assert second_generation <= set(proxy.worker_pids())
            # A request is sent once the old generation has stopped: one sent while it
            # drains can be reset (see test_drain's queued-connections test).
            await wait_for_line(proxy, _generation_stopped)
            assert set(proxy.worker_pids()) == second_generation
            assert await _get(proxy, "/after-reload") == 200
            # The watchdog keeps pinging after the reload.
            await systemd.wait_for(lambda n: n.has("WATCHDOG"), after=ready_again + 1)

            proxy.process.send_signal(signal.SIGTERM)
            stopping = await systemd.wait_for(lambda n: n.has("STOPPING"), after=ready_again + 1)
            assert systemd.received[stopping].fields == {"STOPPING": "1"}
            code = await trio.to_thread.run_sync(proxy.process.wait, 15)
        assert code == 0

    assert systemd.kinds() == ["READY", "RELOADING", "READY", "STOPPING"]
    # systemd kills a service that does not ping within WATCHDOG_USEC: the pings, every
    # WATCHDOG_USEC / 2 (test_sdnotify.py), go on before, through and after the reload.
    # (How far apart they land on this busy machine is printed, not asserted.)
    alive = [n.at for n in systemd.received[ready : stopping + 1] if n.has("WATCHDOG")]
    stamps = [systemd.received[ready].at, *alive, systemd.received[stopping].at]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    print(
        f"watchdog pings: {len(alive)}, largest gap {max(gaps) * 1000:.0f} ms; "
        f"RELOADING -> READY {reload_took * 1000:.0f} ms"
    )
    pinged = [i for i, n in enumerate(systemd.received) if n.has("WATCHDOG")]
    assert any(ready < i < reloading for i in pinged)
    assert any(ready_again < i < stopping for i in pinged)


async def test_failed_reload_keeps_serving_old_config(
    tmp_path: Path, systemd: FakeSystemd, nursery: trio.Nursery
) -> None:
    old_backend, new_backend = HttpBackend(), HttpBackend()
    await nursery.start(old_backend.serve)
    await nursery.start(new_backend.serve)
    async with proxy_with_env(tmp_path, [backend_route(old_backend.port)], _env(systemd)) as proxy:
        args = proxy.process.args
        assert isinstance(args, list)
        config = trio.Path(args[-1])
        assert config.suffix == ".toml"
        original = await config.read_text()
        old_url = f"http://127.0.0.1:{old_backend.port}"
        new_url = f"http://127.0.0.1:{new_backend.port}"
        assert original.count(old_url) == 1 and original.count("[server]\n") == 1
        valid_new = original.replace(old_url, new_url)
        # The new route is fine, one value is not: nothing of this file may be applied.
        invalid_new = valid_new.replace("[server]\n", "[server]\ndrain_timeout = -1\n")
        with trio.fail_after(30):
            ready = await systemd.wait_for(lambda n: n.has("READY"))
            assert await _get(proxy, "/before") == 200
            workers = set(proxy.worker_pids())
            assert len(workers) == 2

            await config.write_text(invalid_new)
            proxy.process.send_signal(signal.SIGHUP)
            reloading = await systemd.wait_for(lambda n: n.has("RELOADING"), after=ready + 1)
            failed = await systemd.wait_for(lambda n: n.has("READY"), after=reloading + 1)
            status = systemd.received[failed]["STATUS"]
            assert status.startswith("reload failed: ")
            assert "server.drain_timeout" in status and str(config) in status
            line = await wait_for_line(proxy, lambda line: line.get("event") == "reload_failed")
            assert "server.drain_timeout" in line["error"]
            assert line["level"] == "error"
            # The same workers serve the old routes.
            assert await _get(proxy, "/after-failed-reload") == 200
            assert set(proxy.worker_pids()) == workers
            assert [r.target for r in old_backend.requests] == ["/before", "/after-failed-reload"]
            assert new_backend.requests == []
            assert proxy.process.poll() is None

            # The same file, fixed: the next SIGHUP applies it (so the one above really
            # read this file and refused it).
            await config.write_text(valid_new)
            proxy.process.send_signal(signal.SIGHUP)
            reloading_again = await systemd.wait_for(lambda n: n.has("RELOADING"), after=failed + 1)
            ok = await systemd.wait_for(lambda n: n.has("READY"), after=reloading_again + 1)
            assert systemd.received[ok]["STATUS"] == (
                f"serving on 127.0.0.1:{proxy.port} with 2 workers"
            )
            await wait_for_line(proxy, lambda line: line.get("event") == "reloaded")
            await wait_for_line(proxy, _generation_stopped)  # as above
            assert await _get(proxy, "/after-fixed-reload") == 200
            assert [r.target for r in new_backend.requests] == ["/after-fixed-reload"]
            assert len(old_backend.requests) == 2
    await systemd.wait_for(lambda n: n.has("STOPPING"), after=ok + 1)
    assert systemd.kinds() == ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"]
    assert [line.get("event") for line in proxy.lines].count("reload_failed") == 1
