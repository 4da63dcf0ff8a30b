"""A worker process: one Trio loop serving its own SO_REUSEPORT sockets.

Started by the supervisor as ``python -m proxy.worker``; reads the validated config as
JSON on stdin, reports readiness by writing to the file descriptor named in
``SWITCHBOARD_READY_FD``, and drains on SIGTERM/SIGINT: stop accepting, close idle
keep-alive connections, let in-flight exchanges finish until ``drain_timeout``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from proxy.config import Config, HealthCheckConfig, RouteConfig, effective_workers, from_json
from proxy.net.context import WorkerContext
from proxy.net.control_plane import ControlPlane
from proxy.net.health import check_forever
from proxy.net.http_conn import ClientConnection
from proxy.net.listener import accept_loop, bind_reuseport
from proxy.net.upstream import (
    Addresses,
    UpstreamPool,
    report_pool_gauges,
    report_pool_gauges_forever,
)
from proxy.observability import AccessLog, configure_logging, get_logger
from proxy.protocol.session_token import Keyring, SessionTokens
from proxy.routing import Backend, BackendHealth, RouteTable

READY_FD_ENV = "SWITCHBOARD_READY_FD"
LIFELINE_FD_ENV = "SWITCHBOARD_LIFELINE_FD"
LISTEN_FDS_ENV = "SWITCHBOARD_LISTEN_FDS"
"""Listening sockets handed down by the supervisor, one per server.listen address."""
WORKER_ID_ENV = "SWITCHBOARD_WORKER_ID"
_PR_SET_PDEATHSIG = 1


async def _watch_supervisor(fd: int) -> None:
    """Drain when the supervisor is gone. The supervisor holds the write end of this
    pipe and never writes: EOF means it exited, however it died. (PR_SET_PDEATHSIG is
    no substitute: it fires when the *thread* that forked the worker exits, and trio
    forks from worker threads that end after 10 s idle.)"""
    stream = trio.lowlevel.FdStream(fd)
    try:
        while await stream.receive_some(64):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def _add_pools(
    routes: RouteTable,
    pools: dict[Backend, UpstreamPool],
    config: Config,
    addresses: Addresses | None = None,
) -> None:
    for route in routes.routes:
        for backend in route.backends:
            if backend in pools:
                continue  # a backend shared by routes keeps its first route's settings
            found = (addresses or {}).get((backend.host, backend.port))
            pool = UpstreamPool.create(backend, config.upstream, found)
            pool.health = BackendHealth(
                eject_after=route.eject_after,
                eject_seconds=route.eject_seconds,
                rise=route.health.rise,
                fall=route.health.fall,
            )
            pools[backend] = pool


def install_routes(
    ctx: WorkerContext, routes: tuple[RouteConfig, ...], addresses: Addresses
) -> None:
    """Serve a new route list (from a control-plane snapshot): pools for new backends,
    then one assignment, so a request sees the old table or the new one, never a mix.
    Pools of backends no longer routed to stay until the worker exits: requests already
    on them finish, and a backend that comes back keeps its health history."""
    table = RouteTable.from_config(routes)
    _add_pools(table, ctx.pools, ctx.config, addresses)
    ctx.routes = table


def build_context(config: Config, worker_id: int) -> WorkerContext:
    routes = RouteTable.from_config(config.routes)
    pools: dict[Backend, UpstreamPool] = {}
    _add_pools(routes, pools, config)
    log = get_logger("switchboard.worker")
    access = AccessLog() if config.log.access_log else None
    tokens = None
    if config.mcp.session_keys:
        secrets = {kid: key.encode() for kid, key in config.mcp.session_keys.items()}
        current = config.mcp.current_key or next(iter(secrets))
        tokens = SessionTokens(Keyring(secrets, current))
    return WorkerContext(
        config=config, routes=routes, pools=pools, log=log, access_log=access, tokens=tokens
    )


def _health_checks(ctx: WorkerContext) -> dict[Backend, tuple[UpstreamPool, HealthCheckConfig]]:
    checks: dict[Backend, tuple[UpstreamPool, HealthCheckConfig]] = {}
    for route in ctx.routes.routes:
        if route.health.path:
            for backend in route.backends:
                checks.setdefault(backend, (ctx.pools[backend], route.health))
    return checks


class HealthChecks:
    """One active health-check task per checked backend, following route changes."""

    def __init__(self, ctx: WorkerContext, nursery: trio.Nursery) -> None:
        self.ctx = ctx
        self.nursery = nursery
        self.running: dict[Backend, tuple[HealthCheckConfig, trio.CancelScope]] = {}

    def sync(self) -> None:
        wanted = _health_checks(self.ctx)
        for backend, (health, scope) in list(self.running.items()):
            if backend not in wanted or wanted[backend][1] != health:
                scope.cancel()
                del self.running[backend]
        for backend, (pool, health) in wanted.items():
            if backend not in self.running:
                scope = trio.CancelScope()
                self.running[backend] = (health, scope)
                self.nursery.start_soon(self._check, scope, pool, health)

    async def _check(
        self, scope: trio.CancelScope, pool: UpstreamPool, health: HealthCheckConfig
    ) -> None:
        with scope:
            await check_forever(pool, health, self.ctx.log)

    def stop(self) -> None:
        for _, scope in self.running.values():
            scope.cancel()
        self.running.clear()


async def serve(
    config: Config,
    *,
    worker_id: int = 0,
    on_ready: Callable[[WorkerContext], None] | None = None,
    task_status: trio.TaskStatus[WorkerContext] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind, serve until SIGTERM/SIGINT, then drain."""
    ctx = build_context(config, worker_id)
    socks = [trio.socket.from_stdlib_socket(sock) for sock in _listening_sockets(config)]

    async def handle(stream: trio.SocketStream, peer: tuple[str, int]) -> None:
        await ClientConnection(ctx, stream, peer).run()

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as background:
            checks = HealthChecks(ctx, background)

            def on_routes(routes: tuple[RouteConfig, ...], addresses: Addresses) -> None:
                install_routes(ctx, routes, addresses)
                checks.sync()

            control = ControlPlane(config, worker_id, effective_workers(config), ctx.log, on_routes)
            ctx.control = control
            await control.start(background)
            checks.sync()
            background.start_soon(report_pool_gauges_forever)
            await _serve_until_signal(ctx, config, socks, handle, signals, task_status, on_ready)
            checks.stop()
            await control.close()
            background.cancel_scope.cancel()
    for pool in ctx.pools.values():
        await pool.aclose()
    report_pool_gauges()
    ctx.log.info("worker_stopped", requests=ctx.stats.requests)


