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
connection is not reused. Malformed bytes raise ``Malformed``; so does anything after
the end of the response, and a transfer coding other than ``chunked``.

``tests/protocol/test_fast_response.py`` holds the reader to h11's reading of the same
bytes.
"""

from __future__ import annotations

from typing import Final

import httptools

Headers = list[tuple[bytes, bytes]]
END: Final = None
_OWS: Final = b" \t"


class Malformed(Exception):
    """The backend's bytes are not a valid HTTP/1.1 response (or not one we relay)."""


class _HeadOnly(Exception):
    """Stops llhttp after the head of a response that has no body (HEAD)."""


class ResponseHead:
    __slots__ = (
        "chunked",
        "content_length",
        "headers",
        "http_version",
        "keep_alive",
        "reason",
        "status",
        "until_close",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        http_version: bytes,
        headers: Headers,
        content_length: int | None,
        chunked: bool,
        until_close: bool,
        keep_alive: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        self.http_version = http_version
        self.headers = headers
        """Lower-case names, values without surrounding whitespace (as h11 gives them)."""
        self.content_length = content_length
        self.chunked = chunked
        self.until_close = until_close
        """No length and not chunked: the body ends when the backend closes."""
        self.keep_alive = keep_alive
        """The backend connection may carry another request after this response."""


Event = ResponseHead | bytes | None


class ResponseReader:
    __slots__ = (
        "_chunked",
        "_events",
        "_head_only",
        "_headers",
        "_length",
        "_parser",
        "_reason",
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
        self.complete = False
        """The final (non-1xx) response has ended."""
        self.final = False
        """The final response's head was read."""
        self.keep_alive = False
        """The final response leaves the connection reusable."""
        self.upgraded = False
        """The backend switched protocols (101); ``trailing`` is the new protocol's."""
        self.trailing = b""

    def start(self, *, head_only: bool = False) -> None:
        """Expect the answer to a new request (``head_only``: to a HEAD request)."""
        self.complete = self.final = self.keep_alive = False
        self._head_only = head_only

    # -- llhttp callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # Bytes after the end of the response: never reuse this connection.
            raise Malformed("data after the end of the response")
        self._headers = []
        self._chunked = False
        self._length = None

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        value = value.strip(_OWS)
        if lowered == b"transfer-encoding":
            if value.lower() != b"chunked":
                raise Malformed("a transfer coding other than chunked")
            self._chunked = True
        elif lowered == b"content-length":
            self._length = int(value)  # llhttp has checked the digits and any repeat
        self._headers.append((lowered, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        final = status >= 200
        head_only = self._head_only and final
        chunked = self._chunked
        until_close = (
            final
            and not head_only
            and status not in (204, 304)
            and not chunked
            and self._length is None
        )
        head = ResponseHead(
            status,
            self._reason,
            b"1.1" if parser.get_http_version() == "1.1" else b"1.0",
            self._headers,
            self._length,
            chunked,
            until_close,
            bool(parser.should_keep_alive()),
        )
        self._reason = b""
        self._events.append(head)
        if final:
            self.final = True
            self._until_close = until_close
            self.keep_alive = head.keep_alive and not until_close and not head_only
        if head_only:
            self._events.append(END)
            self.complete = True
            raise _HeadOnly

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
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # llhttp stops after a 101's head; what follows is the new protocol's.
            self.upgraded = self.complete = True
            self.keep_alive = False
            self.trailing = data[exc.args[0] :]
        except httptools.HttpParserCallbackError as exc:
            # Our callbacks' own exceptions arrive wrapped; give them back as they were.
            cause = exc.__context__
            if isinstance(cause, _HeadOnly):
                return events  # the parser is spent; the connection is not reused
            if isinstance(cause, Malformed):
                raise cause from None
            raise Malformed("invalid response") from None
        except httptools.HttpParserError as exc:
            raise Malformed(_llhttp_reason(exc)) from None
        return events


def _llhttp_reason(exc: httptools.HttpParserError) -> str:
    """llhttp's own description of a parse error (plain text, no bytes echoed)."""
    text = str(exc).strip()
    return f"invalid response: {text}" if text and text.isprintable() else "invalid response"
