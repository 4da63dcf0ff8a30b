"""The standby worker's side of a take-over: wait, started and imported, until the
supervisor names the slot of a worker that died, then become that worker.

A standby is ``python -m proxy.worker --standby``: the same program, which has imported
everything and read its config by the time it reports ``standby`` on its ready pipe. It
holds every slot's listening sockets (passed down by the supervisor) and accepts on
none. When a worker dies the supervisor writes the slot's index on the standby's hand-off
pipe; the standby closes the other slots' sockets (a socket it kept would take
connections nobody accepts once the supervisor retires it), makes the slot's sockets and
index its own, and serves like a worker started for that slot — in milliseconds rather
than the seconds an interpreter needs to start and import (``docs/operations.md``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence

import trio

STANDBY_ARG = "--standby"
HANDOFF_FD_ENV = "SWITCHBOARD_HANDOFF_FD"
"""The read end of the pipe the supervisor names the slot on."""
SLOT_FDS_ENV = "SWITCHBOARD_SLOT_FDS"
"""Every slot's listening sockets: ``INDEX:FD,FD;INDEX:FD,FD``."""
STANDBY_WORD = b"standby"
"""What a standby reports on its ready pipe once it can take a slot."""


def slot_fds_to_env(slots: Mapping[int, Sequence[int]]) -> str:
    return ";".join(f"{index}:{','.join(map(str, fds))}" for index, fds in slots.items())


def slot_fds_from_env(text: str) -> dict[int, list[int]]:
    slots: dict[int, list[int]] = {}
    for part in filter(None, text.split(";")):
        index, _, fds = part.partition(":")
        slots[int(index)] = [int(fd) for fd in fds.split(",") if fd]
    return slots


def _warm_up() -> None:
    # Imported on first use by a worker; a standby pays for it while it waits.
    import prometheus_client
    import prometheus_client.multiprocess  # noqa: F401


async def _read_slot(fd: int) -> int | None:
    """The slot index the supervisor writes; None on EOF (the supervisor is gone)."""
    stream = trio.lowlevel.FdStream(fd)
    data = b""
    try:
        while b"\n" not in data:
            chunk = await stream.receive_some(64)
            if not chunk:
                return None
            data += chunk
    finally:
        await stream.aclose()
    return int(data.split(b"\n", 1)[0])


async def wait_for_slot(ready_fd: int, listen_fds_env: str, worker_id_env: str) -> int | None:
    """Report ``standby`` on ``ready_fd``, wait for a slot, take its sockets (its fds go
    into ``listen_fds_env``, its index into ``worker_id_env``, where the worker reads
    them) and return its index; None if told to stop first (SIGTERM, SIGINT, SIGUSR2,
    the worker's HANDOVER_SIGNAL sent to a generation replaced by a reload, or the
    supervisor gone)."""
    _warm_up()
    slots = slot_fds_from_env(os.environ[SLOT_FDS_ENV])
    handoff = int(os.environ[HANDOFF_FD_ENV])
    chosen: list[int | None] = [None]
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR2) as signals:
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                chosen[0] = await _read_slot(handoff)
                nursery.cancel_scope.cancel()

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(read)
            nursery.start_soon(stop_on_signal)
            os.write(ready_fd, STANDBY_WORD + b"\n")
    index = chosen[0]
    if index is None:
        return None
    for other, fds in slots.items():
        if other != index:
            for fd in fds:
                os.close(fd)
    os.environ[listen_fds_env] = ",".join(map(str, slots[index]))
    os.environ[worker_id_env] = str(index)
    return index
