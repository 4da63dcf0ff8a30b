"""WebSocket frame boundaries (proxy.protocol.ws_frames), checked against wsproto's frames."""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, TextMessage
from wsproto.frame_protocol import FrameProtocol

from proxy.protocol.ws_frames import GOING_AWAY, FrameTracker, ProtocolError, close_frame

EDGE_LENGTHS = (0, 1, 125, 126, 127, 65535, 65536)
PATTERN = bytes(range(256))


def payload(length: int) -> bytes:
    # Header-like bytes (0x81, 0xFE, 0xFF...) inside payloads must be skipped, not read.
    return (PATTERN * (length // 256 + 1))[:length]


@dataclass(frozen=True)
class Stream:
    """Frames built by wsproto and where the tracker must report a boundary."""

    data: bytes
    ends: list[int]
    """Offset after each frame, and 0."""
    fragmented: list[bool]
    """in_fragmented_message at each offset in ``ends``."""
    close_seen: int | None = None
    """Offset where the close frame's header is complete, if one was sent."""


def build(
    messages: Sequence[Sequence[tuple[int, bool]]],
    *,
    client: bool,
    text: bool = False,
    close: bool = False,
) -> Stream:
    """Each message is fragments of (payload length, ping after this fragment)."""
    proto = FrameProtocol(client=client, extensions=[])
    frames: list[tuple[bytes, bool]] = []
    for fragments in messages:
        for i, (length, ping) in enumerate(fragments):
            last = i == len(fragments) - 1
            body: bytes | str = "é" * (length // 2) if text else payload(length)
            frames.append((bytes(proto.send_data(body, fin=last)), not last))
            if ping:
                frames.append((bytes(proto.ping(b"p" * (length % 126))), not last))
    close_seen = None
    if close:
        close_seen = sum(len(f) for f, _ in frames) + (6 if client else 2)
        frames.append((bytes(proto.close(GOING_AWAY, "bye")), False))
    ends, fragmented, offset = [0], [False], 0
    for frame, inside in frames:
        offset += len(frame)
        ends.append(offset)
        fragmented.append(inside)
    return Stream(b"".join(f for f, _ in frames), ends, fragmented, close_seen)


def check_feeds(stream: Stream, cuts: Sequence[int]) -> FrameTracker:
    """Feed ``stream`` cut at ``cuts``; after each feed compare with the frame ends."""
    tracker = FrameTracker()
    assert tracker.at_boundary
    previous = 0
    for cut in [*sorted({c for c in cuts if 0 <= c <= len(stream.data)}), len(stream.data)]:
        tracker.feed(stream.data[previous:cut])
        previous = cut
        at = bisect.bisect_left(stream.ends, cut)
        boundary = at < len(stream.ends) and stream.ends[at] == cut
        assert tracker.at_boundary == boundary, cut
        if boundary:
            assert tracker.in_fragmented_message == stream.fragmented[at], cut
        if stream.close_seen is not None:
            assert tracker.saw_close == (cut >= stream.close_seen), cut
    return tracker


SMALL = [[(0, False)], [(5, True), (0, True), (7, False)], [(125, False)], [(126, True)]]


@pytest.mark.parametrize("client", [True, False], ids=["masked", "unmasked"])
def test_every_prefix_of_small_frames(client: bool) -> None:
    stream = build(SMALL, client=client, close=True)
    check_feeds(stream, range(len(stream.data) + 1))  # one byte per feed
    for cut in range(len(stream.data) + 1):  # and every two-chunk split
        check_feeds(stream, [cut])


@pytest.mark.parametrize("client", [True, False], ids=["masked", "unmasked"])
def test_every_prefix_of_edge_lengths(client: bool) -> None:
    messages = [[(n, False)] for n in EDGE_LENGTHS] + [[(65535, True), (65536, False)]]
    stream = build(messages, client=client)
    check_feeds(stream, range(len(stream.data) + 1))
    near = {e + d for e in stream.ends for d in range(-15, 16)}
    for cut in sorted(c for c in near if 0 <= c <= len(stream.data)):
        check_feeds(stream, [cut])


@pytest.mark.parametrize("client", [True, False], ids=["masked", "unmasked"])
def test_one_mebibyte_frames(client: bool) -> None:
    mib = 1 << 20
    stream = build([[(mib, False)], [(mib, True), (mib, False)]], client=client, close=True)
    check_feeds(stream, range(0, len(stream.data), 65536))
    check_feeds(stream, [e + d for e in stream.ends for d in (-1, 1, 2, 3, 9, 13)])


@pytest.mark.parametrize("client", [True, False], ids=["masked", "unmasked"])
def test_text_messages(client: bool) -> None:
    stream = build([[(300, True), (2, False)], [(70000, False)]], client=client, text=True)
    check_feeds(stream, range(len(stream.data) + 1))


lengths = st.one_of(st.sampled_from(EDGE_LENGTHS), st.integers(0, 300))
fragment_lists = st.lists(st.tuples(lengths, st.booleans()), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(fragment_lists, max_size=5),
    client=st.booleans(),
    close=st.booleans(),
    data=st.data(),
)
def test_random_chunkings(
    messages: list[list[tuple[int, bool]]], client: bool, close: bool, data: st.DataObject
) -> None:
    stream = build(messages, client=client, close=close)
    size = len(stream.data)
    anywhere = st.integers(0, size)
    near_ends = st.builds(
        lambda e, d: min(max(e + d, 0), size), st.sampled_from(stream.ends), st.integers(-14, 14)
    )
    cuts = data.draw(st.lists(st.one_of(anywhere, near_ends), max_size=40))
    tracker = check_feeds(stream, cuts)
    assert tracker.at_boundary and not tracker.in_fragmented_message


def received(data: bytes, *, by_client: bool) -> list[Event]:
    connection = Connection(ConnectionType.CLIENT if by_client else ConnectionType.SERVER)
    connection.receive_data(data)
    return list(connection.events())


@pytest.mark.parametrize("client", [True, False], ids=["masked", "unmasked"])
def test_close_injected_at_any_boundary_is_read_as_close(client: bool) -> None:
    # Between fragments too (§5.4): wsproto reads the frames so far, then the close.
    stream = build(SMALL, client=client)
    tracker = FrameTracker()
    for cut in range(len(stream.data) + 1):
        if tracker.at_boundary:
            events = received(
                stream.data[:cut] + close_frame(GOING_AWAY, mask=client), by_client=not client
            )
            assert events[-1] == CloseConnection(code=GOING_AWAY, reason="")
            assert all(isinstance(e, (BytesMessage, TextMessage, Ping)) for e in events[:-1])
        tracker.feed(stream.data[cut : cut + 1])


@pytest.mark.parametrize("reason", ["", "draining", "é" * 61 + "x"])
def test_close_frame_is_read_by_the_right_side(reason: str) -> None:
    expected = CloseConnection(code=GOING_AWAY, reason=reason)
    from_server = close_frame(GOING_AWAY, reason, mask=False)
    assert received(from_server, by_client=True) == [expected]
    from_client = close_frame(GOING_AWAY, reason, mask=True)
    assert received(from_client, by_client=False) == [expected]
    # The wrong side fails the connection with 1002 (protocol error).
    assert received(from_server, by_client=False)[0].code == 1002  # type: ignore[attr-defined]
    assert received(from_client, by_client=True)[0].code == 1002  # type: ignore[attr-defined]


def test_close_frame_layout_and_key() -> None:
    assert close_frame(1000, mask=False) == b"\x88\x02\x03\xe8"
    key = b"\x01\x02\x03\x04"
    assert close_frame(1000, "a", mask=True, mask_key=key) == b"\x88\x83" + key + bytes(
        (0x03 ^ 1, 0xE8 ^ 2, ord("a") ^ 3)
    )
    for code in (1012, 1013, 3000, 4999):
        assert received(close_frame(code, mask=False), by_client=True) == [
            CloseConnection(code=code, reason="")
        ]


def test_close_frame_draws_a_fresh_key(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    def urandom(n: int) -> bytes:
        asked.append(n)
        return b"\xaa\xbb\xcc\xdd"

    monkeypatch.setattr(os, "urandom", urandom)
    assert close_frame(1001, mask=True)[2:6] == b"\xaa\xbb\xcc\xdd"
    assert asked == [4]


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000])
def test_close_frame_rejects_codes_that_may_not_be_sent(code: int) -> None:
    with pytest.raises(ValueError, match="close code"):
        close_frame(code, mask=False)


def test_close_frame_rejects_bad_reasons_and_keys() -> None:
    close_frame(1001, "x" * 123, mask=False)
    with pytest.raises(ValueError, match="reason"):
        close_frame(1001, "x" * 124, mask=False)
    with pytest.raises(ValueError, match="reason"):
        close_frame(1001, "é" * 62, mask=True)  # 124 bytes of UTF-8
    with pytest.raises(ValueError, match="4 bytes"):
        close_frame(1001, mask=True, mask_key=b"abc")
    with pytest.raises(ValueError, match="unmasked"):
        close_frame(1001, mask=False, mask_key=b"abcd")


def test_injected_close_is_seen_by_the_tracker() -> None:
    tracker = FrameTracker()
    stream = build(SMALL[1:2], client=True)
    tracker.feed(stream.data[: stream.ends[2]])  # the first fragment and its ping
    assert tracker.at_boundary and tracker.in_fragmented_message and not tracker.saw_close
    tracker.feed(close_frame(GOING_AWAY, mask=True))
    assert tracker.at_boundary and tracker.saw_close


def test_empty_feeds_change_nothing() -> None:
    frame = close_frame(GOING_AWAY, "x", mask=True)
    tracker = FrameTracker()
    for i in range(len(frame)):
        tracker.feed(b"")
        tracker.feed(frame[i : i + 1])
        tracker.feed(b"")
        assert tracker.at_boundary == (i == len(frame) - 1)
    assert tracker.saw_close


def test_rsv_bits_pass() -> None:
    # permessage-deflate sets RSV1; the proxy relays extensions it did not negotiate.
    tracker = FrameTracker()
    tracker.feed(b"\xc1\x03abc\xf2\x00")
    assert tracker.at_boundary


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        *[(bytes((0x80 | op, 0)), "reserved data opcode") for op in range(3, 8)],
        *[(bytes((0x80 | op, 0)), "reserved control opcode") for op in range(11, 16)],
        (b"\x89\x7e\x00\x7e", "over 125"),
        (b"\x88\x7f" + (126).to_bytes(8, "big"), "over 125"),
        (b"\x09\x00", "fragmented control"),
        (b"\x82\x7f\x80" + bytes(7), "most significant bit"),
        (b"\x80\x00", "continuation frame outside"),
        (b"\x01\x00\x82\x00", "inside a fragmented"),
        (b"\x01\x00\x80\x00\x80\x00", "continuation frame outside"),
    ],
)
def test_protocol_errors(frames: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        FrameTracker().feed(frames)
    tracker = FrameTracker()  # the same, one byte at a time
    with pytest.raises(ProtocolError, match=message):
        for i in range(len(frames)):
            tracker.feed(frames[i : i + 1])


def test_largest_64_bit_length_is_skipped_arithmetically() -> None:
    tracker = FrameTracker()
    tracker.feed(b"\x82\x7f" + (2**63 - 1).to_bytes(8, "big") + b"x" * 100)
    assert not tracker.at_boundary
