"""The supervisor: owns the listening sockets, runs generations of workers, talks to systemd.

- **Sockets.** The supervisor binds one ``SO_REUSEPORT`` socket per listen address per
  worker slot and hands each worker its own (``pass_fds``); it never accepts on them.
  Because the supervisor keeps them open, a worker that exits never closes its socket:
  connections waiting in its accept queue are not reset but taken by the worker that
  replaces it (a restarted worker, or the next generation on reload). This is what makes
  reloads and crashes lose nothing even without ``net.ipv4.tcp_migrate_req``.
- **Workers** are exec'd (``python -m proxy.worker``), never forked from a running Trio
  loop; each gets the config as JSON on stdin and reports ``ready`` on a pipe
  (``proxy.worker_process``). One that dies is replaced at once by the standby worker
  (``proxy.standby``), started beforehand and waiting; a slot that keeps dying within
  10 s of its start is restarted from scratch after a back-off (0.2 s, doubling up to
  30 s).
- **SIGHUP** reloads: the config is read again; if it is invalid the running generation
  keeps serving and the error is logged. Otherwise a new generation starts on the same
  sockets, and once all its workers are ready the old one is told to hand over
  (HANDOVER_SIGNAL: stop accepting at once, finish, exit).
- **SIGTERM/SIGINT** drain: workers answer new connections 503, finish in-flight
  requests, end streams; any still alive after ``drain_timeout`` + 5 s get SIGKILL. A
  worker done with its drain makes its sockets refuse new handshakes, answers what is
  queued and closes them; the supervisor then closes its copies, so a connection is
  refused or answered, never accepted and then reset.
- **systemd** hears READY, RELOADING, STOPPING, STATUS and WATCHDOG (``proxy.sdnotify``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from proxy.admin import AdminState, serve_admin
from proxy.config import Config, ConfigError, effective_workers, with_session_key
from proxy.config_errors import Origins
from proxy.metrics import MULTIPROC_ENV, mark_process_dead, metrics
from proxy.net.database import watch_for_readiness
from proxy.net.listener import bind_reuseport
from proxy.observability import get_logger
from proxy.sdnotify import Notifier, watchdog_loop
from proxy.startup import (
    DemoBackend,
    StartupError,
    bind_admin_socket,
    cannot_listen,
    check_free,
    check_state_dir,
)
from proxy.worker import HANDOVER_SIGNAL, RETIRE_SIGNAL, STOP_SIGNAL
from proxy.worker_process import (
    BACKOFF_MAX,
    BACKOFF_START,
    READY_TIMEOUT,
    READY_WORD,
    Spare,
    WorkerProcess,
)

_STABLE_AFTER = 10.0
_KILL_GRACE = 5.0


@dataclass(slots=True, eq=False)
class WorkerSlot:
    index: int
    sockets: list[socket.socket]
    worker: WorkerProcess | None = None
    restarts: int = 0
    ready: trio.Event = field(default_factory=trio.Event)
    retired: bool = False


@dataclass(slots=True, eq=False)
class Generation:
    number: int
    config: Config
    slots: list[WorkerSlot]
    done: trio.Event = field(default_factory=trio.Event)
    """Set when every worker of this generation has exited for good."""
    nursery: trio.Nursery | None = None
    spare: Spare | None = None
    """Its standby worker (server.standby_worker), once every worker is ready."""
    retired: bool = False

    def retire(
        self, signum: int = signal.SIGTERM, *, dropped: frozenset[int] = frozenset()
    ) -> None:
        """Tell every worker (and the standby) to go; ``dropped``: the slots whose
        sockets no generation keeps, told RETIRE_SIGNAL instead."""
        self.retired = True
        for slot in self.slots:
            slot.retired = True
            process = slot.worker.process if slot.worker is not None else None
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(RETIRE_SIGNAL if slot.index in dropped else signum)
        if self.spare is not None:
            self.spare.send_signal(signum)

    def all_ready(self) -> bool:
        return all(slot.ready.is_set() for slot in self.slots)


class Supervisor:
    def __init__(
        self,
        config: Config,
        *,
        reload_config: Callable[[], Config] | None = None,
        origins: Origins | None = None,
    ) -> None:
        self.config = config
        self.reload_config = reload_config
        self.origins = origins or Origins()
        """Where settings came from, for start-up messages."""
        self.log: Any = get_logger("switchboard.supervisor")
        self.notifier = Notifier.from_env()
        self.sockets: dict[tuple[str, int], socket.socket] = {}
        self.current: Generation | None = None
        self.generations = 0
        self.stopping = False
        self.admin = AdminState(config=config)
        self.demo: DemoBackend | None = None
        self.admin_socket: socket.socket | None = None
        self.metrics_dir = ""
        self._nursery: trio.Nursery | None = None
        # Signs MCP session tokens when the config names no key; kept across reloads.
        self._session_secret = secrets.token_urlsafe(32)
        self.config = self._with_key(config)

    def _with_key(self, config: Config) -> Config:
        keyed = with_session_key(config, "auto", self._session_secret)
        if keyed is not config:
            self.log.warning(
                "mcp_session_key_generated",
                detail="no [mcp] session_keys configured: MCP sessions will not survive a "
                "restart, and other proxies cannot continue them",
            )
        return keyed

    # -- sockets ------------------------------------------------------------------------

    def _sockets_for(self, config: Config) -> list[list[socket.socket]]:
        """Per worker slot, one socket per listen address (existing ones reused)."""
        per_slot: list[list[socket.socket]] = []
        for index in range(effective_workers(config)):
            slot_sockets = []
            for listen in config.server.listen:
                key = (listen, index)
                sock = self.sockets.get(key)
                if sock is None:
                    setting = self.origins.describe("server.listen")
                    if not any(bound == listen for bound, _ in self.sockets):
                        check_free(listen, setting)  # not our own: someone else's
                    try:
                        sock = bind_reuseport(listen, config.server.backlog)
                    except OSError as exc:
                        raise cannot_listen(listen, setting, exc) from None
                    self.sockets[key] = sock
                slot_sockets.append(sock)
            per_slot.append(slot_sockets)
        return per_slot

    def _close_unused_sockets(self) -> None:
        used = {
            id(sock)
            for gen in (self.current,)
            if gen is not None
            for slot in gen.slots
            for sock in slot.sockets
        }
        for key, sock in list(self.sockets.items()):
            if id(sock) not in used:
                sock.close()
                del self.sockets[key]

    def _close_slot_sockets(self, slot: WorkerSlot) -> None:
        """Stopping, a slot's worker has exited (after closing its own copies, which
        it does once nothing waits in their queues): the last copies go, so that the
        kernel sends new connections to the sockets of workers still draining, or
        refuses them, instead of queueing them where nobody will accept."""
        for key, sock in list(self.sockets.items()):
            if any(sock is own for own in slot.sockets):
                sock.close()
                del self.sockets[key]

    # -- workers ------------------------------------------------------------------------

    async def _spawn(self, gen: Generation, slot: WorkerSlot) -> WorkerProcess:
        worker = await WorkerProcess.launch(gen.config, {slot.index: slot.sockets})
        slot.worker = worker
        if await worker.wait_for(READY_WORD):
            slot.ready.set()
        return worker

    def _finished(self, slot: WorkerSlot) -> bool:
        # A method, not an inline test: both flags change while this task awaits.
        return slot.retired or self.stopping

    def _generation_finished(self, gen: Generation) -> bool:
        return gen.retired or self.stopping

    async def _start_worker(
        self, gen: Generation, slot: WorkerSlot, from_standby: bool
    ) -> tuple[WorkerProcess, bool]:
        """The slot's new worker, and whether it is the standby that took the slot."""
        spare = gen.spare if from_standby else None
        worker = spare.take(slot.index) if spare is not None else None
        if spare is None or worker is None:
            return await self._spawn(gen, slot), False
        slot.worker = worker  # before the wait: a retirement meanwhile must reach it
        try:
            if await worker.wait_for(READY_WORD):
                slot.ready.set()
        finally:
            spare.settled()
        return worker, True

    async def _keep_worker(self, gen: Generation, slot: WorkerSlot) -> None:
        backoff = BACKOFF_START
        m = metrics()
        from_standby = False
        while not self._finished(slot):
            started = trio.current_time()
            worker, from_standby = await self._start_worker(gen, slot, from_standby)
            if slot.ready.is_set():
                m.workers.inc()
                self.log.info(
                    "worker_started",
                    worker=slot.index,
                    pid=worker.pid,
                    generation=gen.number,
                    restarts=slot.restarts,
                    standby=from_standby,
                )
            code = await worker.process.wait()
            await worker.close()
            if slot.ready.is_set():
                m.workers.dec()
            if self.metrics_dir:
                mark_process_dead(worker.pid, self.metrics_dir)
            if self._finished(slot):
                if self.stopping:
                    self._close_slot_sockets(slot)
                self.log.info(
                    "worker_exited",
                    worker=slot.index,
                    pid=worker.pid,
                    generation=gen.number,
                    code=code,
                )
                return
            slot.ready = trio.Event()
            slot.restarts += 1
            m.worker_restarts.inc()
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if trio.current_time() - started > _STABLE_AFTER:
                backoff = BACKOFF_START
            # The standby takes the slot at once, unless the slot keeps crashing (then
            # the back-off paces its restarts, and the standby stays for the others).
            from_standby = backoff == BACKOFF_START and gen.spare is not None and gen.spare.waiting
            # Exit code 0: the worker was told to stop on its own (SIGTERM to its pid), and
            # drained first; anything else lost what it held.
            report = self.log.info if code == 0 else self.log.error
            report(
                "worker_replaced" if code == 0 else "worker_died",
                worker=slot.index,
                pid=worker.pid,
                how=how,
                generation=gen.number,
                restart_in_s=0 if from_standby else backoff,
                restarts=slot.restarts,
            )
            if not from_standby:
                await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _run_generation(self, gen: Generation) -> None:
        try:
            async with trio.open_nursery() as nursery:
                gen.nursery = nursery
                for slot in gen.slots:
                    nursery.start_soon(self._keep_worker, gen, slot)
        finally:
            gen.done.set()

    async def _start_generation(self, config: Config) -> Generation:
        """Start a generation and wait until every worker is ready; StartupError if not."""
        assert self._nursery is not None
        await trio.to_thread.run_sync(check_state_dir, config)
        per_slot = self._sockets_for(config)
        self.generations += 1
        gen = Generation(
            self.generations, config, [WorkerSlot(i, socks) for i, socks in enumerate(per_slot)]
        )
        self._nursery.start_soon(self._run_generation, gen)
        with trio.move_on_after(READY_TIMEOUT):
            for slot in gen.slots:
                await slot.ready.wait()
        if not gen.all_ready():
            gen.retire(signal.SIGKILL)
            raise StartupError(f"workers of generation {gen.number} did not become ready")
        if config.server.standby_worker and gen.nursery is not None:
            gen.spare = Spare(config, {slot.index: slot.sockets for slot in gen.slots}, self.log)
            gen.nursery.start_soon(gen.spare.keep, lambda: self._generation_finished(gen))
        return gen

    async def _drain(
        self, gen: Generation, signum: int = STOP_SIGNAL, dropped: frozenset[int] = frozenset()
    ) -> None:
        """STOP_SIGNAL: the proxy stops (new connections get 503 until the workers
        exit, and each answers its queue before closing its sockets); HANDOVER_SIGNAL: a
        new generation serves the same sockets, so the old one stops accepting at once
        (but the slots in ``dropped``, whose sockets it does not serve, get
        RETIRE_SIGNAL: sealed and their queues answered)."""
        gen.retire(signum, dropped=dropped)
        with trio.move_on_after(gen.config.server.drain_timeout + _KILL_GRACE):
            await gen.done.wait()
        if not gen.done.is_set():
            self.log.warning("drain_deadline_passed", generation=gen.number)
            gen.retire(signal.SIGKILL)
            await gen.done.wait()

    async def _drain_then_cleanup(self, gen: Generation) -> None:
        assert self.current is not None
        kept = {id(sock) for slot in self.current.slots for sock in slot.sockets}
        dropped = frozenset(
            slot.index for slot in gen.slots if not any(id(sock) in kept for sock in slot.sockets)
        )
        # The sockets the new generation does not use (fewer workers, an address gone)
        # live on only in the old workers, which close them as they go: no connection
        # waits in a queue that nobody will serve until the old generation is done.
        self._close_unused_sockets()
        await self._drain(gen, HANDOVER_SIGNAL, dropped)
        self.log.info("generation_stopped", generation=gen.number)

    # -- reload -------------------------------------------------------------------------

    async def reload(self) -> None:
        assert self._nursery is not None and self.current is not None
        self.notifier.reloading()
        self.admin.reloading = True
        m = metrics()
        try:
            if self.reload_config is None:
                raise ConfigError("command line", "", "no config file to reload")
            config = self._with_key(self.reload_config())
            gen = await self._start_generation(config)
        except (ConfigError, StartupError) as exc:
            m.reloads.labels("failed").inc()
            self.log.error(
                "reload_failed", error=str(exc), detail="the running workers keep serving"
            )
            self.notifier.ready(f"reload failed: {exc}")
            return
        finally:
            self.admin.reloading = False
        old, self.current = self.current, gen
        self.config = self.admin.config = config
        m.reloads.labels("ok").inc()
        self.log.info("reloaded", generation=gen.number, workers=len(gen.slots))
        self._nursery.start_soon(self._drain_then_cleanup, old)
        self.notifier.ready(self._status())

    def _status(self) -> str:
        workers = len(self.current.slots) if self.current else 0
        return f"serving on {', '.join(self.config.server.listen)} with {workers} workers"

    # -- main ---------------------------------------------------------------------------

    async def run(self, *, on_ready: Callable[[], None] | None = None) -> None:
        self.metrics_dir = tempfile.mkdtemp(prefix="switchboard-metrics-")
        os.environ[MULTIPROC_ENV] = self.metrics_dir
        try:
            self._prepare()
            await self._run(on_ready)
        finally:
            for sock in self.sockets.values():
                sock.close()
            if self.admin_socket is not None:
                self.admin_socket.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _prepare(self) -> None:
        """What the operator must fix, found before anything starts: an unwritable state
        directory, an address already in use (StartupError naming it and its setting)."""
        config = self.config
        check_state_dir(config)
        self._sockets_for(config)
        if config.admin.listen:
            setting = self.origins.describe("admin.listen")
            self.admin_socket = bind_admin_socket(config.admin.listen, setting)
        if config.demo.enabled:
            setting = self.origins.describe("demo.listen")
            check_free(config.demo.listen, setting, who="the demo backend")
            self.demo = DemoBackend(config.demo.listen, setting)

    async def _run(self, on_ready: Callable[[], None] | None) -> None:
        m = metrics()
        for result in ("ok", "failed"):
            m.reloads.labels(result)  # present from the start, so increase() sees the first
        signals_wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with trio.open_signal_receiver(*signals_wanted) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    if self.admin_socket is not None:
                        sock, self.admin_socket = self.admin_socket, None
                        await nursery.start(serve_admin, self.admin, self.metrics_dir, sock)
                    if self.demo is not None:
                        await self.demo.start()
                    self.current = await self._start_generation(self.config)
                    self.admin.ready = True
                    nursery.start_soon(watchdog_loop, self.notifier)
                    nursery.start_soon(
                        watch_for_readiness, lambda: self.config.database, self._set_degraded
                    )
                    self.notifier.ready(self._status())
                    self.log.info(
                        "ready",
                        workers=len(self.current.slots),
                        listen=list(self.config.server.listen),
                    )
                    if on_ready is not None:
                        on_ready()
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if signum == signal.SIGHUP:
                            self.log.info("reloading", signal=name)
                            await self.reload()
                            continue
                        self.log.info("stopping", signal=name)
                        break
                finally:
                    with trio.CancelScope(shield=True):
                        await self._stop()
                nursery.cancel_scope.cancel()
        self.log.info("stopped")

    def _set_degraded(self, reason: str | None) -> None:
        if reason != self.admin.degraded_reason:
            if reason:
                self.log.error("degraded", reason=reason)
            else:
                self.log.info("degraded_cleared")
            self.admin.degraded_reason = reason

    async def _stop(self) -> None:
        self.stopping = True
        self.admin.ready = False
        self.admin.draining = True
        self.notifier.stopping()
        if self.current is not None:
            await self._drain(self.current)
        if self.demo is not None:
            await self.demo.stop()
