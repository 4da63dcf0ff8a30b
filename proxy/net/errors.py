"""Exceptions the connection driver uses between its parts, and the one write helper
that maps OS errors onto them."""

from __future__ import annotations

import os

import trio

RECV_SIZE = 65536
"""Bytes asked of a socket per receive, on every connection of the I/O nucleus."""

CLOSED = (trio.BrokenResourceError, trio.ClosedResourceError)
"""What trio raises when the other side of a stream is gone."""


class ClientGone(Exception):
    """The client closed or reset its connection, or stopped reading."""


class StreamParked(Exception):
    """An idle stream was handed to the worker's park (``proxy.net.park``): the task that
    served it ends here, every level between leaving its clean-up to the task the park
    starts when the stream wakes (``ClientConnection.resume_stream``)."""


class BackendFailed(Exception):
    """The backend failed; the client gets ``status`` if its response has not started."""

    def __init__(self, status: int, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retryable = retryable


def write_now(stream: trio.SocketStream, data: bytes | memoryview) -> int:
    """Write what the socket takes at once, without waiting or a trip through the
    scheduler: the number of bytes written (0 when its buffer is full). A small answer
    nearly always fits, which saves the cancel scope and socket wrapper of a
    ``send_all`` per write; the caller sends any rest with ``send_all``.
    Raises BrokenResourceError when the peer is gone, ClosedResourceError when the
    stream was closed here."""
    fd = stream.socket.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the stream is closed")
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        raise trio.BrokenResourceError(str(exc)) from exc
