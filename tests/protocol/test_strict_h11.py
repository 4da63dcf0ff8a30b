"""h11 as Switchboard runs it: bytes in, events or a RemoteProtocolError (with status) out.

Imports ``proxy.protocol`` first so the obs-fold patch is installed, then drives a plain
``h11.Connection`` with raw bytes: no sockets, no event loop. Besides the patch, these
tests pin the h11 behaviour the proxy's framing rules rely on, so an h11 upgrade that
changes any of it fails here rather than in production.
"""

from __future__ import annotations

import h11
import pytest
from h11 import _readers

import proxy.protocol  # noqa: F401  (installs the strictness patch)
from proxy.protocol import strict_h11
from proxy.protocol.http1 import RequestRejected, inspect_request, protocol_error_status

Events = list[object]


def _server(max_incomplete_event_size: int | None = None) -> h11.Connection:
    if max_incomplete_event_size is None:
        return h11.Connection(h11.SERVER)
    return h11.Connection(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)


def parse(data: bytes, conn: h11.Connection | None = None) -> Events:
    """Feed ``data`` and collect events up to NEED_DATA or the end of the message."""
    conn = _server() if conn is None else conn
    conn.receive_data(data)
    events: Events = []
    while True:
        event = conn.next_event()
        events.append(event)
        if event is h11.NEED_DATA or event is h11.PAUSED or type(event) is h11.EndOfMessage:
            return events


def parse_error(data: bytes, conn: h11.Connection | None = None) -> h11.RemoteProtocolError:
    with pytest.raises(h11.RemoteProtocolError) as info:
        parse(data, conn)
    return info.value


def request_of(events: Events) -> h11.Request:
    request = events[0]
    assert isinstance(request, h11.Request), events
    return request


def body_of(events: Events) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data))


HEAD = b"POST /mcp HTTP/1.1\r\nHost: example.com\r\n"
CHUNKED_HEAD = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"


# -- the obs-fold patch ---------------------------------------------------------------


def test_patch_is_installed_on_import() -> None:
    assert _readers._obsolete_line_fold is strict_h11._reject_obsolete_line_fold


def test_install_is_idempotent() -> None:
    strict_h11.install()
    strict_h11.install()
    assert _readers._obsolete_line_fold is strict_h11._reject_obsolete_line_fold
    assert request_of(parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")).target == b"/"


def test_install_fails_loudly_when_the_hook_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(_readers, "_obsolete_line_fold")
    with pytest.raises(RuntimeError, match="_obsolete_line_fold"):
        strict_h11.install()


@pytest.mark.parametrize(
    "folded",
    [
        b"X-Long: first\r\n second\r\n",  # SP continuation
        b"X-Long: first\r\n\tsecond\r\n",  # HTAB continuation
        b"X-Long: first\r\n   \r\n",  # continuation of whitespace only
    ],
    ids=["space", "tab", "blank-continuation"],
)
def test_obs_fold_in_request_header_is_rejected_with_400(folded: bytes) -> None:
    exc = parse_error(b"GET / HTTP/1.1\r\nHost: a\r\n" + folded + b"\r\n")
    assert exc.error_status_hint == 400
    assert "obs-fold" in str(exc)
    assert protocol_error_status(exc)[0] == 400


def test_whitespace_before_the_first_header_is_rejected_with_400() -> None:
    exc = parse_error(b"GET / HTTP/1.1\r\n Host: a\r\n\r\n")
    assert exc.error_status_hint == 400


def test_obs_fold_cannot_smuggle_a_host_or_length_header() -> None:
    # Unfolded, this would read as one X-A header; a folding-unaware backend would see
    # a second Content-Length line. Either way the proxy must not forward it.
    exc = parse_error(HEAD + b"X-A: 1\r\n Content-Length: 5\r\n\r\nhello")
    assert exc.error_status_hint == 400


def test_obs_fold_in_chunked_trailer_is_rejected() -> None:
    conn = _server()
    exc = parse_error(CHUNKED_HEAD + b"5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n", conn)
    assert exc.error_status_hint == 400
    assert conn.their_state is h11.ERROR


def test_obs_fold_in_a_backend_response_is_rejected_too() -> None:
    # The patch is global, so the proxy's upstream (CLIENT) connections are strict as well.
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "b")]))
    client.send(h11.EndOfMessage())
    client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-A: 1\r\n 2\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError, match="obs-fold"):
        client.next_event()


