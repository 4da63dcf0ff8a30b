"""A fast request-head parser that agrees with the h11 path.

The reference for what a request head means is h11 with the ``strict_h11`` patch,
followed by ``inspect_request``: that path is pure Python and costs tens of microseconds
per head. This module parses the common case, an ordinary HTTP/1.1 origin-form request,
and returns one of four verdicts:

* ``FastHead``: the head is accepted. Its method, target, version and header list are
  exactly what h11 would report, and ``info`` is exactly what ``inspect_request`` would
  return.
* ``NeedMore``: h11 would also still be waiting for the rest of the head.
* ``Rejected``: the reference path would refuse the head with this same status.
* ``Fallback``: anything unusual; the caller hands the bytes to h11, which decides.

Only ``FastHead``, ``NeedMore`` and ``Rejected`` need to be exact, so the module falls
back whenever it is not sure of h11's answer: it checks the h11 grammar's constraints
with cheap whole-buffer operations (no control bytes but HTAB, CRLF line ends only, no
obs-fold, a request line of three fields), after which every field line h11 accepts is
``token ":" value`` with the value's bytes already known good; a line of any other shape
falls back. The differential tests in ``tests/protocol/test_fast_head.py`` compare every
verdict with the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from proxy.protocol.byte_classes import FIELD_BYTE_VALUES, TCHAR, VCHAR, ByteClass
from proxy.protocol.http1 import (
    HOP_BY_HOP,
    Headers,
    RequestInfo,
    RequestRejected,
    _check_path,
    _connection_tokens,
)
from proxy.protocol.mcp import MCP_HEADER_NAMES, McpHeaders

# Methods taken on the fast path. CONNECT changes what follows the head and the others
# are rare enough that h11 may as well parse them.
_METHODS = frozenset({b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS"})

# h11 keeps at most this many Content-Length digits (``CONTENT_LENGTH_MAX_DIGITS``).
_MAX_LENGTH_DIGITS = 20

# Header names that need a closer look than being lower-cased and stripped, by kind.
# An Upgrade proposal or an Expect: 100-continue needs the reference path's handling
# (the WebSocket handshake checks, the 100's bookkeeping): such heads take the h11 path.
# Hop-by-hop headers, X-Forwarded-* and Via are ones a proxy rewrites or removes.
_HOST, _CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION, _REWRITTEN, _FALLBACK, _MCP = range(7)
_SPECIAL: dict[bytes, int] = {
    **dict.fromkeys(MCP_HEADER_NAMES, _MCP),
    **dict.fromkeys(
        (*HOP_BY_HOP, b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via"),
        _REWRITTEN,
    ),
    b"host": _HOST,
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    b"upgrade": _FALLBACK,
    b"expect": _FALLBACK,
}


@dataclass(slots=True, init=False)
class FastHead:
    """An accepted request head, as the reference path would have reported it."""

    method: bytes
    target: bytes
    http_version: bytes
    headers: Headers
    """Lower-cased names and OWS-stripped values, in order, as h11 gives them."""
    consumed: int
    """Length of the head in bytes: what follows it in the buffer is body or the next
    request."""
    info: RequestInfo
    """What ``inspect_request`` returns for this head."""
    plain: bytes | None
    """The header lines as received (each with its CRLF), when none of them is one a
    proxy rewrites or removes (hop-by-hop, X-Forwarded-*, Via): the backend can be sent
    them as they are. None otherwise, and for heads parsed by h11."""
    mcp_headers: McpHeaders
    """The headers the MCP rules read, gathered while the head was parsed (an empty
    set where none was given)."""

    def __init__(
        self,
        method: bytes,
        target: bytes,
        http_version: bytes,
        headers: Headers,
        consumed: int,
        info: RequestInfo,
        plain: bytes | None = None,
        mcp_headers: McpHeaders | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self.headers = headers
        self.consumed = consumed
        self.info = info
        self.plain = plain
        self.mcp_headers = _NO_MCP_HEADERS if mcp_headers is None else mcp_headers


@dataclass(frozen=True, slots=True)
class NeedMore:
    """The head is not complete yet and is within the size limit."""


@dataclass(frozen=True, slots=True)
class Fallback:
    """The head is unusual: parse it with h11 instead."""

    why: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """The reference path refuses this head with ``status`` (and ``headers`` on the
    answer, where the refusal has some)."""

    status: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


Verdict = FastHead | NeedMore | Fallback | Rejected

NEED_MORE = NeedMore()


_HEAD_BYTES: Final = ByteClass(FIELD_BYTE_VALUES + b"\r\n")
"""Bytes a head may hold on the fast path: a field value's (HTAB, printable ASCII and
obs-text), CR and LF."""
_MARKS: Final = bytes(
    (1 if value == 0x0D else 2 if value == 0x0A else 0)
    if _HEAD_BYTES.holds_only(bytes([value]))
    else 3
    for value in range(256)
)
"""CR to 1, LF to 2, the other bytes of ``_HEAD_BYTES`` to 0, any other byte to 3."""
_CRLF_MARKS: Final = b"\x01\x02"


def _ambiguity(head: bytes) -> str:
    """Why ``head`` (a whole head, its blank line included) must be left to h11, or ""
    if its field lines have one reading (then ``_split_fields`` splits them)."""
    # One translation marks CR, LF and the bytes no head may hold; with every CRLF's
    # marks taken out, any mark left is a control byte or a bare CR or LF (the marks
    # keep the head's positions, so only a real CRLF is taken out).
    if head.translate(_MARKS).replace(_CRLF_MARKS, b"").strip(b"\x00"):
        if not _HEAD_BYTES.holds_only(head):
            return "control byte in head"
        # A bare LF ends a line (and may end the head early) for h11; a bare CR is a
        # line-ending ambiguity parsers judge differently.
        return "bare CR or LF"
    # (``find`` rather than ``in``: a bytes ``in`` bytes test first tries the operand as
    # an integer, and pays for an exception it then discards.)
    if head.find(b"\r\n ") != -1 or head.find(b"\r\n\t") != -1:
        # obs-fold, or whitespace before a first field name: strict_h11 refuses both.
        return "line starting with whitespace"
    return ""


def _split_fields(head: bytes, start: int, end: int) -> Headers | None:
    """The field lines of ``head`` (one ``_ambiguity`` passed) from ``start`` to ``end``,
    where the CRLF after the last one begins: each line's name lower-cased and its value
    without OWS at either end, as h11 gives them; None if a line is not
    ``token ":" value``. (A few calls for the whole block and one per line: each call
    out of compiled code costs more than the bytes it looks at.)"""
    if start >= end:
        return []
    block = head[start:end]
    lines = block.split(b"\r\n")
    lowered = block.lower().split(b"\r\n")
    fields: Headers = []
    for i in range(len(lines)):
        line = lines[i]
        colon = line.find(b":")
        if colon <= 0:
            return None  # no colon, or an empty name
        first = colon + 1
        last = len(line)
        while first < last and (line[first] == 0x20 or line[first] == 0x09):
            first += 1
        while last > first and (line[last - 1] == 0x20 or line[last - 1] == 0x09):
            last -= 1
        fields.append((lowered[i][:colon], line[first:last]))
    if not TCHAR.holds_only(b"".join([name for name, _ in fields])):
        return None  # a name that is not a token (whitespace before the colon, ...)
    return fields


class HeadCollector:
    """Takes each header of a head, lower-cased and stripped as h11 gives them, and notes
    the few whose values the proxy reads."""

    __slots__ = (
        "chunked",
        "connection",
        "headers",
        "host",
        "hosts",
        "length",
        "mcp",
        "odd",
        "rewritten",
    )

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.headers: Headers = []
        self.hosts = 0
        self.host = b""
        self.length: int | None = None
        self.chunked = False
        self.connection: list[bytes] | None = None
        self.odd = ""
        """Why the head must take the h11 path, if it must."""
        self.rewritten = False
        """A header the proxy rewrites or removes is present."""
        self.mcp: dict[bytes, list[bytes]] | None = None
        """The headers MCP rules read, every copy (None: none was seen)."""

    def take(self, fields: Headers) -> None:
        """A head's fields as h11 gives them: names lower-cased, values without OWS."""
        self.headers = fields
        for name, value in fields:
            kind = _SPECIAL.get(name)
            if kind is not None:
                self._special(kind, name, value)

    def _special(self, kind: int, name: bytes, value: bytes) -> None:
        if kind == _HOST:
            self.hosts += 1
            self.host = value
        elif kind == _CONTENT_LENGTH:
            # h11 folds repeated and comma-listed lengths into one header; leave that
            # rewriting to it.
            if self.length is not None or not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
                self.odd = "content-length"
            else:
                self.length = int(value)
        elif kind == _REWRITTEN:
            self.rewritten = True
        elif kind == _MCP:
            if self.mcp is None:
                self.mcp = {}
            self.mcp.setdefault(name, []).append(value)
        elif kind == _TRANSFER_ENCODING:
            # h11 lower-cases the value and answers 501 for anything but one "chunked";
            # only the canonical spelling is taken here.
            if self.chunked or value != b"chunked":
                self.odd = "transfer-encoding"
            self.chunked = True
            self.rewritten = True
        elif kind == _CONNECTION:
            if self.connection is None:
                self.connection = []
            self.connection.append(value)
            self.rewritten = True
        else:
            self.odd = name.decode("ascii")


