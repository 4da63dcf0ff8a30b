"""A listening socket in the worker's reactor (``proxy.net.reactor``): accepting new
connections in batches, each given its connection machine, and answering 503 at once to
those the worker takes no work on (full, or draining)."""

from __future__ import annotations

import errno
import select
import socket
from typing import TYPE_CHECKING

import trio

from proxy.net.client_io import ClientIO
from proxy.protocol.connection import Connection

if TYPE_CHECKING:
    from proxy.net.reactor import Reactor

_IN = select.EPOLLIN
_ACCEPT_BATCH = 64
# accept() failures that mean "out of resources right now", worth a pause, not a crash.
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_BACKOFF = 0.1
_MAX_PENDING_REFUSALS = 256
"""Overload refusals lingering at once; past that, extra connections are closed unanswered
so that refusals cannot exhaust descriptors in a flood."""


class Listener:
    __slots__ = ("reactor", "sock")

    def __init__(self, sock: socket.socket, reactor: Reactor) -> None:
        self.sock = sock
        self.reactor = reactor

    def accept(self) -> bool:
        """Accept a batch of waiting connections; False once none is left waiting (or
        accepting must pause)."""
        r = self.reactor
        ctx = r.ctx
        config = ctx.config
        limit = config.server.max_connections_per_worker
        proxy_header = config.proxy_protocol.enabled
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                if exc.errno in _CAPACITY_ERRNOS:
                    ctx.log.warning("accept_backoff", error=errno.errorcode.get(exc.errno or 0))
                    self._pause()
                    return False
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            overloaded = len(r.connections) - r.refusing >= limit
            if overloaded and r.refusing >= _MAX_PENDING_REFUSALS:
                ctx.overloaded(address)
                sock.close()
                continue
            io = ClientIO(r, sock)
            ip = address[0]
            io.m = Connection(
                ctx,
                io,
                (ip, address[1]),
                proxy_header=proxy_header,
                trusted=proxy_header and ctx.is_trusted_proxy(ip),
            )
            r.register(io.fd, io, _IN)
            r.connections.add(io)
            ctx.connection_opened()
            if overloaded or r.stopping:
                # Full (or a drain refusing new work): the client learns why and when to
                # come back, instead of waiting in a backlog.
                r.refusing += 1
                io.m.refuse_new(r.stopping)
            io.settle()
        return True

    def _pause(self) -> None:
        """Out of descriptors or memory: stop accepting for a moment."""
        r = self.reactor
        r.unregister(self.sock.fileno())

        async def resume() -> None:
            await trio.sleep(_ACCEPT_BACKOFF)
            if self in r.listeners:
                r.register(self.sock.fileno(), self, _IN)

        r.ctx.nursery.start_soon(resume)
