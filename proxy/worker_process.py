"""A worker process as the supervisor starts it: ``python -m proxy.worker`` exec'd (never
forked from the running Trio loop), the validated config on its stdin, its listening
sockets passed down, and two pipes — ``ready`` (the worker writes a word when it can
serve) and a lifeline (the worker sees EOF when the supervisor is gone, however it died).

A standby (``proxy.standby``) is started the same way with every slot's sockets and a
third pipe, the hand-off, on which the supervisor names the slot it is to take;
``Spare`` keeps one per generation of workers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from proxy.config import Config, to_json
from proxy.standby import (
    HANDOFF_FD_ENV,
    SLOT_FDS_ENV,
    STANDBY_ARG,
    STANDBY_WORD,
    slot_fds_to_env,
)
from proxy.worker import LIFELINE_FD_ENV, LISTEN_FDS_ENV, READY_FD_ENV, WORKER_ID_ENV

READY_TIMEOUT = 30.0
"""Seconds a new worker (or standby) has to report itself ready."""
READY_WORD = b"ready"
BACKOFF_START = 0.1
BACKOFF_MAX = 30.0
"""A process that keeps dying is started again after 0.1 s, doubling up to 30 s."""


class WorkerProcess:
    """A launched worker or standby and the supervisor's ends of its pipes."""

    def __init__(
        self, process: trio.Process, ready_fd: int, lifeline_fd: int, handoff_fd: int | None
    ) -> None:
        self.process = process
        self._ready = trio.lowlevel.FdStream(ready_fd)
        self._lifeline = lifeline_fd
        self._handoff = handoff_fd
        self._unread = b""

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def launch(
        cls,
        config: Config,
        slots: Mapping[int, Sequence[socket.socket]],
        *,
        standby: bool = False,
    ) -> WorkerProcess:
        """Start the worker of the one slot in ``slots``, or with ``standby`` a standby
        holding the sockets of every slot in ``slots``."""
        fds = {index: [sock.fileno() for sock in socks] for index, socks in slots.items()}
        ready_read, ready_write = os.pipe()
        lifeline_read, lifeline_write = os.pipe()
        handoff_read, handoff_write = os.pipe() if standby else (-1, -1)
        env = dict(os.environ)
        env[READY_FD_ENV] = str(ready_write)
        env[LIFELINE_FD_ENV] = str(lifeline_read)
        args = [sys.executable, "-m", "proxy.worker"]
        passed = [ready_write, lifeline_read, *(fd for group in fds.values() for fd in group)]
        if standby:
            args.append(STANDBY_ARG)
            env[HANDOFF_FD_ENV] = str(handoff_read)
            env[SLOT_FDS_ENV] = slot_fds_to_env(fds)
            passed.append(handoff_read)
            env.pop(WORKER_ID_ENV, None)
            env.pop(LISTEN_FDS_ENV, None)
        else:
            [(index, listen_fds)] = fds.items()
            env[WORKER_ID_ENV] = str(index)
            env[LISTEN_FDS_ENV] = ",".join(map(str, listen_fds))
        try:
            process = await trio.lowlevel.open_process(
                args, stdin=subprocess.PIPE, pass_fds=passed, env=env
            )
        except BaseException:
            for fd in (ready_read, lifeline_write, handoff_write):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            for fd in (ready_write, lifeline_read, handoff_read):
                if fd >= 0:
                    os.close(fd)
        launched = cls(process, ready_read, lifeline_write, handoff_write if standby else None)
        try:
            assert process.stdin is not None
            await process.stdin.send_all(to_json(config))
            await process.stdin.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it died at start: whoever waits for it sees the exit
        return launched

    async def wait_for(self, word: bytes) -> bool:
        """Whether the process reports ``word`` on its ready pipe within
        ``READY_TIMEOUT``; False when it exits first or takes longer."""
        with trio.move_on_after(READY_TIMEOUT):
            while True:
                line, newline, rest = self._unread.partition(b"\n")
                if newline:
                    self._unread = rest
                    if line == word:
                        return True
                    continue
                try:
                    chunk = await self._ready.receive_some(64)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return False
                if not chunk:
                    return False
                self._unread += chunk
        return False

    def hand_over(self, index: int) -> bool:
        """Tell a standby to take slot ``index``; False when it is gone."""
        assert self._handoff is not None, "not a standby"
        try:
            os.write(self._handoff, f"{index}\n".encode())
        except OSError:
            return False
        return True

    async def close(self) -> None:
        """Once the process has exited: close this side's ends of its pipes."""
        await self._ready.aclose()
        os.close(self._lifeline)
        if self._handoff is not None:
            os.close(self._handoff)
            self._handoff = None


class Spare:
    """A generation's standby worker: kept started and waiting, handed the slot of a
    worker that dies (``take``), replaced once it serves there."""

    def __init__(
        self, config: Config, slots: Mapping[int, Sequence[socket.socket]], log: Any
    ) -> None:
        self.config = config
        self.slots = slots
        self.log = log
        self.standby: WorkerProcess | None = None
        """From its launch until it takes a slot or exits."""
        self._waiting: trio.CancelScope | None = None
        """Set while the standby is ready to take a slot; cancelled when it does."""
        self._settled = trio.Event()

    @property
    def waiting(self) -> bool:
        """Whether a standby is ready to take a slot now."""
        return self._waiting is not None

    def send_signal(self, signum: int) -> None:
        standby = self.standby
        if standby is not None and standby.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                standby.process.send_signal(signum)

    def take(self, index: int) -> WorkerProcess | None:
        """The standby, told to become the worker of slot ``index`` (the caller waits
        for it to report ready, then calls ``settled``); None when none is waiting. If it
        died meanwhile, its exit is handled like any worker's."""
        standby, waiting = self.standby, self._waiting
        if standby is None or waiting is None:
            return None
        self.standby = self._waiting = None
        waiting.cancel()
        standby.hand_over(index)
        return standby

    def settled(self) -> None:
        """The standby that took a slot serves (or failed to): the next one starts now,
        not while it competes with the take-over for the CPU."""
        self._settled.set()

    async def keep(self, finished: Callable[[], bool]) -> None:
        """One standby until ``finished()``: a new one as soon as one took a slot, after
        a back-off when one died by itself."""
        backoff = BACKOFF_START
        while not finished():
            standby = self.standby = await WorkerProcess.launch(
                self.config, self.slots, standby=True
            )
            took_slot = False
            if await standby.wait_for(STANDBY_WORD) and not finished():
                self.log.info("standby_ready", pid=standby.pid)
                self._settled = trio.Event()
                with trio.CancelScope() as waiting:
                    self._waiting = waiting
                    await standby.process.wait()
                took_slot = waiting.cancelled_caught
            if took_slot:
                backoff = BACKOFF_START
                await self._settled.wait()
                continue  # a worker now: the slot's keeper waits for it
            self.standby = self._waiting = None
            if standby.process.returncode is None:
                standby.process.kill()
            code = await standby.process.wait()
            await standby.close()
            if finished():
                return
            self.log.error("standby_died", pid=standby.pid, code=code, restart_in_s=backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
