"""A strict decoder for chunked request bodies (RFC 9112 §7.1). Sans-IO.

Neither parser the proxy has fits here. h11 is the reference for heads, but in bodies it
is lenient where a proxy must not be: it waits for a CRLF that a bare LF never brings (a
client gets 408 instead of 400) and takes chunk sizes of up to 20 hex digits, so a size of
2^64 or more is accepted and what follows it forwarded as data. llhttp is strict, but it
cannot stop at the end of the body: it parses on into a pipelined request's head, which
must be checked before any parser sees it.

So this decoder keeps to the grammar, lines ending in CRLF only::

    chunked-body = *chunk last-chunk trailer-section CRLF
    chunk        = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
    chunk-size   = 1*HEXDIG              (at most 16 digits: below 2^64)
    last-chunk   = 1*"0" [ chunk-ext ] CRLF

Chunk extensions are checked for stray bytes and dropped; trailer fields are checked the
same way and dropped (the proxy re-frames the body for the backend, as h11 would).
``feed`` stops exactly at the body's end, so whatever follows stays with the caller.
"""

from __future__ import annotations

from typing import Final

from proxy.protocol.byte_classes import FIELD_BYTES, TCHAR


class ChunkedError(Exception):
    """The body is not valid chunked framing; the request gets 400."""


MAX_SIZE_DIGITS: Final = 16
"""Hex digits in a chunk size: 16 cover every size below 2^64."""
MAX_LINE: Final = 4096
"""Bytes in a chunk-size line (with its extensions) or a trailer line."""
_HEX: Final = b"0123456789abcdefABCDEF"

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """Decodes one chunked body: ``feed`` returns the data it completed, ``done`` says
    the body has ended, ``consumed`` how many bytes of the last ``feed`` it used."""

    __slots__ = (
        "_left",
        "_line",
        "_state",
        "_trailer_bytes",
        "chunks",
        "consumed",
        "max_trailer_bytes",
    )

    def __init__(self, max_trailer_bytes: int = 16384) -> None:
        self._state = _SIZE
        self._left = 0
        """Bytes of chunk data still to come."""
        self._line = b""
        """Part of a line whose end has not arrived."""
        self._trailer_bytes = 0
        self.max_trailer_bytes = max_trailer_bytes
        self.consumed = 0
        self.chunks = 0
        """Chunks read whole, their closing CRLF included."""

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> list[bytes]:
        """The chunk data in ``data``; ChunkedError on a framing error. Once ``done``,
        ``data[consumed:]`` is what follows the body."""
        out: list[bytes] = []
        at = 0
        end = len(data)
        while at < end:
            state = self._state
            if state == _DATA:
                take = min(self._left, end - at)
                out.append(data[at : at + take])
                at += take
                self._left -= take
                if not self._left:
                    self._state = _DATA_END
                continue
            if state == _DONE:
                break
            line_end = data.find(b"\n", at)
            if line_end < 0:
                self._line += data[at:]
                at = end
                if len(self._line) > MAX_LINE:
                    raise ChunkedError("chunk line too long")
                break
            line = self._line + data[at : line_end + 1] if self._line else data[at : line_end + 1]
            self._line = b""
            at = line_end + 1
            if len(line) > MAX_LINE + 2:
                raise ChunkedError("chunk line too long")
            if len(line) < 2 or line[-2] != 0x0D:
                raise ChunkedError("chunk framing line not ended by CRLF")
            self._line_done(state, line[:-2])
        self.consumed = at
        return out

    def _line_done(self, state: int, line: bytes) -> None:
        if state == _DATA_END:
            if line:
                raise ChunkedError("chunk data longer than its size")
            self._state = _SIZE
            self.chunks += 1
        elif state == _SIZE:
            self._size_line(line)
        else:  # _TRAILER
            if not line:
                self._state = _DONE
                return
            self._trailer_bytes += len(line) + 2
            if self._trailer_bytes > self.max_trailer_bytes:
                raise ChunkedError("trailer section too large")
            name, colon, _ = line.partition(b":")
            if (
                not colon
                or not name
                or not TCHAR.holds_only(name)
                or not FIELD_BYTES.holds_only(line)
            ):
                raise ChunkedError("malformed trailer field")

    def _size_line(self, line: bytes) -> None:
        digits = len(line) - len(line.lstrip(_HEX))
        if not digits:
            raise ChunkedError("missing chunk size")
        if digits > MAX_SIZE_DIGITS:
            raise ChunkedError("chunk size too large")
        rest = line[digits:]
        # Extensions (BWS ";" ...) are checked for stray bytes, then dropped.
        if rest and (rest.lstrip(b" \t")[:1] != b";" or not FIELD_BYTES.holds_only(rest)):
            raise ChunkedError("malformed chunk extension")
        size = int(line[:digits], 16)
        if size:
            self._left = size
            self._state = _DATA
        else:
            self._state = _TRAILER


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a body the proxy frames itself."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def encode_chunks(pieces: list[bytes], *, last: bool = False) -> bytes:
    """``pieces`` as chunks, one each, empty ones left out (an empty chunk is the last
    one); ``last``: the last chunk after them."""
    if len(pieces) == 1 and not last:  # the usual case: one read's bytes, one chunk
        piece = pieces[0]
        return encode_chunk(piece) if piece else b""
    out = [encode_chunk(piece) for piece in pieces if piece]
    if last:
        out.append(LAST_CHUNK)
    return b"".join(out)


LAST_CHUNK: Final = b"0\r\n\r\n"
