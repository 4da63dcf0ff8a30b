"""A worker process: one Trio loop serving its own SO_REUSEPORT sockets.

Started by the supervisor as ``python -m proxy.worker``; reads the validated config as
JSON on stdin, reports readiness by writing to the file descriptor named in
``SWITCHBOARD_READY_FD``, and drains on a signal: SIGTERM and STOP_SIGNAL stop the
worker (new connections are answered 503 until it exits; with STOP_SIGNAL, the whole
proxy is stopping and the worker also answers what is queued and closes its sockets),
HANDOVER_SIGNAL retires it for a new generation that serves the same sockets (it stops
accepting at once). Either way, what
has arrived is served, idle keep-alive connections are closed between requests, and the
worker exits when it is done or at ``drain_timeout``.

The request path is the reactor (``proxy.net.reactor``) with one connection machine per
client connection; the worker's other tasks are ordinary Trio tasks beside it.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
from collections.abc import Callable

import trio

from proxy.config import Config, HealthCheckConfig, RouteConfig, effective_workers, from_json
from proxy.net.admission import Admission
from proxy.net.context import WorkerContext
from proxy.net.control_plane import ControlPlane
from proxy.net.health import check_forever
from proxy.net.listener import accept_new_handshakes, bind_reuseport
from proxy.net.reactor import SEAL_LEAD, Reactor
from proxy.net.trio_loop import task_name
from proxy.net.upstream import Addresses, UpstreamPool
from proxy.observability import BATCH_SECONDS, AccessLog, configure_logging, get_logger
from proxy.protocol.session_token import Keyring, SessionTokens
from proxy.routing import Backend, BackendHealth, RouteTable

READY_FD_ENV = "SWITCHBOARD_READY_FD"
LIFELINE_FD_ENV = "SWITCHBOARD_LIFELINE_FD"
LISTEN_FDS_ENV = "SWITCHBOARD_LISTEN_FDS"
"""Listening sockets handed down by the supervisor, one per server.listen address."""
WORKER_ID_ENV = "SWITCHBOARD_WORKER_ID"
HANDOVER_SIGNAL = signal.SIGUSR2
"""Sent to a generation being replaced: stop accepting now, finish, exit."""
STOP_SIGNAL = signal.SIGINT
"""Sent when the whole proxy stops: no worker will take the listening sockets over, so
at the end of its drain the worker answers what waits in their queues and closes them.
(SIGTERM alone drains the worker the same way, but leaves queued connections to the
worker the supervisor starts in its place.)"""
RETIRE_SIGNAL = signal.SIGUSR1
"""Sent, on a reload, to a worker whose listening sockets the new generation does not
use (fewer workers): it seals them at once, answers what waits in their queues with
503 and closes them (new handshakes go to the sockets that stay), then drains."""
_GEN0_THRESHOLD = 20000
"""Objects allocated between young-generation collections: the request path makes few
cycles (objects are freed by reference counting), and a collection every 700
allocations, the default, cost about a tenth of a request's CPU."""


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
    pools: dict[str, UpstreamPool],
    config: Config,
    addresses: Addresses | None = None,
) -> None:
    for route in routes.routes:
        for backend in route.backends:
            if backend.url in pools:
                continue  # a backend shared by routes keeps its first route's settings
            found = (addresses or {}).get((backend.host, backend.port))
            pool = UpstreamPool(backend, config.upstream, found)
            pool.health = BackendHealth(
                eject_after=route.eject_after,
                eject_seconds=route.eject_seconds,
                rise=route.health.rise,
                fall=route.health.fall,
            )
            pools[backend.url] = pool


def install_routes(
    ctx: WorkerContext, routes: tuple[RouteConfig, ...], addresses: Addresses
) -> None:
    """Serve a new route list (from a control-plane snapshot): pools for new backends,
    then one assignment, so a request sees the old table or the new one, never a mix.
    Pools of backends no longer routed to stay until the worker exits: requests already
    on them finish, and a backend that comes back keeps its health history."""
    table = RouteTable.from_config(routes, ctx.config.upstream)
    _add_pools(table, ctx.pools, ctx.config, addresses)
    ctx.routes = table


def build_context(config: Config, worker_id: int) -> WorkerContext:
    routes = RouteTable.from_config(config.routes, config.upstream)
    pools: dict[str, UpstreamPool] = {}
    _add_pools(routes, pools, config)
    log = get_logger("switchboard.worker")
    access = (
        AccessLog(per_line=config.log.access_flush == "line") if config.log.access_log else None
    )
    tokens = None
    if config.mcp.session_keys:
        secrets = {kid: key.encode() for kid, key in config.mcp.session_keys.items()}
        current = config.mcp.current_key or next(iter(secrets))
        tokens = SessionTokens(Keyring(secrets, current))
    ctx = WorkerContext(config, routes, pools, log, access, tokens)
    if config.tracing.sample_ratio:
        from proxy.net.tracing import Tracer  # the SDK is loaded only where it is used

        ctx.tracer = Tracer(config.tracing, worker_id)
    return ctx


