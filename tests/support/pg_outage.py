"""PostgreSQL and PgBouncer outages for tests: stop and restart both, crash either, or
freeze PostgreSQL.

``running_cluster()`` gives a test a cluster of its own (``running_postgres``), since an
outage of the session's shared cluster would break every other test using it.
``cluster.stop()`` stops PgBouncer and then PostgreSQL (``pg_ctl stop -m fast``);
``cluster.start()`` brings both back on the same ports; ``cluster.crash_postgres()``
SIGKILLs every PostgreSQL process (what the server had not written is gone, as in a
crash) and ``cluster.start_postgres()`` starts it again, through crash recovery;
``cluster.crash_bouncer()`` / ``start_bouncer()`` do the same to PgBouncer;
``paused(cluster)`` sends SIGSTOP to every PostgreSQL process (the postmaster and its
backends) and SIGCONT afterwards, so anything talking to it hangs rather than fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import psutil
import trio

from tests.support.postgres import (
    PG_BIN,
    PGBOUNCER,
    PgEnv,
    _as_owner,
    _run,
    _wait_port,
    running_postgres,
)
from tests.support.threads import entered_in_thread


class Cluster:
    def __init__(self, env: PgEnv) -> None:
        self.env = env
        self.root = env.socket_dir.parent
        self.data = self.root / "data"
        self._bouncer: subprocess.Popen[bytes] | None = None
        self._env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}

    def _bouncer_pid(self) -> int | None:
        try:
            return int((self.root / "pgbouncer.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().splitlines()[0])

    def stop_sync(self) -> None:
        pid = self._bouncer_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
                psutil.Process(pid).wait(timeout=10)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        _run(
            [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
            env=self._env,
        )

    def start_sync(self) -> None:
        self.start_postgres_sync()
        self.start_bouncer_sync()

    def start_postgres_sync(self) -> None:
        options = (
            f"-p {self.env.port} -k {self.env.socket_dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        log = str(self.root / "postgres.log")
        _run(
            [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", log, "-o", options, "-w", "start"],
            env=self._env,
        )

    def start_bouncer_sync(self) -> None:
        self._bouncer = subprocess.Popen(
            [PGBOUNCER, str(self.root / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            env=self._env,
            **_as_owner(),
        )
        _wait_port(self.env.bouncer_port, self._bouncer, self.root / "pgbouncer.log", 10.0)

    async def stop(self) -> None:
        await trio.to_thread.run_sync(self.stop_sync)

    async def start(self) -> None:
        await trio.to_thread.run_sync(self.start_sync)

    async def crash_postgres(self) -> None:
        """SIGKILL the postmaster and every backend at once, and wait until they are gone."""
        await trio.to_thread.run_sync(_kill_all, self.processes())

    async def start_postgres(self) -> None:
        await trio.to_thread.run_sync(self.start_postgres_sync)

    async def crash_bouncer(self) -> None:
        pid = self._bouncer_pid()
        assert pid is not None, "PgBouncer is not running"
        await trio.to_thread.run_sync(_kill_all, [psutil.Process(pid)])
        if self._bouncer is not None and self._bouncer.pid == pid:
            self._bouncer.wait()

    async def start_bouncer(self) -> None:
        await trio.to_thread.run_sync(self.start_bouncer_sync)

    def processes(self) -> list[psutil.Process]:
        postmaster = psutil.Process(self._postmaster_pid())
        return [postmaster, *postmaster.children(recursive=True)]

    def close(self) -> None:
        if self._bouncer is not None:
            self._bouncer.terminate()
            self._bouncer.wait(timeout=10)


def _kill_all(processes: list[psutil.Process]) -> None:
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=10)


@asynccontextmanager
async def running_cluster() -> AsyncIterator[Cluster]:
    async with entered_in_thread(running_postgres()) as env:
        cluster = Cluster(env)
        try:
            yield cluster
        finally:
            cluster.close()


@asynccontextmanager
async def paused(cluster: Cluster) -> AsyncIterator[None]:
    frozen = cluster.processes()
    for process in frozen:
        process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for process in frozen:
            with suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)