def test_valid_requests_still_parse() -> None:
    events = parse(
        HEAD + b"Content-Type: application/json\r\n"
        b"X-Empty:\r\n"
        b"X-Spaced:   inner  spaces kept   \r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    request = request_of(events)
    assert request.method == b"POST"
    assert request.target == b"/mcp"
    assert list(request.headers) == [
        (b"host", b"example.com"),
        (b"content-type", b"application/json"),
        (b"x-empty", b""),
        (b"x-spaced", b"inner  spaces kept"),
        (b"content-length", b"2"),
    ]
    assert body_of(events) == b"{}"
    assert type(events[-1]) is h11.EndOfMessage


def test_valid_chunked_request_with_trailer_still_parses() -> None:
    events = parse(CHUNKED_HEAD + b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: done\r\n\r\n")
    assert body_of(events) == b"hello world"
    end = events[-1]
    assert isinstance(end, h11.EndOfMessage)
    assert list(end.headers) == [(b"x-t", b"done")]


# -- Content-Length / Transfer-Encoding ------------------------------------------------


def test_content_length_and_transfer_encoding_pass_h11_but_not_inspect_request() -> None:
    events = parse(HEAD + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
    request = request_of(events)  # h11 itself accepts the head (and frames it as chunked)
    names = [name for name, _ in request.headers]
    assert b"content-length" in names
    assert b"transfer-encoding" in names
    with pytest.raises(RequestRejected) as info:
        inspect_request(request)
    assert info.value.status == 400


def test_transfer_encoding_before_content_length_is_rejected_too() -> None:
    request = request_of(parse(HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"))
    with pytest.raises(RequestRejected) as info:
        inspect_request(request)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "lengths",
    [
        b"Content-Length: 3\r\nContent-Length: 4\r\n",
        b"Content-Length: 3, 4\r\n",
        b"Content-Length: 3\r\nContent-Length: 3, 4\r\n",
    ],
    ids=["two-lines", "one-list", "mixed"],
)
def test_conflicting_content_lengths_are_rejected_with_400(lengths: bytes) -> None:
    exc = parse_error(HEAD + lengths + b"\r\nabcd")
    assert exc.error_status_hint == 400
    assert "Content-Length" in str(exc)


@pytest.mark.parametrize(
    "lengths",
    [b"Content-Length: 3\r\nContent-Length: 3\r\n", b"Content-Length: 3, 3\r\n"],
    ids=["two-lines", "one-list"],
)
def test_repeated_equal_content_length_is_accepted_as_one(lengths: bytes) -> None:
    events = parse(HEAD + lengths + b"\r\nabc")
    request = request_of(events)
    assert [v for n, v in request.headers if n == b"content-length"] == [b"3"]
    assert inspect_request(request).content_length == 3
    assert body_of(events) == b"abc"


@pytest.mark.parametrize("value", [b"-3", b"+3", b"3x", b"0x3", b"1" * 40])
def test_malformed_content_length_is_rejected_with_400(value: bytes) -> None:
    exc = parse_error(HEAD + b"Content-Length: " + value + b"\r\n\r\nabc")
    assert exc.error_status_hint == 400


@pytest.mark.parametrize(
    "coding",
    [b"gzip", b"gzip, chunked", b"chunked, gzip", b"identity", b"x-custom"],
)
def test_transfer_coding_other_than_chunked_is_rejected_with_501(coding: bytes) -> None:
    exc = parse_error(HEAD + b"Transfer-Encoding: " + coding + b"\r\n\r\n")
    assert exc.error_status_hint == 501
    assert protocol_error_status(exc)[0] == 501


def test_repeated_transfer_encoding_is_rejected_with_501() -> None:
    twice = b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert parse_error(HEAD + twice).error_status_hint == 501


def test_transfer_encoding_is_case_insensitive() -> None:
    events = parse(HEAD + b"Transfer-Encoding: ChUnKeD\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert inspect_request(request_of(events)).chunked
    assert body_of(events) == b"hello"


# -- chunk framing ------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunk_line",
    [
        b"zz\r\n",  # not hex
        b"-5\r\n",  # negative
        b"0x5\r\n",  # C-style hex prefix
        b"+5\r\n",
        b" 5\r\n",  # leading whitespace
        b"0" * 20 + b"5\r\n",  # 21 hex digits: overlong
        b"\r\n",  # empty size
        b"5 garbage\r\n",  # junk after the size without ';'
        b"5\nhello\r\n",  # bare LF ends no chunk-size line
    ],
    ids=["zz", "negative", "0x", "plus", "leading-ws", "overlong", "empty", "junk", "bare-lf"],
)
def test_invalid_chunk_size_line_is_rejected_with_400(chunk_line: bytes) -> None:
    conn = _server()
    # The head parses fine; the error comes when the body is read.
    request = request_of(parse(CHUNKED_HEAD, conn))
    assert inspect_request(request).chunked
    exc = parse_error(chunk_line + b"hello\r\n0\r\n\r\n", conn)
    assert exc.error_status_hint == 400
    assert conn.their_state is h11.ERROR


def test_chunk_data_longer_than_declared_is_rejected_with_400() -> None:
    conn = _server()
    parse(CHUNKED_HEAD, conn)
    exc = parse_error(b"5\r\nhelloXX\r\n0\r\n\r\n", conn)
    assert exc.error_status_hint == 400
    assert "chunk" in str(exc)


def test_twenty_hex_digit_chunk_size_is_the_longest_accepted() -> None:
    events = parse(CHUNKED_HEAD + b"0" * 19 + b"5\r\nhello\r\n0\r\n\r\n")
    assert body_of(events) == b"hello"


def test_trailing_whitespace_after_chunk_size_is_tolerated() -> None:
    # An h11 leniency (RFC 9112 only allows BWS before ';'); harmless because the proxy
    # re-frames the body itself, so the backend never sees this line.
    events = parse(CHUNKED_HEAD + b"5 \r\nhello\r\n0\r\n\r\n")
    assert body_of(events) == b"hello"


# -- line endings -------------------------------------------------------------------


def test_bare_lf_line_endings_in_the_head_are_accepted() -> None:
    # RFC 9112 §2.2 lets a recipient accept a lone LF as line terminator; h11 does. The
    # proxy re-serialises the head with CRLF, so the backend never sees bare LFs.
    request = request_of(parse(b"GET /mcp HTTP/1.1\nHost: a\nX-B: 2\n\n"))
    assert request.target == b"/mcp"
    assert list(request.headers) == [(b"host", b"a"), (b"x-b", b"2")]


def test_mixed_crlf_and_bare_lf_in_the_head_are_accepted() -> None:
    request = request_of(parse(b"GET / HTTP/1.1\r\nHost: a\nX-B: 2\r\n\n"))
    assert list(request.headers) == [(b"host", b"a"), (b"x-b", b"2")]


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: a\rX-B: 2\r\n\r\n",  # bare CR between header lines
        b"GET / HTTP/1.1\rHost: a\r\n\r\n",  # bare CR ending the request line
        b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",  # bare CR inside a value
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\r\n\r\n",  # bare CR line inside the head
    ],
    ids=["between-headers", "request-line", "in-value", "cr-only-line"],
)
def test_bare_cr_in_the_head_is_rejected_with_400(head: bytes) -> None:
    assert parse_error(head).error_status_hint == 400


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",  # NUL in a value
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",  # whitespace before the colon
        b"GET /\r\n\r\n",  # HTTP/0.9-style request line
        b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",  # double space in the request line
        b"GET / HTTP/1.1\r\nBad Name: a\r\n\r\n",  # space in a field name
    ],
    ids=["nul", "ws-before-colon", "http09", "double-space", "space-in-name"],
)
def test_malformed_heads_are_rejected_with_400(head: bytes) -> None:
    assert parse_error(head).error_status_hint == 400


