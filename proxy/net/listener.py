"""SO_REUSEPORT listening sockets.

Each worker slot gets its own socket with SO_REUSEADDR + SO_REUSEPORT set before bind,
so the kernel spreads new connections across workers (``trio.open_tcp_listeners`` does
not set SO_REUSEPORT). Accepting is the reactor's (``proxy.net.reactor``).
"""

from __future__ import annotations

import socket

from proxy.config import parse_hostport


def _family_and_address(listen: str) -> tuple[int, tuple[str, int]]:
    host, port = parse_hostport(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, port)


def bind_reuseport(listen: str, backlog: int) -> socket.socket:
    """A non-blocking socket bound with SO_REUSEPORT and listening."""
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