async def _serve_until_signal(
    ctx: WorkerContext,
    config: Config,
    socks: list[trio.socket.SocketType],
    handle: Callable[[trio.SocketStream, tuple[str, int]], Awaitable[None]],
    signals: AsyncIterator[int],
    task_status: trio.TaskStatus[WorkerContext],
    on_ready: Callable[[WorkerContext], None] | None,
) -> None:
    """Accept until SIGTERM/SIGINT, then drain the connections (bounded)."""
    try:
        async with trio.open_nursery() as connections:
            # Parked SSE streams get their tasks back in here, under the drain deadline.
            ctx.park.nursery = connections
            accepting = trio.CancelScope()

            async def accept_all() -> None:
                with accepting:
                    async with trio.open_nursery() as accept_nursery:
                        for sock in socks:
                            accept_nursery.start_soon(accept_loop, ctx, sock, handle, connections)

            connections.start_soon(accept_all)
            ctx.log.info("worker_ready", listen=list(config.server.listen))
            task_status.started(ctx)
            if on_ready is not None:
                on_ready(ctx)
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
    finally:
        ctx.park.nursery = None  # woken streams find no nursery: they are dropped


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


async def _main(config: Config, worker_id: int | None) -> None:
    """Serve as worker ``worker_id``; None: as a standby, until the supervisor hands it
    the slot of a worker that died (``proxy.standby``)."""
    async with trio.open_nursery() as nursery:
        lifeline = os.environ.get(LIFELINE_FD_ENV)
        if lifeline is not None:
            nursery.start_soon(_watch_supervisor, int(lifeline))
        if worker_id is None:
            from proxy.standby import wait_for_slot

            ready_fd = int(os.environ[READY_FD_ENV])
            worker_id = await wait_for_slot(ready_fd, LISTEN_FDS_ENV, WORKER_ID_ENV)
            if worker_id is None:
                nursery.cancel_scope.cancel()
                return
            configure_logging(config.log.level, worker=worker_id, pid=os.getpid())
        await serve(config, worker_id=worker_id, on_ready=_notify_ready)
        nursery.cancel_scope.cancel()


def main() -> None:
    from proxy.standby import STANDBY_ARG

    config = from_json(sys.stdin.buffer.read())
    if STANDBY_ARG in sys.argv[1:]:
        trio.run(_main, config, None)
        return
    worker_id = int(os.environ.get(WORKER_ID_ENV, "0"))
    configure_logging(config.log.level, worker=worker_id, pid=os.getpid())
    trio.run(_main, config, worker_id)


if __name__ == "__main__":
    main()