def test_leading_empty_line_before_the_request_line_is_rejected() -> None:
    # RFC 9112 §2.2 says SHOULD ignore it; h11 does not. Pinned so a change is noticed.
    assert parse_error(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n").error_status_hint == 400


# -- header section size ------------------------------------------------------------


def test_incomplete_head_beyond_max_incomplete_event_size_maps_to_431() -> None:
    conn = _server(max_incomplete_event_size=1024)
    exc = parse_error(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 2000, conn)
    assert exc.error_status_hint == 431
    status, reason = protocol_error_status(exc)
    assert status == 431
    assert "too large" in reason


def test_head_fed_in_small_pieces_hits_431_once_past_the_limit() -> None:
    conn = _server(max_incomplete_event_size=1024)
    start = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: "
    conn.receive_data(start)
    assert conn.next_event() is h11.NEED_DATA
    buffered = len(start)
    while buffered + 100 <= 1024:
        conn.receive_data(b"a" * 100)
        buffered += 100
        assert conn.next_event() is h11.NEED_DATA  # still within the limit
    conn.receive_data(b"a" * 100)  # now past it
    with pytest.raises(h11.RemoteProtocolError) as info:
        conn.next_event()
    assert protocol_error_status(info.value)[0] == 431


def test_head_just_under_max_incomplete_event_size_is_accepted() -> None:
    conn = _server(max_incomplete_event_size=1024)
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: "
    filler = b"a" * (1024 - len(head) - 4)
    request = request_of(parse(head + filler + b"\r\n\r\n", conn))
    assert (b"x-big", filler) in list(request.headers)


def test_complete_head_larger_than_the_limit_in_one_piece_is_not_limited_by_h11() -> None:
    # h11's max_incomplete_event_size bounds only an *incomplete* event in the buffer:
    # a complete head that arrives in one receive_data() call is parsed whatever its
    # size. Pinned because it means the caller must enforce limits.max_header_bytes
    # itself for heads that arrive whole (see the report on proxy/net/http_conn.py).
    conn = _server(max_incomplete_event_size=1024)
    request = request_of(
        parse(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n", conn)
    )
    assert len(dict(request.headers)[b"x-big"]) == 4000
