"""proxy.audit: the usage record, its spill-file encoding and the bounded buffer."""

from __future__ import annotations

import os

import msgspec
import pytest

from proxy.audit import (
    AuditBuffer,
    UsageRecord,
    clean_text,
    cleaned,
    decode_lines,
    encode_lines,
    new_record_key,
)


def rec(i: int, *, tool: str | None = "search", route: str = "/mcp") -> UsageRecord:
    return UsageRecord(
        ts=1_700_000_000.0 + i,
        key_id=i,
        tenant_id=None,
        route=route,
        method="tools/call",
        tool=tool,
        status=200,
        bytes_in=i,
        bytes_out=2 * i,
        duration_ms=1.5,
        key=f"{i:032x}",  # fixed, so two calls make equal records
    )


def test_a_record_is_one_compact_json_array_line() -> None:
    data = encode_lines([msgspec.structs.replace(rec(1), key="0123456789abcdef0123456789abcdef")])
    assert data == (
        b'[1700000001.0,1,null,"/mcp","tools/call","search",200,1,2,1.5,'
        b'"0123456789abcdef0123456789abcdef"]\n'
    )


def test_every_record_gets_its_own_key_when_it_is_made() -> None:
    fields = msgspec.structs.asdict(rec(1))
    del fields["key"]
    keys = {UsageRecord(**fields).key for _ in range(10_000)}
    assert len(keys) == 10_000
    assert all(len(k) == 32 and int(k, 16) >= 0 for k in keys)
    # Two processes draw different prefixes: a forked child gets its own.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report a key, exit without running pytest's teardown
        os.write(write, new_record_key().encode())
        os._exit(0)
    os.close(write)
    child_key = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child_key[:16] != new_record_key()[:16]


def test_lines_written_before_keys_existed_get_a_key_of_their_file_and_line() -> None:
    old = b'[1700000001.0,1,null,"/mcp","tools/call","search",200,1,2,1.5]\n' * 2
    first, bad = decode_lines(old, "audit-a.jsonl")
    again, _ = decode_lines(old, "audit-a.jsonl")
    other, _ = decode_lines(old, "audit-b.jsonl")
    assert bad == 0
    assert [r.key for r in first] == [r.key for r in again]  # a replay repeats them
    assert len({r.key for r in first} | {r.key for r in other}) == 4
    assert first[0] == msgspec.structs.replace(rec(1), key=first[0].key)


def test_lines_round_trip_in_order() -> None:
    records = [rec(i) for i in range(100)] + [rec(100, tool=None)]
    assert decode_lines(encode_lines(records)) == (records, 0)
    assert decode_lines(b"") == ([], 0)


def test_a_torn_or_garbage_line_is_counted_not_fatal() -> None:
    good = encode_lines([rec(1), rec(2)])
    torn = encode_lines([rec(3)])[:-10]  # a crash mid-write: no newline, cut short
    records, bad = decode_lines(good + b"\n  \nnot json\n" + torn)
    assert records == [rec(1), rec(2)]
    assert bad == 2


def test_text_postgres_or_utf8_cannot_hold_is_cleaned() -> None:
    assert clean_text("/mcp") == "/mcp"
    assert clean_text("é/ok") == "é/ok"
    assert clean_text("a\x00b") == "a\ufffdb"
    assert clean_text("x\udcffy") == "x?y"
    bad = rec(1, tool="t\x00\udcff", route="/r\udc80")
    assert cleaned(bad) == rec(1, tool="t\ufffd?", route="/r?")
    assert cleaned(rec(1, tool=None)).tool is None
    # A lone surrogate cannot be UTF-8: that record is encoded cleaned, not lost.
    assert decode_lines(encode_lines([rec(0), bad])) == ([rec(0), cleaned(bad)], 0)


def test_records_are_immutable() -> None:
    with pytest.raises(AttributeError):
        rec(1).status = 500  # type: ignore[misc]
    assert msgspec.structs.replace(rec(1), status=500).status == 500


def test_buffer_takes_oldest_first() -> None:
    buf = AuditBuffer(10)
    for i in range(5):
        assert buf.add(rec(i))
    assert len(buf) == 5
    assert buf.take(2) == [rec(0), rec(1)]
    assert buf.take(10) == [rec(2), rec(3), rec(4)]
    assert buf.take(3) == []


def test_buffer_over_max_reports_overflow_and_keeps_every_record() -> None:
    buf = AuditBuffer(10)
    results = [buf.add(rec(i)) for i in range(15)]
    assert results == [True] * 10 + [False] * 5
    assert len(buf) == 15  # nothing dropped: the caller spills
    spill = buf.take_overflow()
    # Down to half of max, oldest first, so steady overload makes few large spills.
    assert spill == [rec(i) for i in range(10)]
    assert buf.take_all() == [rec(i) for i in range(10, 15)]
    assert buf.take_overflow() == []
    assert buf.dropped == 0


def test_only_past_the_hard_limit_are_records_dropped_and_counted() -> None:
    buf = AuditBuffer(2, hard_limit=4)
    for i in range(7):
        buf.add(rec(i))
    assert len(buf) == 4
    assert buf.take_dropped() == 3
    assert buf.take_dropped() == 0
    assert buf.take_all() == [rec(i) for i in range(3, 7)]
    assert AuditBuffer(5).hard_limit == 20
    with pytest.raises(ValueError):
        AuditBuffer(0)


def test_restore_puts_records_back_in_front_in_order() -> None:
    buf = AuditBuffer(3)
    for i in range(4):
        buf.add(rec(i))
    batch = buf.take(2)
    buf.add(rec(4))
    buf.restore(batch)
    assert buf.take_all() == [rec(0), rec(1), rec(2), rec(3), rec(4)]
