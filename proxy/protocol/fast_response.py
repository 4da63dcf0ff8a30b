"""A backend's responses read with llhttp (httptools). Sans-IO.

One ``ResponseReader`` lives as long as its backend connection: llhttp's parser is made
once and carries on from one response to the next. ``start`` prepares it for the answer
to the request just sent; ``feed(data)`` returns what the bytes completed, in order: at
most one ``ResponseHead`` per message, ``bytes`` of body already framed for the client,
and ``END`` when the message is over.

Body bytes come decoded: a ``Content-Length`` body as it came, a chunked one without its
framing (trailers are dropped, as h11 drops them), a body delimited by the connection
closing as it came, ending when ``feed(b"")`` reports the close
(``ResponseHead.until_close``). The client's framing is the machine's choice.

Informational (1xx) heads come before the final one: each is a ``ResponseHead`` followed
by ``END``, and the reader goes on to the next message. A 101 ends the reader's work:
``upgraded`` is set and ``trailing`` holds the bytes that came after the head (the
first bytes of the new protocol). The answer to a HEAD request has no body whatever its
headers say; llhttp cannot be told so, so the reader stops at its head and the
connection is not reused. Bytes after the end of the final response leave it whole but
the connection unfit for reuse (``keep_alive`` false). Malformed bytes raise
``Malformed``; so does a transfer coding other than ``chunked``.

``tests/protocol/test_fast_response.py`` holds the reader to h11's reading of the same
bytes.
"""

from __future__ import annotations

import re
from typing import Final

import httptools

from proxy.protocol.byte_classes import FIELD_BYTES

Headers = list[tuple[bytes, bytes]]
END: Final = None
_OWS: Final = b" \t"


class Malformed(Exception):
    """The backend's bytes are not a valid HTTP/1.1 response (or not one we relay)."""


class _Stop(Exception):
    """Raised in a callback to stop llhttp; the reader's ``_stop`` says why (the
    exception llhttp hands back is not it, and its ``__context__`` depends on the
    caller's own exception state)."""


_HEAD_ONLY: Final = "head only"
"""Stopped after the head of a response that has no body (HEAD)."""
_AFTER_END: Final = "after end"
"""Stopped at bytes that follow the end of the final response."""


class ResponseHead:
    __slots__ = (
        "chunked",
        "content_length",
        "event_stream",
        "headers",
        "http_version",
        "plain",
        "reason",
        "session",
        "status",
        "unbuffered",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        http_version: bytes,
        headers: Headers,
        content_length: int | None,
        chunked: bool,
        flags: int = 0,
    ) -> None:
        self.status = status
        self.reason = reason
        self.http_version = http_version
        self.headers = headers
        """Lower-case names, values without surrounding whitespace (as h11 gives them)."""
        self.content_length = content_length
        self.chunked = chunked
        self.event_stream = bool(flags & _EVENT_STREAM)
        """Its (first) Content-Type is text/event-stream."""
        self.session = bool(flags & _SESSION_ID)
        """It carries an Mcp-Session-Id."""
        self.unbuffered = bool(flags & _UNBUFFERED)
        """It carries an X-Accel-Buffering of its own."""
        self.plain: bytes | None = None
        """The header lines as received (each with its CRLF), when none is one a proxy
        removes or rewrites (hop-by-hop ones other than Transfer-Encoding: chunked, Via)
        and the head came whole at the start of one read: the client can be sent them
        as they are. None otherwise."""


Event = ResponseHead | bytes | None
_NO_HEADERS: Headers = []
"""The reader's header list between a head and the next message: fields that arrive
meanwhile are trailers, dropped (as h11 keeps them apart from the head); never appended
to, ``on_message_begin`` starts each message with a new list."""
_STATUS_LINE_START: Final = b"HTTP/"
_CR_LF: Final = b"\r\n"


# Header names the reader looks at beyond lower-casing and stripping them.
_TRANSFER_ENCODING: Final = b"transfer-encoding"
_CONTENT_LENGTH: Final = b"content-length"
_CONTENT_TYPE: Final = b"content-type"
_SESSION: Final = b"mcp-session-id"
_ACCEL: Final = b"x-accel-buffering"
_REWRITTEN: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"via",
    }
)
_SPECIAL: Final = _REWRITTEN | {
    _TRANSFER_ENCODING,
    _CONTENT_LENGTH,
    _CONTENT_TYPE,
    _SESSION,
    _ACCEL,
}


