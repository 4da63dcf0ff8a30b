"""The strict chunked decoder (``proxy.protocol.chunked``): RFC 9112 §7.1, lines ended by
CRLF only, sizes below 2^64, extensions and trailers checked then dropped, and nothing
past the body's end taken."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocol.chunked import (
    LAST_CHUNK,
    MAX_LINE,
    ChunkedDecoder,
    ChunkedError,
    encode_chunk,
    encode_chunks,
)


def ended(decoder: ChunkedDecoder) -> bool:
    # A call, so that a type checker does not take ``done`` as fixed across ``feed``.
    return decoder.done


def decode(data: bytes, *, byte_at_a_time: bool = False) -> tuple[bytes, bool, bytes]:
    """(body, done, what follows the body) for ``data`` fed whole or byte by byte."""
    decoder = ChunkedDecoder()
    pieces = [data[i : i + 1] for i in range(len(data))] if byte_at_a_time else [data]
    body = b""
    rest = b""
    for piece in pieces:
        if ended(decoder):
            rest += piece
            continue
        body += b"".join(decoder.feed(piece))
        if ended(decoder):
            rest += piece[decoder.consumed :]
    return body, decoder.done, rest


def refused(data: bytes, *, byte_at_a_time: bool = False) -> str:
    with pytest.raises(ChunkedError) as caught:
        decode(data, byte_at_a_time=byte_at_a_time)
    return str(caught.value)


def test_chunks_are_decoded_and_the_body_ends_at_the_last_chunk(bytewise: bool) -> None:
    data = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    assert decode(data, byte_at_a_time=bytewise) == (b"hello world", True, b"")


def test_an_unfinished_body_is_not_done(bytewise: bool) -> None:
    assert decode(b"5\r\nhello\r\n", byte_at_a_time=bytewise) == (b"hello", False, b"")
    assert decode(b"5\r\nhel", byte_at_a_time=bytewise) == (b"hel", False, b"")
    assert decode(b"0\r\nX-T: 1\r\n", byte_at_a_time=bytewise) == (b"", False, b"")


def test_what_follows_the_body_is_left_to_the_caller(bytewise: bool) -> None:
    after = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    data = b"3\r\nabc\r\n0\r\n\r\n" + after
    assert decode(data, byte_at_a_time=bytewise) == (b"abc", True, after)
    decoder = ChunkedDecoder()
    decoder.feed(data)
    assert data[decoder.consumed :] == after
    # Once done, nothing more is taken.
    assert decoder.feed(b"more") == [] and decoder.consumed == 0


def test_extensions_are_checked_and_dropped(bytewise: bool) -> None:
    data = b'5;name=value;flag ; q="a b"\r\nhello\r\n0;last=1\r\n\r\n'
    assert decode(data, byte_at_a_time=bytewise) == (b"hello", True, b"")


def test_trailer_fields_are_checked_and_dropped(bytewise: bool) -> None:
    data = b"3\r\nabc\r\n0\r\nX-Checksum: 1234\r\nX-Other:\tvalue\r\n\r\nNEXT"
    assert decode(data, byte_at_a_time=bytewise) == (b"abc", True, b"NEXT")


def test_sizes_are_hex_in_either_case() -> None:
    data = b"A\r\n" + b"x" * 10 + b"\r\nb\r\n" + b"y" * 11 + b"\r\n0\r\n\r\n"
    assert decode(data) == (b"x" * 10 + b"y" * 11, True, b"")


def test_sixteen_hex_digits_are_the_largest_size() -> None:
    # 2^64 - 1 is a size (its data would never all come), 2^64 is refused at once.
    decoder = ChunkedDecoder()
    assert decoder.feed(b"ffffffffffffffff\r\nabc") == [b"abc"]
    assert not decoder.done
    for size in (b"10000000000000000", b"fffffffffffffffff", b"1" * 20):
        assert refused(size + b"\r\nx\r\n0\r\n\r\n") == "chunk size too large"


def test_a_size_of_2_to_the_64_is_refused_as_soon_as_its_line_ends() -> None:
    decoder = ChunkedDecoder()
    for byte in b"10000000000000000\r":
        decoder.feed(bytes([byte]))
    with pytest.raises(ChunkedError):
        decoder.feed(b"\n")


@pytest.mark.parametrize(
    "data",
    [
        b"5\nhello\r\n0\r\n\r\n",  # size line
        b"5\r\nhello\n0\r\n\r\n",  # after the data
        b"5\r\nhello\r\n0\n\r\n",  # last chunk
        b"5\r\nhello\r\n0\r\nX-T: 1\n\r\n",  # trailer line
        b"5\r\nhello\r\n0\r\n\n",  # end of the trailer section
    ],
)
def test_a_bare_lf_is_refused(data: bytes, bytewise: bool) -> None:
    assert refused(data, byte_at_a_time=bytewise) == "chunk framing line not ended by CRLF"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\r\nhello\r\n0\r\n\r\n", "missing chunk size"),
        (b";ext\r\nhello\r\n0\r\n\r\n", "missing chunk size"),
        (b"-5\r\nhello\r\n0\r\n\r\n", "missing chunk size"),
        (b"0x5\r\nhello\r\n0\r\n\r\n", "malformed chunk extension"),
        (b"5 junk\r\nhello\r\n0\r\n\r\n", "malformed chunk extension"),
        (b"5;a=\x00\r\nhello\r\n0\r\n\r\n", "malformed chunk extension"),
        (b"5\rhello\r\n0\r\n\r\n", "malformed chunk extension"),
        (b"3\r\nhello\r\n0\r\n\r\n", "chunk data longer than its size"),
        (b"0\r\nno colon\r\n\r\n", "malformed trailer field"),
        (b"0\r\n: empty name\r\n\r\n", "malformed trailer field"),
        (b"0\r\nBad Name: v\r\n\r\n", "malformed trailer field"),
        (b"0\r\nX-T: a\x01b\r\n\r\n", "malformed trailer field"),
    ],
)
def test_malformed_framing_is_refused(data: bytes, reason: str, bytewise: bool) -> None:
    assert refused(data, byte_at_a_time=bytewise) == reason


def test_a_line_longer_than_max_line_is_refused_before_it_ends(bytewise: bool) -> None:
    long_extension = b"5;" + b"e" * MAX_LINE
    assert refused(long_extension, byte_at_a_time=bytewise) == "chunk line too long"
    assert refused(long_extension + b"\r\n") == "chunk line too long"


def test_a_trailer_section_over_its_limit_is_refused() -> None:
    decoder = ChunkedDecoder(max_trailer_bytes=32)
    decoder.feed(b"0\r\nX-A: 0123456789\r\n")
    with pytest.raises(ChunkedError, match="trailer section too large"):
        decoder.feed(b"X-B: 0123456789\r\n")


def test_encode_chunks_frames_each_piece_and_leaves_out_empty_ones() -> None:
    assert encode_chunks([b"ab"]) == b"2\r\nab\r\n"
    assert encode_chunks([b""]) == b""
    assert encode_chunks([]) == b""
    assert encode_chunks([b"ab", b"", b"c"]) == b"2\r\nab\r\n1\r\nc\r\n"
    assert encode_chunks([b"ab"], last=True) == b"2\r\nab\r\n" + LAST_CHUNK
    assert encode_chunks([b""], last=True) == LAST_CHUNK
    assert encode_chunks([], last=True) == LAST_CHUNK
    assert decode(encode_chunks([b"x" * 300, b"yz"], last=True)) == (b"x" * 300 + b"yz", True, b"")


def test_encode_chunk_frames_one_chunk() -> None:
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert encode_chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert decode(encode_chunk(b"abc") + LAST_CHUNK) == (b"abc", True, b"")


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes, list[int]]:
    """A body, its chunked framing (some extensions and trailers), and cut points."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=6))
    extension = draw(st.sampled_from([b"", b";a=b", b" ;x", b';q="v w"']))
    trailer = draw(st.sampled_from([b"", b"X-T: 1\r\n", b"A: b\r\nC:\td\r\n"]))
    framed = b"".join(b"%x%s\r\n%s\r\n" % (len(chunk), extension, chunk) for chunk in chunks)
    framed += b"0%s\r\n%s\r\n" % (extension, trailer)
    cuts = draw(st.lists(st.integers(0, len(framed)), max_size=8))
    return b"".join(chunks), framed, sorted(cuts)


@given(chunked_bodies(), st.binary(max_size=20))
def test_any_cut_of_valid_framing_gives_the_body_and_leaves_what_follows(
    case: tuple[bytes, bytes, list[int]], after: bytes
) -> None:
    body, framed, cuts = case
    data = framed + after
    decoder = ChunkedDecoder()
    decoded = b""
    rest = b""
    start = 0
    for end in [*cuts, len(data)]:
        piece = data[start:end]
        start = end
        if ended(decoder):
            rest += piece
            continue
        decoded += b"".join(decoder.feed(piece))
        if ended(decoder):
            rest += piece[decoder.consumed :]
    assert (decoded, decoder.done, rest) == (body, True, after)
