"""Pieces of the HTTP/1.1 grammar, valid and hostile, for the hypothesis strategies of the
differential suites (request heads and responses)."""

from __future__ import annotations

from hypothesis import strategies as st

TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VCHAR = bytes(range(0x21, 0x7F))
# Bytes that separate the two parsers' opinions: controls, whitespace, DEL, obs-text.
HOSTILE = b'\x00\x01\x08\t\n\x0b\x0c\r\x1f \x7f\x80\xa0\xff:;,"\\'


def grammar_bytes(
    alphabet: bytes, min_size: int = 0, max_size: int = 12
) -> st.SearchStrategy[bytes]:
    """Byte strings over ``alphabet``."""
    # One binary draw mapped onto the alphabet: far cheaper to generate than a list of
    # single-byte draws, and it still shrinks towards the alphabet's first byte.
    table = bytes(alphabet[i % len(alphabet)] for i in range(256))
    return st.binary(min_size=min_size, max_size=max_size).map(lambda b: b.translate(table))


BAD_NAMES = st.one_of(
    st.sampled_from([b"", b"Bad Name", b"Bad@Name", b"Na\x00me", b"N\x80", b"(x)", b"X\t"]),
    grammar_bytes(TCHAR + HOSTILE, 0, 6),
)
GOOD_COLONS = st.sampled_from([b": ", b":", b":\t", b":  \t"])
BAD_COLONS = st.sampled_from([b" :", b"\t:", b" : ", b""])
OWS = st.sampled_from([b"", b"", b" ", b"\t", b" \t "])
