"""SO_REUSEPORT listening sockets and the accept loop.

Each worker binds its own socket with SO_REUSEADDR + SO_REUSEPORT set before bind, so
the kernel spreads new connections across workers (``trio.open_tcp_listeners`` does not
set SO_REUSEPORT). When a worker holds ``max_connections_per_worker`` connections, a new
one is answered 503 with Retry-After and closed: the client learns why and when to come
back, instead of waiting in a backlog. When the process runs out of file descriptors,
accept backs off briefly rather than spinning.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable

import trio

from proxy.config import parse_hostport
from proxy.net.context import WorkerContext
from proxy.net.errors import RECV_SIZE
from proxy.net.http_conn import linger_close, log_refusal
from proxy.protocol.http1 import raw_error_response

# accept() failures that mean "out of resources right now", worth a pause, not a crash.
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_BACKOFF = 0.1
# Refusals answered with a 503 at once; beyond this many in flight (a flood), extra
# connections are closed without an answer so the refusals cannot exhaust descriptors.
_MAX_PENDING_REFUSALS = 256


def _family_and_address(listen: str) -> tuple[int, tuple[str, int]]:
    host, port = parse_hostport(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, port)


def bind_reuseport(listen: str, backlog: int) -> socket.socket:
    """A blocking-API socket bound with SO_REUSEPORT and listening."""
    family, address = _family_and_address(listen)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def _refuse_overloaded(
    stream: trio.SocketStream, response: bytes, pending: list[int]
) -> None:
    pending[0] += 1
    try:
        with trio.move_on_after(2.0):
            # Read what the client already sent so the close is not a reset.
            await stream.receive_some(RECV_SIZE)
        await stream.send_all(response)
        await linger_close(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        pending[0] -= 1
        await trio.aclose_forcefully(stream)


async def accept_loop(
    ctx: WorkerContext,
    sock: trio.socket.SocketType,
    handler: Callable[[trio.SocketStream, tuple[str, int]], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    """Accept until cancelled; connection tasks run in ``nursery`` (which outlives the
    accept loop during a drain)."""
    limit = ctx.config.server.max_connections_per_worker
    overload_reason = "this worker is at max_connections_per_worker"
    overloaded = raw_error_response(
        503,
        overload_reason,
        extra=[(b"retry-after", str(ctx.config.server.retry_after_seconds).encode())],
    )
    pending_refusals = [0]
    while True:
        try:
            client, address = await sock.accept()
        except OSError as exc:
            if exc.errno in _CAPACITY_ERRNOS:
                ctx.log.warning("accept_backoff", error=errno.errorcode.get(exc.errno or 0))
                await trio.sleep(_ACCEPT_BACKOFF)
                continue
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                continue
            raise
        stream = trio.SocketStream(client)
        if ctx.stats.active_connections >= limit:
            log_refusal(ctx, address[0], address[1], 503, overload_reason)
            if pending_refusals[0] >= _MAX_PENDING_REFUSALS:
                await trio.aclose_forcefully(stream)
            else:
                nursery.start_soon(_refuse_overloaded, stream, overloaded, pending_refusals)
            continue
        nursery.start_soon(handler, stream, (address[0], address[1]))
