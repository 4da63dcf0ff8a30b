"""A backend's response read with llhttp (httptools), for the express lane. Sans-IO.

``ResponseReader.feed(data)`` returns what the bytes completed, in order: at most one
``ResponseHead`` per message, ``bytes`` of body already framed for the client, and
``END`` when the message is over. The body keeps the backend's framing: a
``Content-Length`` body passes as it came; a chunked one is decoded by llhttp and
re-chunked here (trailers are dropped, as h11 drops them); a body delimited by the
connection closing is passed as it came and the client connection closes after it
(``ResponseHead.until_close``).

Informational (1xx) heads come before the final one: each is a ``ResponseHead`` followed
by ``END``, and the reader goes on to the next message. Anything the express lane does
not handle raises ``Unsupported`` before a byte of that response was produced (an
upgrade); malformed bytes raise ``Malformed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import httptools

Headers = list[tuple[bytes, bytes]]
END: Final = None
_OWS: Final = b" \t"


class Malformed(Exception):
    """The backend's bytes are not a valid HTTP/1.1 response."""


class Unsupported(Exception):
    """A valid response the express lane leaves alone (the connection must close)."""


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    http_version: bytes
    headers: Headers
    """Lower-case names, values without surrounding whitespace (as h11 gives them)."""
    chunked: bool
    until_close: bool
    """No length and not chunked: the body ends when the backend closes."""
    keep_alive: bool
    """The backend connection may carry another request after this response."""


Event = ResponseHead | bytes | None


class ResponseReader:
    __slots__ = (
        "_chunked",
        "_events",
        "_headers",
        "_parser",
        "_reason",
        "_until_close",
        "complete",
        "final",
        "keep_alive",
        "messages",
    )

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._events: list[Event] = []
        self._headers: Headers = []
        self._reason = b""
        self._chunked = False
        self._until_close = False
        self.complete = False
        """The final (non-1xx) response has ended."""
        self.final = False
        """The final response's head was read."""
        self.keep_alive = False
        """The final response leaves the connection reusable."""
        self.messages = 0

    # -- llhttp callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.messages += 1
        if self.complete:
            # Bytes after the end of the response: never reuse this connection.
            raise Malformed("data after the end of the response")
        self._headers = []
        self._chunked = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        value = value.strip(_OWS)
        if lowered == b"transfer-encoding":
            if value.lower() != b"chunked":
                raise Unsupported(f"transfer-encoding {value!r}")
            self._chunked = True
        self._headers.append((lowered, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status == 101:
            raise Unsupported("switching protocols")
        version = parser.get_http_version().encode("ascii")
        has_length = any(name == b"content-length" for name, _ in self._headers)
        head = ResponseHead(
            status=status,
            reason=self._reason,
            http_version=version,
            headers=self._headers,
            chunked=self._chunked,
            until_close=status >= 200
            and status not in (204, 304)
            and not self._chunked
            and not has_length,
            keep_alive=bool(parser.should_keep_alive()),
        )
        self._reason = b""
        if status >= 200:
            self.final = True
            self._until_close = head.until_close
            self.keep_alive = head.keep_alive and not head.until_close
        self._events.append(head)

    def on_body(self, body: bytes) -> None:
        if self._chunked:
            self._events.append(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            self._events.append(body)

    def on_message_complete(self) -> None:
        if self._chunked:
            self._events.append(b"0\r\n\r\n")
        self._events.append(END)
        if self.final:
            self.complete = True

    # -- feeding ------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        """The events ``data`` completed. ``b""`` means the backend closed."""
        self._events = []
        if not data:
            # EOF ends a close-delimited body; anywhere else it is a truncation.
            if self.complete:
                return []
            if self.final and self._until_close:
                self.complete = True
                return [END]
            raise Malformed("the backend closed the connection mid-response")
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise Unsupported("upgrade") from None
        except httptools.HttpParserCallbackError as exc:
            # Our callbacks' own exceptions arrive wrapped; give them back as they were.
            cause = exc.__context__
            if isinstance(cause, Malformed | Unsupported):
                raise cause from None
            raise Malformed(str(exc)) from None
        except httptools.HttpParserError as exc:
            raise Malformed(str(exc)) from None
        return self._events
