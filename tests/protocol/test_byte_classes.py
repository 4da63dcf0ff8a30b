"""The byte-class test against the definition it replaces (deleting the members)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.protocol.byte_classes import FIELD_BYTES, PRINTABLE_ASCII, TCHAR, VCHAR, ByteClass


def test_every_single_byte_is_judged_by_membership() -> None:
    members = b"abc\x00\xff"
    byte_class = ByteClass(members)
    for value in range(256):
        assert byte_class.holds_only(bytes([value])) is (value in members)


def test_empty_bytes_hold_only_members() -> None:
    assert ByteClass(b"").holds_only(b"")
    assert TCHAR.holds_only(b"")


def test_the_grammar_classes() -> None:
    assert TCHAR.holds_only(b"content-type")
    assert not TCHAR.holds_only(b"content type")
    assert not TCHAR.holds_only(b"x:y")
    assert FIELD_BYTES.holds_only(b"a\tb \x80\xff~")
    assert not FIELD_BYTES.holds_only(b"a\x7fb")
    assert not FIELD_BYTES.holds_only(b"a\rb")
    assert not FIELD_BYTES.holds_only(b"a\x0bb")
    assert VCHAR.holds_only(b"/mcp?x=1")
    assert not VCHAR.holds_only(b"/m p")
    assert not VCHAR.holds_only(b"/m\x80")
    assert PRINTABLE_ASCII.holds_only(b"2026-07-28 x")
    assert not PRINTABLE_ASCII.holds_only(b"tools/call\t")


@given(st.binary(max_size=64), st.binary(max_size=300))
def test_agrees_with_deleting_the_members(members: bytes, data: bytes) -> None:
    assert ByteClass(members).holds_only(data) is (data.translate(None, members) == b"")
