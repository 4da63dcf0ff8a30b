"""Reading one request body off the client's byte stream. Sans-IO.

A body is framed by Content-Length (counted here) or chunked (``proxy.protocol.chunked``,
strict). ``feed`` takes whatever the client sent after the head and returns the body
bytes it held, decoded, and whatever came after the body's end (a pipelined request),
which is the caller's again. ``upstream`` frames body bytes for the backend the way the
request head sent upstream declared them: Content-Length bodies as they came, chunked
ones re-chunked (extensions and trailers dropped).
"""

from __future__ import annotations

from proxy.protocol.chunked import ChunkedDecoder, ChunkedError, encode_chunks


class BodyRejected(Exception):
    """The body cannot be taken: ``status`` (400 framing, 413 size) and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class BodyReader:
    __slots__ = ("_chunks", "_left", "done", "max_bytes", "received")

    def __init__(self, content_length: int | None, chunked: bool, max_bytes: int) -> None:
        self._chunks = ChunkedDecoder() if chunked else None
        self._left = 0 if chunked else (content_length or 0)
        self.max_bytes = max_bytes
        """0: no limit."""
        self.received = 0
        """Body bytes (decoded) so far."""
        self.done = not chunked and not self._left

    @property
    def chunked(self) -> bool:
        return self._chunks is not None

    @property
    def checked(self) -> bool:
        """Some of the body was found well framed: a whole chunk (chunked), any bytes
        (Content-Length)."""
        chunks = self._chunks
        return self.received > 0 if chunks is None else chunks.chunks > 0 or self.done

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """(body bytes in ``data``, what follows the body). BodyRejected on a framing
        error or a body over ``max_bytes``."""
        chunks = self._chunks
        if chunks is None:
            left = self._left
            if len(data) <= left:
                pieces, rest = [data], b""
            else:
                pieces, rest = [data[:left]], data[left:]
            taken = len(pieces[0])
            self._left = left - taken
            self.done = not self._left
        else:
            try:
                pieces = chunks.feed(data)
            except ChunkedError as exc:
                raise BodyRejected(400, f"malformed chunked body: {exc}") from None
            rest = data[chunks.consumed :] if chunks.done else b""
            self.done = chunks.done
            taken = sum(len(piece) for piece in pieces)
        self.received += taken
        if self.max_bytes and self.received > self.max_bytes:
            raise BodyRejected(413, "request body larger than max_body_bytes")
        return pieces, rest

    def upstream(self, pieces: list[bytes], *, ending: bool) -> bytes:
        """Body bytes framed for the backend (``ending``: the body ends here)."""
        if self._chunks is None:
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return encode_chunks(pieces, last=ending)
