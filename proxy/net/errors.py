"""Exceptions the connection driver uses between its parts."""

from __future__ import annotations

import trio

CLOSED = (trio.BrokenResourceError, trio.ClosedResourceError)
"""What trio raises when the other side of a stream is gone."""


class ClientGone(Exception):
    """The client closed or reset its connection, or stopped reading."""


class BackendFailed(Exception):
    """The backend failed; the client gets ``status`` if its response has not started."""

    def __init__(self, status: int, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retryable = retryable
