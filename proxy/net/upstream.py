"""Keep-alive connection pools to backends, one per backend per worker.

Addresses are resolved once when the pool is built (DNS goes through a thread in trio,
and nothing on the request path may wait on a thread). Idle connections are kept LIFO
up to ``max_idle_per_backend``; a pooled connection that the backend closed (readable
while idle: EOF or stray bytes) or that sat longer than ``idle_ttl`` is dropped on reuse.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

from proxy.config import UpstreamConfig
from proxy.metrics import metrics
from proxy.routing import Backend, BackendHealth


class UpstreamUnavailable(Exception):
    """No connection to the backend could be had; ``status`` says how to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_DIRTY: set[UpstreamPool] = set()


def report_pool_gauges() -> None:
    """Write the gauges of every pool that changed since the last call."""
    pools = list(_DIRTY)
    _DIRTY.clear()
    for pool in pools:
        pool.write_gauges()


async def report_pool_gauges_forever(interval: float = 0.25) -> None:
    while True:
        await trio.sleep(interval)
        report_pool_gauges()


@dataclass(slots=True, eq=False)
class UpstreamConnection:
    stream: trio.SocketStream
    h11: h11.Connection
    reused: bool = False
    idle_since: float = 0.0

    def looks_closed(self) -> bool:
        """True if the backend closed (or wrote to) this idle connection."""
        poller = select.poll()
        poller.register(self.stream.socket.fileno(), select.POLLIN | select.POLLRDHUP)
        return bool(poller.poll(0))

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


Addresses = dict[tuple[str, int], list[tuple[int, Any]]]
"""(host, port) -> [(address family, sockaddr)], resolved ahead of pool creation."""


def resolve(host: str, port: int) -> list[tuple[int, Any]]:
    """getaddrinfo for a backend (blocking); OSError when it does not resolve."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[tuple[int, Any]] = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
    if not addresses:
        raise OSError(f"cannot resolve {host}:{port}")
    return addresses


@dataclass(slots=True, eq=False)
class UpstreamPool:
    backend: Backend
    config: UpstreamConfig
    addresses: list[tuple[int, tuple[str, int] | tuple[str, int, int, int]]]
    idle: list[UpstreamConnection] = field(default_factory=list)
    in_use: int = 0
    _slots: trio.Semaphore | None = None
    _gauges: tuple[Any, Any] | None = None
    health: BackendHealth = field(default_factory=BackendHealth)

    def record(self, ok: bool) -> None:
        """Passive health: an exchange with this backend succeeded or failed."""
        if self.health.record(ok, time.monotonic()):
            metrics().ejections.labels(self.backend.url).inc()
            metrics().backend_up.labels(self.backend.url).set(0)

    def usable(self, now: float) -> bool:
        return self.health.usable(now)

    def _report(self) -> None:
        # Marked here, written by report_pool_gauges() a few times a second: two
        # memory-mapped gauge writes per acquire and per release were a measurable part
        # of a request's cost, and a scrape every few seconds cannot tell the difference.
        _DIRTY.add(self)

    def write_gauges(self) -> None:
        """This worker's pool gauges; /metrics sums them over workers."""
        if self._gauges is None:
            family = metrics().upstream_connections
            self._gauges = (
                family.labels(self.backend.url, "idle"),
                family.labels(self.backend.url, "in_use"),
            )
        self._gauges[0].set(len(self.idle))
        self._gauges[1].set(self.in_use)

    def count_failure(self, reason: str) -> None:
        metrics().upstream_failures.labels(self.backend.url, reason).inc()

    @classmethod
    def create(
        cls,
        backend: Backend,
        config: UpstreamConfig,
        addresses: list[tuple[int, Any]] | None = None,
    ) -> UpstreamPool:
        """A pool for ``backend``; its addresses resolved here (blocking) unless given."""
        if addresses is None:
            addresses = resolve(backend.host, backend.port)
        slots = (
            trio.Semaphore(config.max_connections_per_backend)
            if config.max_connections_per_backend
            else None
        )
        return cls(backend, config, addresses, _slots=slots)

    async def acquire(self) -> UpstreamConnection:
        """A reused idle connection if a live one is pooled, else a new one."""
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if now - conn.idle_since > self.config.idle_ttl or conn.looks_closed():
                await self._close(conn)
                continue
            self.in_use += 1
            self._report()
            return conn
        if self._slots is not None:
            with trio.move_on_after(self.config.connect_timeout) as scope:
                await self._slots.acquire()
            if scope.cancelled_caught:
                self.count_failure("capacity")
                raise UpstreamUnavailable(503, "backend connection limit reached")
        try:
            conn = await self._connect()
        except BaseException as exc:
            if self._slots is not None:
                self._slots.release()
            if isinstance(exc, UpstreamUnavailable):
                self.count_failure("connect")
            raise
        self.in_use += 1
        self._report()
        return conn

    async def open_stream(self) -> trio.SocketStream:
        """A new connection to the backend (no timeout of its own); OSError if none."""
        last_error: OSError = OSError("no address")
        for family, sockaddr in self.addresses:
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
            try:
                await sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                last_error = exc
                continue
            except BaseException:
                sock.close()
                raise
            return trio.SocketStream(sock)
        raise last_error

    async def _connect(self) -> UpstreamConnection:
        with trio.move_on_after(self.config.connect_timeout):
            try:
                stream = await self.open_stream()
            except OSError as exc:
                reason = errno.errorcode.get(exc.errno or 0, str(exc))
                raise UpstreamUnavailable(502, f"cannot connect to backend: {reason}") from None
            return UpstreamConnection(stream, h11.Connection(h11.CLIENT))
        raise UpstreamUnavailable(502, "timed out connecting to backend")

    async def release(self, conn: UpstreamConnection, *, express: bool = False) -> None:
        """Return a connection after a complete exchange; pooled if both sides allow.
        ``express``: the exchange ran in the express lane, which checked reusability
        itself and never moved the connection's h11 state (still IDLE)."""
        self.in_use -= 1
        h = conn.h11
        reusable = (
            h.our_state is h11.IDLE and h.their_state is h11.IDLE
            if express
            else h.our_state is h11.DONE and h.their_state is h11.DONE
        )
        if reusable and len(self.idle) < self.config.max_idle_per_backend:
            if not express:
                h.start_next_cycle()
            conn.reused = True
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
            self._report()
            return
        await self._close(conn)

    async def discard(self, conn: UpstreamConnection) -> None:
        """Close a connection whose exchange did not complete cleanly."""
        self.in_use -= 1
        await self._close(conn)

    async def _close(self, conn: UpstreamConnection) -> None:
        if self._slots is not None:
            self._slots.release()
        self._report()
        await conn.aclose()

    async def aclose(self) -> None:
        while self.idle:
            await self._close(self.idle.pop())
