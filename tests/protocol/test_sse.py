"""SSE event boundaries (proxy.protocol.sse), checked against a slow spec-following reader."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocol.sse import KEEPALIVE_COMMENT, EventStreamTracker, retry_hint

BOM = b"\xef\xbb\xbf"
# WHATWG HTML §9.2.5: end-of-line = ( cr lf / cr / lf ). The alternation tries CRLF first.
EOL = re.compile(rb"\r\n|\r|\n")


def reference_at_boundary(prefix: bytes) -> bool:
    """Slow reference: split the whole prefix into lines; a final lone CR ends a line."""
    if BOM.startswith(prefix) and prefix:
        return prefix == BOM
    if prefix.startswith(BOM):
        prefix = prefix[len(BOM) :]
    lines = EOL.split(prefix)
    # The stream's start acts as the end of a blank line.
    return lines == [b""] or (lines[-1] == b"" and lines[-2] == b"")


@dataclass
class Reading:
    """What a spec-following client takes from a whole stream (§9.2.6)."""

    events: list[tuple[str, str, str]] = field(default_factory=list)
    retry: int | None = None


def read(stream: bytes) -> Reading:
    text = stream.decode("utf-8", "replace").removeprefix("\ufeff")
    reading = Reading()
    data, kind, last_id = "", "", ""
    *lines, _pending = re.split("\r\n|\r|\n", text)  # a last unended line is dropped
    for line in lines:
        if not line:  # dispatch
            if data:
                reading.events.append((kind or "message", data.removesuffix("\n"), last_id))
            data, kind = "", ""
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data += value + "\n"
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            reading.retry = int(value)
    return reading


def check_feeds(stream: bytes, cuts: Sequence[int]) -> EventStreamTracker:
    tracker = EventStreamTracker()
    assert tracker.at_boundary
    previous = 0
    for cut in [*sorted({c for c in cuts if 0 <= c <= len(stream)}), len(stream)]:
        tracker.feed(stream[previous:cut])
        previous = cut
        assert tracker.at_boundary == reference_at_boundary(stream[:cut]), (cut, stream[:cut])
    return tracker


SAMPLES = [
    b"data: one\n\ndata: two\n\n",
    b"data: one\r\n\r\ndata: two\r\n\r\n",
    b"data: one\r\rdata: two\r\r",
    b"event: add\ndata: 1\r\ndata: 2\rid: 7\n\r\n: comment\n\nretry: 10\n\n",
    b": only a comment\r\n\r\n\n\n\r\rdata\n\ndata:\n\n",
    b"\r\n\r\r\n\n\r\r\n\r",
    BOM + b"data: \xc3\xa9t\xc3\xa9 \xf0\x9f\x8e\x89\r\n\r\n",
    b"data: x\r\n\r\ndata: y\n\r\n\r",
    b"id: 1\ndata: half an event",
]


@pytest.mark.parametrize("stream", SAMPLES)
def test_every_prefix_and_every_split(stream: bytes) -> None:
    check_feeds(stream, range(len(stream) + 1))  # one byte per feed
    for cut in range(len(stream) + 1):
        check_feeds(stream, [cut])
    for first in range(len(stream) + 1):  # every three-chunk split
        for second in range(first, len(stream) + 1):
            check_feeds(stream, [first, second])


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([], True),
        ([b""], True),
        ([b"data: x\n"], False),
        ([b"data: x\n", b"\n"], True),
        ([b"data: x\r\n", b"\r"], True),  # a lone CR ends the blank line for now...
        ([b"data: x\r\n", b"\r", b"\n"], True),  # ...and the LF completing it changes nothing
        ([b"data: x\r\n\r\n", b"\n"], True),  # a further blank line dispatches nothing
        ([b"data: x\r"], False),
        ([b"data: x\r", b"\n"], False),  # CR then LF is one line ending, not two
        ([b"data: x\r", b"\r"], True),
        ([b"\n"], True),
        ([b"\r"], True),
        ([b"\r", b"\n"], True),
        ([b"\xef"], False),  # part of a byte order mark
        ([b"\xef", b"\xbb"], False),
        ([b"\xef", b"", b"\xbb", b""], False),
        ([b"\xef", b"\xbb", b"\xbf"], True),  # the whole BOM: still the stream's start
        ([b"\xef\xbb", b"\xbfdata: x\n\n"], True),
        ([b"\xef\xbb", b"x\n\n"], True),  # not a BOM after all: plain bytes
        ([b"data: x\n\n\xef\xbb\xbf"], False),  # a BOM mid-stream is text
        ([b"data: x\n\n", KEEPALIVE_COMMENT], True),
    ],
)
def test_hand_picked(chunks: list[bytes], expected: bool) -> None:
    tracker = EventStreamTracker()
    for chunk in chunks:
        tracker.feed(chunk)
    assert tracker.at_boundary is expected
    assert reference_at_boundary(b"".join(chunks)) is expected


line_bodies = st.one_of(
    st.sampled_from(["data: x", "data", "data:", "event: tick", "id: 3", ": note", "retry: 5"]),
    st.text(st.characters(exclude_characters="\r\n", codec="utf-8"), max_size=12).map(
        lambda s: "data: " + s
    ),
    st.just(""),
)
line_endings = st.sampled_from(["\n", "\r\n", "\r"])
lines = st.tuples(line_bodies, line_endings).map(lambda pair: pair[0] + pair[1])
streams = st.builds(
    lambda bom, body, tail: (b"\xef\xbb\xbf" if bom else b"") + ("".join(body) + tail).encode(),
    st.booleans(),
    st.lists(lines, max_size=20),
    st.sampled_from(["", "data: cut sho", "data: x\r"]),
)


@settings(max_examples=300, deadline=None)
@given(stream=streams, data=st.data())
def test_random_streams_and_chunkings(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    check_feeds(stream, cuts)


def check_injections(stream: bytes) -> None:
    """The property the proxy relies on: a keep-alive where the tracker says "boundary"
    leaves every event intact, and a retry hint there ends the stream cleanly."""
    expected = read(stream)
    tracker = EventStreamTracker()
    for cut in range(len(stream) + 1):
        if cut == 0 and stream.startswith(BOM):
            pass  # the one hazard left to the caller: see the test below
        elif tracker.at_boundary:
            with_keepalive = read(stream[:cut] + KEEPALIVE_COMMENT + stream[cut:])
            assert with_keepalive == expected, cut
            drained = read(stream[:cut] + retry_hint(2500))
            assert drained.events == read(stream[:cut]).events
            assert drained.retry == 2500
        tracker.feed(stream[cut : cut + 1])


@pytest.mark.parametrize("stream", SAMPLES)
def test_adding_blocks_at_boundaries_of_samples(stream: bytes) -> None:
    check_injections(stream)


@settings(max_examples=200, deadline=None)
@given(stream=streams)
def test_adding_blocks_at_boundaries_changes_nothing_the_client_sees(stream: bytes) -> None:
    check_injections(stream)


def test_bytes_added_before_a_leading_bom_cost_the_first_event() -> None:
    # Documented in EventStreamTracker: the start is a boundary, but if the upstream then
    # opens with a BOM the client no longer skips it and misreads the first field name.
    # A proxy that sent bytes first should drop such a BOM (the client ignores it anyway).
    stream = BOM + b"data: x\n\n"
    assert read(stream).events == [("message", "x", "")]
    assert read(KEEPALIVE_COMMENT + stream).events == []
    assert read(KEEPALIVE_COMMENT + stream[len(BOM) :]) == read(stream)


def test_keepalive_inside_an_event_would_corrupt_it() -> None:
    # The control for the property above: the reader does see a misplaced block.
    stream = b"data: a\ndata: b\n\n"
    assert read(stream[:8] + KEEPALIVE_COMMENT + stream[8:]) != read(stream)
    assert read(stream[:3] + KEEPALIVE_COMMENT + stream[3:]) != read(stream)


def test_retry_hint() -> None:
    assert retry_hint(0) == b"retry: 0\n\n"
    assert retry_hint(5000) == b"retry: 5000\n\n"
    assert read(retry_hint(5000)) == Reading(events=[], retry=5000)
    assert KEEPALIVE_COMMENT == b": keep-alive\n\n"
    assert read(KEEPALIVE_COMMENT) == Reading()


@pytest.mark.parametrize("bad", [-1, True, 1.5, "10"])
def test_retry_hint_rejects_what_is_not_milliseconds(bad: object) -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        retry_hint(bad)
