"""A worker process: one Trio loop serving its own SO_REUSEPORT sockets.

Started by the supervisor as ``python -m proxy.worker``; reads the validated config as
JSON on stdin, reports readiness by writing to the file descriptor named in
``SWITCHBOARD_READY_FD``, and drains on SIGTERM/SIGINT: stop accepting, close idle
keep-alive connections, let in-flight exchanges finish until ``drain_timeout``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys

import trio

from proxy.config import Config, from_json
from proxy.net.context import WorkerContext
from proxy.net.http_conn import ClientConnection
from proxy.net.listener import accept_loop, bind_reuseport
from proxy.net.upstream import UpstreamPool
from proxy.observability import configure_logging, get_logger
from proxy.routing import RouteTable

READY_FD_ENV = "SWITCHBOARD_READY_FD"
LISTEN_FDS_ENV = "SWITCHBOARD_LISTEN_FDS"
"""Listening sockets handed down by the supervisor, one per server.listen address."""
WORKER_ID_ENV = "SWITCHBOARD_WORKER_ID"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this worker if the supervisor dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def build_context(config: Config, worker_id: int) -> WorkerContext:
    routes = RouteTable.from_config(config.routes)
    pools = {b: UpstreamPool.create(b, config.upstream) for b in routes.backends()}
    log = get_logger("switchboard.worker")
    access = get_logger("switchboard.access") if config.log.access_log else None
    return WorkerContext(config=config, routes=routes, pools=pools, log=log, access_log=access)


async def serve(
    config: Config,
    *,
    worker_id: int = 0,
    task_status: trio.TaskStatus[WorkerContext] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind, serve until SIGTERM/SIGINT, then drain."""
    ctx = build_context(config, worker_id)
    socks = [trio.socket.from_stdlib_socket(sock) for sock in _listening_sockets(config)]

    async def handle(stream: trio.SocketStream, peer: tuple[str, int]) -> None:
        await ClientConnection(ctx, stream, peer).run()

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as connections:
            accepting = trio.CancelScope()

            async def accept_all() -> None:
                with accepting:
                    async with trio.open_nursery() as accept_nursery:
                        for sock in socks:
                            accept_nursery.start_soon(accept_loop, ctx, sock, handle, connections)

            connections.start_soon(accept_all)
            ctx.log.info("worker_ready", listen=list(config.server.listen))
            task_status.started(ctx)
            async for signum in signals:
                ctx.log.info(
                    "worker_draining",
                    signal=signal.Signals(signum).name,
                    active_connections=ctx.stats.active_connections,
                )
                break
            accepting.cancel()
            for sock in socks:
                sock.close()
            ctx.start_drain()
            connections.cancel_scope.deadline = trio.current_time() + config.server.drain_timeout
    for pool in ctx.pools.values():
        await pool.aclose()
    ctx.log.info("worker_stopped", requests=ctx.stats.requests)


def _listening_sockets(config: Config) -> list[socket.socket]:
    """The sockets the supervisor passed down, or (run standalone, e.g. in a test or a
    profiler) sockets bound here."""
    fds = os.environ.get(LISTEN_FDS_ENV)
    if not fds:
        return [bind_reuseport(addr, config.server.backlog) for addr in config.server.listen]
    socks = [socket.socket(fileno=int(fd)) for fd in fds.split(",")]
    for sock in socks:
        sock.setblocking(False)
    return socks


def _notify_ready(ctx: WorkerContext) -> None:
    fd = os.environ.get(READY_FD_ENV)
    if fd is None:
        return
    os.write(int(fd), b"ready\n")
    os.close(int(fd))


async def _main(config: Config, worker_id: int) -> None:
    async with trio.open_nursery() as nursery:
        ctx = await nursery.start(
            lambda task_status: serve(config, worker_id=worker_id, task_status=task_status)
        )
        _notify_ready(ctx)


def main() -> None:
    _die_with_parent()
    worker_id = int(os.environ.get(WORKER_ID_ENV, "0"))
    config = from_json(sys.stdin.buffer.read())
    configure_logging(config.log.level, worker=worker_id, pid=os.getpid())
    trio.run(_main, config, worker_id)


if __name__ == "__main__":
    main()
