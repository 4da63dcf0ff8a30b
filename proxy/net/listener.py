"""SO_REUSEPORT listening sockets.

Each worker slot gets its own socket with SO_REUSEADDR + SO_REUSEPORT set before bind,
so the kernel spreads new connections across workers (``trio.open_tcp_listeners`` does
not set SO_REUSEPORT). Accepting is the reactor's (``proxy.net.reactor``).
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct

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


_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)


def _bpf(code: int, jump_true: int, jump_false: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jump_true, jump_false, k)


# Classic BPF over a TCP segment as a listening socket's filter sees it (offset 0 is the
# TCP header): drop a segment whose flags have SYN without ACK, keep everything else.
_REFUSE_SYNS = b"".join(
    (
        _bpf(0x30, 0, 0, 13),  # A = the flags byte
        _bpf(0x54, 0, 0, 0x12),  # A &= SYN | ACK
        _bpf(0x15, 0, 1, 0x02),  # A == SYN ? next : skip one
        _bpf(0x06, 0, 0, 0),  # drop it
        _bpf(0x06, 0, 0, 0xFFFFFFFF),  # keep it whole
    )
)


def stop_new_handshakes(sock: socket.socket) -> None:
    """Make a listening socket drop every new SYN, so that no new connection joins its
    accept queue; handshakes already under way complete, and what is queued can still
    be accepted.

    Closing a listening socket resets the connections waiting in its queue. A worker
    ending its drain calls this first, accepts (and answers) what is queued, then closes:
    a client whose SYN was dropped sends it again a second later and finds another
    worker's socket, or none (connection refused), never a reset after its connect.
    """
    program = ctypes.create_string_buffer(_REFUSE_SYNS)
    # struct sock_fprog: an unsigned short count, then (aligned) a pointer to the code.
    fprog = struct.pack("HP", len(_REFUSE_SYNS) // 8, ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


def accept_new_handshakes(sock: socket.socket) -> None:
    """Undo ``stop_new_handshakes`` (a worker that took a stopped worker's place)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # ENOENT: it had no filter
            raise