class ResponseReader:
    __slots__ = (
        "_chunked",
        "_events",
        "_flags",
        "_head_bytes",
        "_head_only",
        "_headers",
        "_interim",
        "_length",
        "_parser",
        "_pristine",
        "_reason",
        "_start",
        "_stop",
        "_tail",
        "_until_close",
        "complete",
        "final",
        "keep_alive",
        "trailing",
        "upgraded",
    )

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._events: list[Event] = []
        self._headers: Headers = []
        self._reason = b""
        self._chunked = False
        self._length: int | None = None
        self._until_close = False
        self._head_only = False
        self._flags = 0
        self._pristine = True
        """No byte of the current response has been fed yet."""
        self._start = b""
        """The first bytes of a response while fewer than ``HTTP/`` have come."""
        self._head_bytes = b""
        """What was fed of the current response until its final head."""
        self._interim = 0
        """1xx heads read before the final one."""
        self._stop: Malformed | str | None = None
        self._tail = b""
        """At least the last 6 bytes fed (fewer only if fewer came)."""
        self.complete = False
        """The final (non-1xx) response has ended."""
        self.final = False
        """The final response's head was read."""
        self.keep_alive = False
        """The final response leaves the connection reusable."""
        self.upgraded = False
        """The backend switched protocols (101); ``trailing`` is the new protocol's."""
        self.trailing = b""

    def spent(self) -> None:
        """The connection switched protocols: no response is read on it again, so the
        parser is let go of (a held tunnel keeps only what it needs)."""
        self._parser = _SPENT_PARSER
        self._headers = []

    def start(self, head_only: bool = False) -> None:
        """Expect the answer to a new request (``head_only``: to a HEAD request)."""
        self.complete = self.final = self.keep_alive = False
        self._head_only = head_only
        self._pristine = True
        self._start = b""
        self._interim = 0

    # -- llhttp callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # Bytes after the end of the response: the response was whole, but the
            # connection is never reused.
            self._stop = _AFTER_END
            raise _Stop
        self._headers = []
        self._chunked = False
        self._length = None
        self._flags = 0

    def on_status(self, reason: bytes) -> None:
        if not FIELD_BYTES.holds_only(reason):
            self._malformed("a control character in the reason phrase")
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if headers is _NO_HEADERS:  # a trailer field: dropped, unless it is framing
            lowered = name.lower()
            if lowered in (_TRANSFER_ENCODING, _CONTENT_LENGTH):
                self._malformed("a framing field in the trailers")  # RFC 9110 §6.5.1
            return
        lowered = name.lower()
        stripped = value.strip(_OWS)
        headers.append((lowered, stripped))
        if lowered in _SPECIAL:
            self._special(lowered, stripped, value)

    def _malformed(self, reason: str) -> None:
        self._stop = Malformed(reason)
        raise _Stop

    def _special(self, name: bytes, value: bytes, raw: bytes) -> None:
        if name == _TRANSFER_ENCODING:
            if value.lower() != b"chunked":
                self._malformed("a transfer coding other than chunked")
            if self._chunked:
                self._malformed("chunked given twice")  # RFC 9112 §7: at most once
            if raw.rstrip(b" ") != raw.rstrip(_OWS):
                # llhttp takes "chunked<TAB>" for another coding and would read the
                # body to the close: the two readings of the framing must never differ.
                self._malformed("whitespace other than spaces after chunked")
            self._chunked = True
        elif name == _CONTENT_LENGTH:
            self._length = int(value)  # llhttp has checked the digits and any repeat
        elif name == _CONTENT_TYPE:
            if not self._flags & _TYPED:
                self._flags |= _TYPED
                if value.split(b";", 1)[0].strip().lower() == b"text/event-stream":
                    self._flags |= _EVENT_STREAM
        elif name == _SESSION:
            self._flags |= _SESSION_ID
        elif name == _ACCEL:
            self._flags |= _UNBUFFERED
        else:
            self._flags |= _REWRITE

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        chunked = self._chunked
        length = self._length
        version_text = parser.get_http_version()
        if version_text == "1.1":
            version = b"1.1"
        elif version_text == "1.0":
            version = b"1.0"
        else:
            self._malformed("an HTTP version other than 1.0 and 1.1")
        if status < 100:
            self._malformed("a status code below 100")
        head = ResponseHead(
            status, self._reason, version, self._headers, length, chunked, self._flags
        )
        self._reason = b""
        self._events.append(head)
        self._headers = _NO_HEADERS  # the head has them; a held stream need not
        if status < 200:
            if (length or chunked) and status > 103:
                # h11 reads no body on any 1xx; llhttp reads one on the codes it does
                # not know (104-199) where the head frames one. No reading is safe.
                self._malformed("framing on an unassigned interim (1xx) answer")
            self._interim += 1
            return
        if self._interim and not _status_lines_ok(self._head_bytes, self._interim + 1):
            # llhttp reads RTSP and ICE status lines too; only the first line of a
            # response is checked before parsing, so those after a 1xx are checked here.
            self._malformed("no HTTP status line")
        self._head_bytes = b""
        head_only = self._head_only
        until_close = (
            not head_only and not chunked and length is None and status != 204 and status != 304
        )
        self.final = True
        if status == 204 or status == 304:
            self._length = None  # no body, whatever Content-Length says
        self._until_close = until_close
        # An HTTP/1.0 answer closes its connection (as h11 reads it, keep-alive or not).
        self.keep_alive = (
            not until_close and not head_only and version == b"1.1" and parser.should_keep_alive()
        )
        if head_only:
            self._events.append(END)
            self.complete = True
            self._stop = _HEAD_ONLY
            raise _Stop

    def on_body(self, body: bytes) -> None:
        self._events.append(body)

    def on_message_complete(self) -> None:
        self._events.append(END)
        if self.final:
            self.complete = True

    # -- feeding ------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        """The events ``data`` completed. ``b""`` means the backend closed."""
        events: list[Event] = []
        self._events = events
        if not data:
            # EOF ends a close-delimited body; anywhere else it is a truncation.
            if self.complete:
                return events
            if self.final and self._until_close:
                self.complete = True
                events.append(END)
                return events
            raise Malformed("the backend closed the connection mid-response")
        fresh = self._pristine
        if fresh:
            start = self._start + data
            self._head_bytes = start
            if not start.startswith(_STATUS_LINE_START):
                if len(start) >= 5 or not _STATUS_LINE_START.startswith(start):
                    # Not an HTTP response (llhttp also reads RTSP and ICE), or empty
                    # lines before one (h11: "no response line received").
                    raise Malformed("no HTTP status line")
                self._start = start
            else:
                self._start = b""
                self._pristine = False
        elif not self.final:  # a head that spans reads
            self._head_bytes += data
        try:
            self._parser.feed_data(data)
            if fresh and events and type(events[0]) is ResponseHead:
                self._find_plain(events[0], data)
        except httptools.HttpParserUpgrade as exc:
            # llhttp stops after a 101's head; what follows is the new protocol's.
            self.upgraded = self.complete = True
            self.keep_alive = False
            self.trailing = data[exc.args[0] :]
        except httptools.HttpParserCallbackError:
            # One of our callbacks stopped the parser; `_stop` says why.
            stop = self._stop
            self._stop = None
            if stop is _HEAD_ONLY:
                return events  # the parser is spent; the connection is not reused
            if stop is _AFTER_END:
                self.keep_alive = False
                return events
            if isinstance(stop, Malformed):
                raise stop from None
            raise Malformed("invalid response") from None
        except httptools.HttpParserError as exc:
            if self.complete:  # llhttp refuses bytes after a "Connection: close" answer
                self.keep_alive = False
                return events
            raise Malformed(_llhttp_reason(exc)) from None
        tail = data if len(data) >= 6 else self._tail + data
        self._tail = tail
        if self.keep_alive and self.complete and data[-1] in _CR_LF and self._swallowed(tail):
            self.keep_alive = False
        return events

    def _swallowed(self, tail: bytes) -> bool:
        """Whether llhttp skipped empty lines after the end of the response (it takes
        them for the space before a next message): the response is complete and
        ``tail``, the last bytes fed, ends with CR or LF. Where the bytes cannot tell,
        the connection is not reused."""
        if self._length:  # a Content-Length body: it must end the bytes fed
            body = b"".join([event for event in self._events if type(event) is bytes])
            return not body or not tail.endswith(body)
        # A head or a chunked body ends with one empty line, never two in a row.
        return not tail.endswith(b"\r\n\r\n") or tail.endswith(b"\r\n\r\n\r\n")

    def _find_plain(self, head: ResponseHead, data: bytes) -> None:
        """``head.plain``, where the head is the first thing in ``data`` and final."""
        if head.status < 200 or self._flags & _REWRITE:
            return
        end = data.find(b"\r\n\r\n")
        line_end = data.find(b"\r\n")
        head.plain = data[line_end + 2 : end + 2]


def _status_lines_ok(data: bytes, heads: int) -> bool:
    """Whether each of the first ``heads`` heads in ``data`` (1xx heads, then the final
    one, which llhttp has read whole) starts with ``HTTP/``, as h11 requires."""
    at = 0
    for _ in range(heads):
        if not data.startswith(_STATUS_LINE_START, at):
            return False
        end = _HEAD_END.search(data, at)
        if end is None:
            return True  # the last head: complete for llhttp, which read it
        at = end.end()
    return True


_HEAD_END: Final = re.compile(rb"\n\r?\n")
"""Where a head ends for h11: LF, an optional CR, LF."""

_SPENT_PARSER = httptools.HttpResponseParser(None)
"""Stands in for the parser of a reader whose connection switched protocols."""

_REWRITE = 1
_TYPED = 2
_EVENT_STREAM = 4
_SESSION_ID = 8
_UNBUFFERED = 16


def _llhttp_reason(exc: httptools.HttpParserError) -> str:
    """llhttp's own description of a parse error (plain text, no bytes echoed)."""
    text = str(exc).strip()
    return f"invalid response: {text}" if text and text.isprintable() else "invalid response"
