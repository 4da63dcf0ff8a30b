"""The supervisor: starts N worker processes, restarts crashed ones, stops them cleanly.

Workers are exec'd (``python -m proxy.worker``), never forked from a running Trio loop.
Each gets the validated config as JSON on stdin and a pipe to report readiness on. A
worker that exits unexpectedly is restarted after a back-off that doubles while it keeps
crashing soon after start (0.5 s up to 30 s) and resets once it has run for a while; the
other workers keep serving meanwhile. SIGTERM/SIGINT: workers get SIGTERM and drain;
any still alive after ``drain_timeout`` + a grace period get SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import trio

from proxy.config import Config, effective_workers, parse_hostport, to_json
from proxy.net.listener import check_bindable
from proxy.observability import get_logger
from proxy.worker import READY_FD_ENV, WORKER_ID_ENV

_BACKOFF_START = 0.5
_BACKOFF_MAX = 30.0
_STABLE_AFTER = 10.0
_READY_TIMEOUT = 30.0
_KILL_GRACE = 5.0


class StartupError(Exception):
    """The proxy cannot start (address in use, a worker never became ready, ...)."""


@dataclass(slots=True, eq=False)
class WorkerSlot:
    index: int
    process: trio.Process | None = None
    restarts: int = 0
    ready: trio.Event = field(default_factory=trio.Event)


@dataclass(slots=True, eq=False)
class Supervisor:
    config: Config
    log: Any = field(default_factory=lambda: get_logger("switchboard.supervisor"))
    slots: list[WorkerSlot] = field(default_factory=list)
    stopping: bool = False
    """Set once a stop began; read through is_stopping() (it changes across awaits)."""
    demo_process: trio.Process | None = None

    def is_stopping(self) -> bool:
        return self.stopping

    def preflight(self) -> None:
        for listen in self.config.server.listen:
            try:
                check_bindable(listen)
            except OSError as exc:
                raise StartupError(f"cannot listen on {listen}: {exc.strerror or exc}") from None

    async def _spawn(self, slot: WorkerSlot) -> trio.Process:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env[WORKER_ID_ENV] = str(slot.index)
        env[READY_FD_ENV] = str(write_fd)
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "proxy.worker"],
                stdin=subprocess.PIPE,
                pass_fds=(write_fd,),
                env=env,
            )
        finally:
            os.close(write_fd)
        assert process.stdin is not None
        await process.stdin.send_all(to_json(self.config))
        await process.stdin.aclose()
        slot.process = process
        ready_pipe = trio.lowlevel.FdStream(read_fd)
        with trio.move_on_after(_READY_TIMEOUT):
            line = await ready_pipe.receive_some(64)
            if line.startswith(b"ready"):
                slot.ready.set()
        await ready_pipe.aclose()
        return process

    async def _keep_worker(self, slot: WorkerSlot) -> None:
        backoff = _BACKOFF_START
        while not self.is_stopping():
            started = trio.current_time()
            process = await self._spawn(slot)
            if slot.ready.is_set():
                self.log.info(
                    "worker_started", worker=slot.index, pid=process.pid, restarts=slot.restarts
                )
            code = await process.wait()
            if self.is_stopping():
                return
            slot.ready = trio.Event()
            slot.restarts += 1
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if trio.current_time() - started > _STABLE_AFTER:
                backoff = _BACKOFF_START
            self.log.error(
                "worker_died",
                worker=slot.index,
                pid=process.pid,
                how=how,
                restart_in_s=backoff,
                restarts=slot.restarts,
            )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _start_demo(self) -> None:
        host, port = parse_hostport(self.config.demo.listen)
        self.demo_process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "proxy.demo", "--listen", self.config.demo.listen]
        )
        with trio.move_on_after(30):
            while True:
                try:
                    stream = await trio.open_tcp_stream(host, port)
                except OSError:
                    if self.demo_process.poll() is not None:
                        raise StartupError("the demo MCP backend exited at start") from None
                    await trio.sleep(0.1)
                    continue
                await stream.aclose()
                return
        raise StartupError("the demo MCP backend did not start within 30 s")

    def _signal_workers(self, signum: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signum)

    async def _stop(self) -> None:
        self.stopping = True
        self._signal_workers(signal.SIGTERM)
        deadline = self.config.server.drain_timeout + _KILL_GRACE
        with trio.move_on_after(deadline):
            for slot in self.slots:
                if slot.process is not None:
                    await slot.process.wait()
        self._signal_workers(signal.SIGKILL)
        if self.demo_process is not None and self.demo_process.returncode is None:
            self.demo_process.terminate()
            with trio.move_on_after(5):
                await self.demo_process.wait()
            if self.demo_process.returncode is None:
                self.demo_process.kill()

    async def run(self, *, on_ready: Any = None) -> None:
        self.preflight()
        count = effective_workers(self.config)
        self.slots = [WorkerSlot(i) for i in range(count)]
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            try:
                if self.config.demo.enabled:
                    await self._start_demo()
                async with trio.open_nursery() as nursery:
                    for slot in self.slots:
                        nursery.start_soon(self._keep_worker, slot)
                    with trio.move_on_after(_READY_TIMEOUT) as wait:
                        for slot in self.slots:
                            await slot.ready.wait()
                    if wait.cancelled_caught:
                        await self._stop()
                        raise StartupError("workers did not become ready in time")
                    self.log.info("ready", workers=count, listen=list(self.config.server.listen))
                    if on_ready is not None:
                        on_ready()
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if signum == signal.SIGHUP:
                            self.log.warning(
                                "reload_unsupported",
                                signal=name,
                                detail="restart the service to apply changes",
                            )
                            continue
                        self.log.info("stopping", signal=name)
                        break
                    await self._stop()
                    nursery.cancel_scope.cancel()
            finally:
                if not self.stopping:
                    with trio.CancelScope(shield=True):
                        await self._stop()
        self.log.info("stopped")
