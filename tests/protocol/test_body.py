"""Reading one request body (``proxy.protocol.body``): Content-Length counted, chunked
decoded strictly, what follows the body handed back, and the body framed again for the
backend the way its head declared it."""

from __future__ import annotations

import pytest

from proxy.protocol.body import BodyReader, BodyRejected
from proxy.protocol.chunked import LAST_CHUNK


def read(reader: BodyReader, data: bytes, *, byte_at_a_time: bool) -> tuple[bytes, bytes]:
    """(body bytes, what followed the body) for ``data`` fed whole or byte by byte."""
    pieces = [data[i : i + 1] for i in range(len(data))] if byte_at_a_time else [data]
    body = b""
    rest = b""
    for piece in pieces:
        if reader.done:
            rest += piece
            continue
        taken, after = reader.feed(piece)
        body += b"".join(taken)
        rest += after
    return body, rest


def test_a_content_length_body_is_counted_and_what_follows_handed_back(bytewise: bool) -> None:
    reader = BodyReader(5, False, 0)
    assert (reader.done, reader.chunked) == (False, False)
    body, rest = read(reader, b"helloGET / HTTP/1.1\r\n", byte_at_a_time=bytewise)
    assert (body, rest) == (b"hello", b"GET / HTTP/1.1\r\n")
    assert (reader.done, reader.received) == (True, 5)


def test_a_content_length_body_may_arrive_in_pieces() -> None:
    reader = BodyReader(10, False, 0)
    assert reader.feed(b"abc") == ([b"abc"], b"")
    assert (reader.done, reader.received) == (False, 3)
    assert reader.feed(b"defghijXY") == ([b"defghij"], b"XY")
    assert (reader.done, reader.received) == (True, 10)


def test_an_empty_body_is_done_at_once() -> None:
    assert BodyReader(0, False, 0).done
    assert BodyReader(None, False, 0).done
    assert not BodyReader(None, True, 0).done


def test_a_chunked_body_is_decoded_and_what_follows_handed_back(bytewise: bool) -> None:
    reader = BodyReader(None, True, 0)
    data = b"5;x=y\r\nhello\r\n0\r\nX-T: 1\r\n\r\nNEXT"
    assert read(reader, data, byte_at_a_time=bytewise) == (b"hello", b"NEXT")
    assert (reader.done, reader.received) == (True, 5)


def test_malformed_chunked_framing_is_rejected_with_400() -> None:
    for data in (b"10000000000000000\r\n", b"5\nhello", b"5\r\nhello!\r\n"):
        with pytest.raises(BodyRejected) as caught:
            BodyReader(None, True, 0).feed(data)
        assert caught.value.status == 400
        assert caught.value.reason.startswith("malformed chunked body: ")


def test_a_body_over_max_bytes_is_rejected_with_413(bytewise: bool) -> None:
    for reader, data in (
        (BodyReader(None, True, 8), b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n"),
        (BodyReader(12, False, 8), b"hello world!"),
    ):
        with pytest.raises(BodyRejected) as caught:
            read(reader, data, byte_at_a_time=bytewise)
        assert (caught.value.status, caught.value.reason) == (
            413,
            "request body larger than max_body_bytes",
        )


def test_max_bytes_counts_decoded_bytes_and_zero_means_no_limit() -> None:
    # Framing does not count: 5 bytes of data in 15 bytes of chunked framing fit in 5.
    assert read(BodyReader(None, True, 5), b"5\r\nhello\r\n0\r\n\r\n", byte_at_a_time=False) == (
        b"hello",
        b"",
    )
    big = b"x" * 100_000
    assert read(BodyReader(len(big), False, 0), big, byte_at_a_time=False) == (big, b"")


def test_a_content_length_body_goes_up_as_it_came() -> None:
    reader = BodyReader(10, False, 0)
    assert reader.upstream([b"abc", b"def"], ending=False) == b"abcdef"
    assert reader.upstream([b"ghij"], ending=True) == b"ghij"


def test_a_chunked_body_goes_up_rechunked_without_extensions_or_trailers() -> None:
    reader = BodyReader(None, True, 0)
    pieces, _ = reader.feed(b"5;ext=1\r\nhello\r\n")
    assert reader.upstream(pieces, ending=False) == b"5\r\nhello\r\n"
    pieces, _ = reader.feed(b"1\r\n!\r\n0\r\nX-T: 1\r\n\r\n")
    assert reader.upstream(pieces, ending=True) == b"1\r\n!\r\n" + LAST_CHUNK
    # Empty pieces would read as the last chunk: they are left out.
    assert reader.upstream([b"", b"ab", b""], ending=False) == b"2\r\nab\r\n"
    assert reader.upstream([], ending=True) == LAST_CHUNK
