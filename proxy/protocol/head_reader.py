"""The request heads of one client connection: the fast parser (``proxy.protocol
.fast_head``) for ordinary heads, and h11, the reference, for the rest. Sans-IO."""

from __future__ import annotations

import h11

from proxy.protocol.fast_head import (
    NEED_MORE,
    FastHead,
    HeadCollector,
    NeedMore,
    Rejected,
    parse_head_with,
)
from proxy.protocol.http1 import (
    RequestRejected,
    check_request_line,
    inspect_request,
    protocol_error_status,
)
from proxy.protocol.mcp import McpHeaders


class HeadReader:
    """The request heads of one client connection, in order.

    Ordinary heads are parsed by ``parse_head_with``, which keeps nothing from one head
    to the next but its collector. Anything it leaves alone is parsed by h11, the
    reference, then checked by ``inspect_request``.

    ``read(data)`` takes everything received for the current head so far and answers
    FastHead (from either parser, ``consumed`` bytes long), NEED_MORE or Rejected. A
    request line is judged as soon as it is complete (``check_request_line``), so a line
    that can never start a valid head is refused at once instead of at the timeout.
    """

    __slots__ = ("_collector", "_h11", "_h11_fed", "_line_checked", "max_header_bytes")

    def __init__(self, max_header_bytes: int) -> None:
        self.max_header_bytes = max_header_bytes
        self._collector = HeadCollector()
        self._h11: h11.Connection | None = None
        """The reference parser, while the current head is an unusual one."""
        self._h11_fed = 0
        self._line_checked = False

    def read(self, data: bytes) -> FastHead | NeedMore | Rejected:
        if self._h11 is None:
            verdict = parse_head_with(data, self.max_header_bytes, self._collector)
            if type(verdict) is FastHead:
                self._line_checked = False
                return verdict
            if verdict is NEED_MORE:
                return self._early_line_check(data)
            if type(verdict) is Rejected:
                self._line_checked = False
                return verdict
            self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)
            self._h11_fed = 0
        return self._read_h11(data)

    def idle(self) -> None:
        """No head is due for long (a held stream): let go of what the last head left
        behind."""
        self._collector.reset()

    def _early_line_check(self, data: bytes) -> NeedMore | Rejected:
        if self._line_checked or not data or data[0] < 0x21:
            return NEED_MORE
        line_end = data.find(b"\n")
        if line_end < 0:
            return NEED_MORE
        self._line_checked = True
        line = data[:line_end]
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            check_request_line(line)
        except RequestRejected as exc:
            return Rejected(exc.status, exc.reason)
        return NEED_MORE

    def _read_h11(self, data: bytes) -> FastHead | NeedMore | Rejected:
        conn = self._h11
        assert conn is not None
        fresh = data[self._h11_fed :]
        if fresh:
            conn.receive_data(fresh)
            self._h11_fed = len(data)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return self._h11_done(Rejected(*protocol_error_status(exc)))
        if event is h11.NEED_DATA:
            return self._early_line_check(data)
        assert isinstance(event, h11.Request)
        consumed = len(data) - len(conn.trailing_data[0])
        if consumed > self.max_header_bytes:
            # h11's limit bounds only heads still incomplete: count what it took.
            return self._h11_done(Rejected(431, "request header section too large"))
        try:
            info = inspect_request(event)
        except RequestRejected as exc:
            return self._h11_done(Rejected(exc.status, exc.reason, exc.headers))
        headers = list(event.headers)
        head = FastHead(
            method=event.method,
            target=event.target,
            http_version=event.http_version,
            headers=headers,
            consumed=consumed,
            info=info,
            mcp_headers=McpHeaders.of(headers),
        )
        return self._h11_done(head)

    def _h11_done(self, verdict: FastHead | Rejected) -> FastHead | Rejected:
        self._h11 = None
        self._line_checked = False
        return verdict