def _health_checks(ctx: WorkerContext) -> dict[Backend, tuple[UpstreamPool, HealthCheckConfig]]:
    checks: dict[Backend, tuple[UpstreamPool, HealthCheckConfig]] = {}
    for route in ctx.routes.routes:
        if route.health.path:
            for backend in route.backends:
                checks.setdefault(backend, (ctx.pools[backend.url], route.health))
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
    """Bind, serve until a signal, then drain."""
    ctx = build_context(config, worker_id)
    socks = _listening_sockets(config)
    stop_signals = (signal.SIGTERM, STOP_SIGNAL, HANDOVER_SIGNAL, RETIRE_SIGNAL)
    with trio.open_signal_receiver(*stop_signals) as signals:
        async with trio.open_nursery() as background:
            ctx.nursery = background
            checks = HealthChecks(ctx, background)

            def on_routes(routes: tuple[RouteConfig, ...], addresses: Addresses) -> None:
                install_routes(ctx, routes, addresses)
                checks.sync()

            control = ControlPlane(config, worker_id, effective_workers(config), ctx.log, on_routes)
            ctx.control = control
            ctx.update_checking()
            await control.start(background)
            checks.sync()
            ctx.report_pools()  # the pools' series exist from the start
            background.start_soon(_flush_forever, ctx)
            reactor = Reactor(ctx, Admission(ctx))
            ctx.reactor = reactor
            for sock in socks:
                accept_new_handshakes(sock)  # a socket a stopped worker had closed to them
                reactor.add_listener(sock)
            # What start-up made lives as long as the worker: out of the collector's way.
            gc.collect()
            gc.freeze()
            gc.set_threshold(_GEN0_THRESHOLD, *gc.get_threshold()[1:])
            async with trio.open_nursery() as serving:
                serving.start_soon(reactor.run, name=task_name(Reactor, Reactor.run))
                ctx.log.info("worker_ready", listen=list(config.server.listen))
                task_status.started(ctx)
                if on_ready is not None:
                    on_ready(ctx)
                signum = await signals.__anext__()
                ctx.log.info(
                    "worker_draining",
                    signal=signal.Signals(signum).name,
                    active_connections=ctx.active_connections,
                )
                ctx.draining = True
                last_worker = signum in (STOP_SIGNAL, RETIRE_SIGNAL)
                reactor.drain(keep_listening=signum != HANDOVER_SIGNAL, last_worker=last_worker)
                deadline = trio.current_time() + config.server.drain_timeout
                serving.cancel_scope.deadline = deadline
                if signum == RETIRE_SIGNAL:
                    reactor.seal()
                elif signum == STOP_SIGNAL:
                    background.start_soon(_seal_in_time, reactor, deadline)
            checks.stop()
            ctx.flush()
            await control.close()
            background.cancel_scope.cancel()
    ctx.report_pools()
    ctx.flush()
    if ctx.tracer is not None:
        # Export what is queued: the collector may be slow, the worker is done serving.
        await trio.to_thread.run_sync(ctx.tracer.shutdown)
    ctx.log.info("worker_stopped", requests=ctx.requests)


async def _seal_in_time(reactor: Reactor, deadline: float) -> None:
    """The last worker's drain may run to its deadline with work still open: its
    listening sockets are sealed early enough that the handshakes under way, and what
    waits in their queues, are answered before the deadline closes everything (a drain
    that ends with its work seals them itself)."""
    await trio.sleep_until(deadline - SEAL_LEAD)
    reactor.seal()


async def _flush_forever(ctx: WorkerContext) -> None:
    """Counts published and access lines written a few times a second (and pool gauges:
    a scrape every few seconds cannot tell the difference, and the request path is
    spared the shared-memory writes)."""
    while True:
        await trio.sleep(BATCH_SECONDS)
        ctx.flush()
        ctx.report_pools()


def _listening_sockets(config: Config) -> list[socket.socket]:
    """The sockets the supervisor passed down, or (run standalone, e.g. in a test or a
    profiler) sockets bound here."""
    fds = os.environ.get(LISTEN_FDS_ENV)
    if not fds:
        return [bind_reuseport(addr, config.server.backlog) for addr in config.server.listen]
    return [socket.socket(fileno=int(fd)) for fd in fds.split(",")]


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
