"""Backend connections and their keep-alive pools, one pool per backend per worker.

Addresses are resolved once when the pool is built (DNS goes through a thread in Trio,
and nothing on the request path may wait on a thread). Every backend connection is a
non-blocking socket in the worker's reactor (``proxy.net.reactor``) for its whole life,
lent to one exchange at a time. Idle connections are kept LIFO up to
``max_idle_per_backend``; one that the backend closes (or writes to) while idle is
noticed by the reactor at once and dropped, so reuse costs no check; one idle longer
than ``idle_ttl`` is dropped on reuse.

``max_connections_per_backend`` caps open connections; an exchange that finds the cap
reached waits in a queue for a slot (``queued``), answered 503 by its connection machine
if none frees within ``connect_timeout``.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from proxy.config import UpstreamConfig
from proxy.protocol.fast_response import ResponseReader
from proxy.routing import Backend, BackendHealth

if TYPE_CHECKING:
    from proxy.net.client_io import ClientIO
    from proxy.net.reactor import Reactor

Addresses = dict[tuple[str, int], list[tuple[int, Any]]]
"""(host, port) -> [(address family, sockaddr)], resolved ahead of pool creation."""

RECV_SIZE = 65536
_IN = 0x001  # select.EPOLLIN
_OUT = 0x004  # select.EPOLLOUT


def resolve(host: str, port: int) -> list[tuple[int, Any]]:
    """getaddrinfo for a backend (blocking); OSError when it does not resolve."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[tuple[int, Any]] = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
    if not addresses:
        raise OSError(f"cannot resolve {host}:{port}")
    return addresses


class UpstreamIO:
    """One backend connection: its socket, its response reader, and while lent, the
    client connection it serves (``owner``)."""

    __slots__ = (
        "address",
        "backend",
        "connected",
        "failed",
        "fd",
        "idle_since",
        "mask",
        "out",
        "owner",
        "paused",
        "pool",
        "queued",
        "reader",
        "reused",
        "shut",
        "sock",
        "written",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.backend = pool.backend
        self.reader = ResponseReader()
        self.sock: socket.socket | None = None
        self.fd = -1
        self.address = 0
        """Which of the backend's resolved addresses the connection is made to."""
        self.connected = False
        self.queued = False
        """Waiting for a slot under max_connections_per_backend."""
        self.reused = False
        self.owner: ClientIO | None = None
        self.out: list[bytes] = []
        """Bytes not yet written (before the connection is made, or a full buffer)."""
        self.written = 0
        """Bytes of the current request written: 0 means it never reached the backend."""
        self.mask = 0
        self.paused = False
        self.shut = False
        self.failed = False
        self.idle_since = 0.0

    def connect(self, reactor: Reactor, address: int = 0) -> None:
        """Start a non-blocking connect to the backend's resolved address ``address``; a
        failure moves on to the next address, and is reported like any other once none
        is left."""
        self.address = address
        family, sockaddr = self.pool.addresses[address]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.fd = sock.fileno()
        code = sock.connect_ex(sockaddr)
        self.mask = _IN | _OUT
        reactor.register(self.fd, self, self.mask)
        if code == 0:
            self.connected = True
        elif code not in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
            self.connect_failed(reactor, code)

    def connect_failed(self, reactor: Reactor, code: int) -> None:
        """The connect to the current address failed (``code``: its errno): the next of
        the backend's addresses is tried (a name may resolve to an IPv6 and an IPv4
        address, only one of which listens); after the last, the failure is reported."""
        if self.address + 1 < len(self.pool.addresses):
            self.close(reactor)
            self.connect(reactor, self.address + 1)
            return
        self.failed = True
        reactor.note_upstream_failure(self, code)

    def close(self, reactor: Reactor) -> None:
        sock = self.sock
        if sock is not None:
            reactor.unregister(self.fd)
            self.sock = None
            sock.close()


class UpstreamPool:
    __slots__ = (
        "_gauges",
        "_waiting",
        "addresses",
        "backend",
        "config",
        "health",
        "idle",
        "in_use",
        "open",
    )

    def __init__(
        self,
        backend: Backend,
        config: UpstreamConfig,
        addresses: list[tuple[int, Any]] | None = None,
    ) -> None:
        """A pool for ``backend``; its addresses resolved here (blocking) unless given."""
        self.backend = backend
        self.config = config
        self.addresses = addresses if addresses is not None else resolve(backend.host, backend.port)
        self.idle: list[UpstreamIO] = []
        self.in_use = 0
        """Connections lent to exchanges (the least-loaded choice counts these)."""
        self.open = 0
        """Connections open or opening (the max_connections_per_backend count)."""
        self._waiting: deque[UpstreamIO] = deque()
        self.health = BackendHealth()
        self._gauges: tuple[Any, Any] | None = None

    def usable(self, now: float) -> bool:
        return self.health.usable(now)

    def lend(self, reactor: Reactor, owner: ClientIO, *, fresh: bool) -> UpstreamIO:
        """A connection for ``owner``: the most recently pooled live one (unless
        ``fresh``), else a new one (queued when the cap is reached)."""
        self.in_use += 1
        if not fresh:
            idle = self.idle
            ttl = self.config.idle_ttl
            now = time.monotonic()
            while idle:
                up = idle.pop()
                if now - up.idle_since > ttl:
                    self._close(reactor, up)
                    continue
                up.owner = owner
                up.written = 0
                return up
        up = UpstreamIO(self)
        up.owner = owner
        cap = self.config.max_connections_per_backend
        if cap and self.open >= cap:
            up.queued = True
            self._waiting.append(up)
            return up
        self.open += 1
        up.connect(reactor)
        return up

    def give_back(self, reactor: Reactor, up: UpstreamIO, *, reusable: bool) -> None:
        """The exchange is over: pool the connection if it may carry another, else
        close it."""
        self.in_use -= 1
        up.owner = None
        if up.queued:
            up.queued = False
            self._waiting.remove(up)
            return
        idle = self.idle
        if (
            reusable
            and not up.out
            and not up.failed
            and up.sock is not None
            and len(idle) < self.config.max_idle_per_backend
            and not reactor.stopping
        ):
            up.reused = True
            up.idle_since = time.monotonic()
            if up.paused:
                up.paused = False
                reactor.set_mask(up, _IN)
            idle.append(up)
            return
        self._close(reactor, up)

    def dropped_while_idle(self, reactor: Reactor, up: UpstreamIO) -> None:
        """The backend closed (or wrote to) a pooled connection."""
        with contextlib.suppress(ValueError):
            self.idle.remove(up)
        self._close(reactor, up)

    def _close(self, reactor: Reactor, up: UpstreamIO) -> None:
        if up.sock is not None:
            up.close(reactor)
            self.open -= 1
            # A slot is free: the longest-waiting exchange gets it.
            while self._waiting and (
                not self.config.max_connections_per_backend
                or self.open < self.config.max_connections_per_backend
            ):
                waiter = self._waiting.popleft()
                waiter.queued = False
                self.open += 1
                waiter.connect(reactor)
                reactor.note_progress(waiter)

    def close_all(self, reactor: Reactor) -> None:
        while self.idle:
            self._close(reactor, self.idle.pop())

    def write_gauges(self, family: Any) -> None:
        """This worker's pool gauges; /metrics sums them over workers."""
        if self._gauges is None:
            url = self.backend.url
            self._gauges = (family.labels(url, "idle"), family.labels(url, "in_use"))
        self._gauges[0].set(len(self.idle))
        self._gauges[1].set(self.in_use)