def parse_request_head(data: bytes, max_header_bytes: int) -> Verdict:
    """Classify the request head at the start of ``data``.

    ``data`` is everything received for this request so far (it may run on into the
    body or a pipelined request); ``max_header_bytes`` is the limit h11 is given as
    ``max_incomplete_event_size`` and the proxy applies to whole heads.
    """
    return parse_head_with(data, max_header_bytes, HeadCollector())


def parse_head_with(
    data: bytes,
    max_header_bytes: int,
    collector: HeadCollector,
) -> Verdict:
    """``parse_request_head`` with the collector given (a connection keeps one)."""
    if not data:
        return NEED_MORE
    if data[0] < 0x21:
        # h11 refuses a head that starts with a control byte or a space before it is
        # complete, and an empty line where the request line should be.
        return Fallback("leading whitespace or control byte")
    end = data.find(b"\r\n\r\n")
    if end == -1:
        # h11 ends a head at LF [CR] LF, so a bare LF may already have ended it.
        if data.count(b"\n") != data.count(b"\r\n"):
            return Fallback("bare LF")
        if len(data) > max_header_bytes:
            return Rejected(431, "request header section too large")
        return NEED_MORE
    consumed = end + 4
    head = data[:consumed]
    why = _ambiguity(head)
    if why:
        return Fallback(why)

    line_end = head.find(b"\r\n")
    parts = head[:line_end].split(b" ")
    if len(parts) != 3:
        return Fallback("request line is not three fields")
    method, target, version = parts
    if method not in _METHODS:
        return Fallback("method")
    if version != b"HTTP/1.1":
        return Fallback("version")
    if not target.startswith(b"/") or not VCHAR.holds_only(target):
        # Absolute-form and asterisk-form need inspect_request's target handling; a byte
        # outside 0x21-0x7e is outside h11's target grammar (vchar only).
        return Fallback("target")

    fields = _split_fields(head, line_end + 2, end)
    if fields is None:
        return Fallback("field line")
    collector.reset()
    collector.take(fields)
    if collector.odd:
        return Fallback(collector.odd)

    # From here the head is one h11 accepts as far as syntax goes; the rest mirrors the
    # checks that follow in the reference path, in the same order.
    if collector.hosts != 1:
        return Rejected(400, "missing Host header" if not collector.hosts else _TWO_HOSTS)
    if consumed > max_header_bytes:
        return Rejected(431, "request header section too large")
    chunked = collector.chunked
    content_length = collector.length
    if chunked and content_length is not None:
        return Rejected(400, "both Content-Length and Transfer-Encoding")
    query_at = target.find(b"?")
    raw_path = target if query_at == -1 else target[:query_at]
    if not _PLAIN_PATH.holds_only(raw_path):  # a dot, a backslash or a %-escape in it
        try:
            _check_path(raw_path)
        except RequestRejected as exc:
            return Rejected(exc.status, exc.reason)
    connection = collector.connection
    info = RequestInfo(
        raw_path.decode("ascii"),
        target,
        collector.host,
        chunked,
        content_length,
        None,
        _connection_tokens(connection) if connection else _NO_TOKENS,
    )
    plain = None if collector.rewritten else head[line_end + 2 : end + 2]
    mcp = collector.mcp
    return FastHead(
        method,
        target,
        b"1.1",
        collector.headers,
        consumed,
        info,
        plain,
        _NO_MCP_HEADERS if mcp is None else McpHeaders(mcp),
    )


_TWO_HOSTS = "more than one Host header"
_NO_MCP_HEADERS = McpHeaders()
# Every byte but the three that can form a dot-segment or a backslash path (``.``, ``\``,
# ``%``): a path of these only needs no look from _check_path.
_PLAIN_PATH = ByteClass(bytes(b for b in range(256) if b not in b".\\%"))
_NO_TOKENS: frozenset[bytes] = frozenset()
