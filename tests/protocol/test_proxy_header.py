"""The PROXY protocol parser (proxy.protocol.proxy_header): v1 and v2, byte-exact.

Headers are built by hand (struct.pack) as HAProxy's send-proxy / send-proxy-v2 emit
them, so a test failure points at the parser, not at a shared builder.
"""

from __future__ import annotations

import ipaddress
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import proxy
from proxy.protocol.proxy_header import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyInfo,
    crc32c,
    looks_like_proxy_header,
    parse_proxy_header,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
HTTP = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"


def v2(ver_cmd: int, fam: int, body: bytes = b"", length: int | None = None) -> bytes:
    return SIG + struct.pack("!BBH", ver_cmd, fam, len(body) if length is None else length) + body


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def ipv4_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    packed = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
    return packed + struct.pack("!HH", sport, dport)


def ipv6_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    packed = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
    return packed + struct.pack("!HH", sport, dport)


def with_crc(ver_cmd: int, fam: int, body: bytes) -> bytes:
    """A v2 header whose last TLV is a correct CRC32C, as HAProxy computes it."""
    header = v2(ver_cmd, fam, body + tlv(PP2_TYPE_CRC32C, b"\0\0\0\0"))
    return header[:-4] + struct.pack("!I", crc32c(header))


def parsed(data: bytes) -> tuple[ProxyInfo, int]:
    result = parse_proxy_header(data)
    assert result is not None
    return result


def reference_crc32c(data: bytes) -> int:
    """Bit-at-a-time CRC-32C, the textbook definition, to check the table-driven one."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


# --- CRC-32C ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0x00000000),
        (b"123456789", 0xE3069283),  # the standard check value
        (bytes(32), 0x8A9136AA),  # RFC 3720 B.4
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_crc32c_known_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_crc32c_matches_bitwise_reference_and_continues(a: bytes, b: bytes) -> None:
    assert crc32c(a + b) == reference_crc32c(a + b)
    assert crc32c(b, crc32c(a)) == crc32c(a + b)
    assert crc32c(bytearray(a)) == crc32c(memoryview(a)) == crc32c(a)


# --- v1 --------------------------------------------------------------------------------


def test_v1_tcp4_spec_example_before_http() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    info, consumed = parsed(line + HTTP)
    assert consumed == len(line)
    assert info == ProxyInfo(1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443), ())


def test_v1_tcp4_longest_line_is_56_bytes() -> None:
    line = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    assert len(line) == 56
    info, consumed = parsed(line)
    assert consumed == 56
    assert info.source == ("255.255.255.255", 65535)
    assert parsed(b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n")[0].source == ("0.0.0.0", 0)


def test_v1_tcp6_longest_line_is_104_bytes_and_addresses_are_normalised() -> None:
    full = ":".join(["FFFF"] * 8)
    line = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 104
    info, consumed = parsed(line + HTTP)
    assert consumed == 104
    assert info.family == "TCP6"
    assert info.source == (str(ipaddress.IPv6Address(full)), 65535)


def test_v1_tcp6_compressed_forms() -> None:
    info, _ = parsed(b"PROXY TCP6 2001:db8::1 ::1 40000 443\r\n")
    assert info == ProxyInfo(1, "PROXY", "TCP6", ("2001:db8::1", 40000), ("::1", 443), ())
    info, _ = parsed(b"PROXY TCP6 2001:0DB8:0000::0001 :: 1 2\r\n")
    assert info.source == ("2001:db8::1", 1)
    assert info.destination == ("::", 2)
    info, _ = parsed(b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n")  # inet_ntop's mapped form
    assert info.source is not None
    assert ipaddress.ip_address(info.source[0]) == ipaddress.IPv6Address("::ffff:192.0.2.1")


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",  # the short form HAProxy sends
        b"PROXY UNKNOWN 192.168.0.1 192.168.0.11 56324 443\r\n",
        b"PROXY UNKNOWN whatever the sender\tput here, even bytes \xff\x00\r\n",
        b"PROXY UNKNOWN \r\n",
    ],
)
def test_v1_unknown_means_use_the_real_connection(line: bytes) -> None:
    info, consumed = parsed(line + HTTP)
    assert consumed == len(line)
    assert info == ProxyInfo(1, "LOCAL", "UNSPEC", None, None, ())


def test_v1_worst_case_unknown_line_is_107_bytes_and_accepted() -> None:
    full = ":".join(["ffff"] * 8)
    line = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 107
    assert parsed(line + HTTP) == (ProxyInfo(1, "LOCAL", "UNSPEC", None, None, ()), 107)


def test_v1_line_of_108_bytes_is_rejected() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert len(line) == 108
    with pytest.raises(ProxyHeaderError, match="no CRLF"):
        parse_proxy_header(line)
    # ... and without waiting for the LF once the CR sits at the 107th byte.
    with pytest.raises(ProxyHeaderError, match="no CRLF"):
        parse_proxy_header(line[:107])
    assert parse_proxy_header(line[:106]) is None


def test_v1_no_crlf_within_107_bytes_is_rejected() -> None:
    data = b"PROXY UNKNOWN " + b"x" * 200
    with pytest.raises(ProxyHeaderError, match="no CRLF"):
        parse_proxy_header(data[:107])
    assert parse_proxy_header(data[:106]) is None


@pytest.mark.parametrize(
    "line",
    [
        # addresses
        b"PROXY TCP4 256.1.1.1 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 01.2.3.4 10.0.0.1 1 2\r\n",  # heading zero: octal confusion
        b"PROXY TCP4 1.2.3.4 10.0.0.010 1 2\r\n",
        b"PROXY TCP4 1.2.3 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4.5 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 ::1 10.0.0.1 1 2\r\n",  # family dictates the format
        b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # no scope ids
        b"PROXY TCP6 ::g ::1 1 2\r\n",
        b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n",
        b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
        b"PROXY TCP4 \xd9\xa1.2.3.4 10.0.0.1 1 2\r\n",  # non-ASCII digit
        # ports
        b"PROXY TCP4 1.2.3.4 10.0.0.1 65536 2\r\n",
        b"PROXY TCP4 1.2.3.4 10.0.0.1 1 99999\r\n",
        b"PROXY TCP4 1.2.3.4 10.0.0.1 080 2\r\n",
        b"PROXY TCP4 1.2.3.4 10.0.0.1 00 2\r\n",
        b"PROXY TCP4 1.2.3.4 10.0.0.1 -1 2\r\n",
        b"PROXY TCP4 1.2.3.4 10.0.0.1 +1 2\r\n",
        b"PROXY TCP4 1.2.3.4 10.0.0.1 0x50 2\r\n",
        b"PROXY TCP4 1.2.3.4 10.0.0.1 1_0 2\r\n",
        # layout
        b"PROXY TCP4 1.2.3.4  10.0.0.1 1 2\r\n",  # double space
        b"PROXY TCP4 1.2.3.4 10.0.0.1 1 2 \r\n",  # trailing space
        b"PROXY TCP4 1.2.3.4 10.0.0.1 1\r\n",
        b"PROXY TCP4 1.2.3.4 10.0.0.1 1 2 3\r\n",
        b"PROXY TCP4\r\n",
        b"PROXY TCP4 1.2.3.4\t10.0.0.1 1 2\r\n",
        b"PROXY TCP5 1.2.3.4 10.0.0.1 1 2\r\n",
        b"PROXY tcp4 1.2.3.4 10.0.0.1 1 2\r\n",
        b"PROXY UNKNOWNX\r\n",
        b"PROXY \r\n",
        b"PROXY  TCP4 1.2.3.4 10.0.0.1 1 2\r\n",
        b"proxy TCP4 1.2.3.4 10.0.0.1 1 2\r\n",
        b"PROXYTCP4 1.2.3.4 10.0.0.1 1 2\r\n",
        # line ending
        b"PROXY TCP4 1.2.3.4 10.0.0.1 1 2\n",
        b"PROXY TCP4 1.2.3.4 10.0.0.1 1 2\rX\n",
        b"PROXY UNKNOWN \n\r\n",
        b"PROXY UNKNOWN \r\r\n",
        b"PROXY UNKNOWN\n\r\n",
    ],
)
def test_v1_malformed_lines_are_rejected(line: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(line + HTTP)


@pytest.mark.parametrize(
    ("data", "needed"),
    [
        (b"GET / HTTP/1.1\r\n", 1),
        (b"\x16\x03\x01\x02\x00", 1),  # a TLS ClientHello
        (b"PROXX", 5),
        (b"PROXY\t", 6),
        (b"PROXY X", 7),
        (b"PROXY TCP4 1.2.3.4 10.0.0.1 1 2\n", 32),  # bare LF: no need to wait
        (b"PROXY UNKNOWN\rX", 15),
    ],
)
def test_garbage_is_rejected_as_soon_as_the_bytes_show_it(data: bytes, needed: int) -> None:
    for cut in range(needed):
        assert parse_proxy_header(data[:cut]) is None
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data[:needed])


# --- v2 --------------------------------------------------------------------------------


def test_v2_haproxy_capture_tcp4() -> None:
    # A real send-proxy-v2 capture: 172.19.0.1:42578 -> 172.19.0.3:80, then the request.
    header = bytes.fromhex("0d0a0d0a000d0a515549540a 2111000c ac130001 ac130003 a652 0050")
    assert header[:12] == V2_SIGNATURE == SIG
    info, consumed = parsed(header + HTTP)
    assert consumed == 28
    assert info == ProxyInfo(2, "PROXY", "TCP4", ("172.19.0.1", 42578), ("172.19.0.3", 80), ())


def test_v2_tcp6() -> None:
    header = v2(0x21, 0x21, ipv6_block("2001:db8::1", "2001:db8::2", 51000, 443))
    assert len(header) == 52
    info, consumed = parsed(header + b"\x16\x03\x01")
    assert consumed == 52
    assert info == ProxyInfo(2, "PROXY", "TCP6", ("2001:db8::1", 51000), ("2001:db8::2", 443), ())


def test_v2_local_health_check() -> None:
    # What HAProxy sends on its own health checks: LOCAL, AF_UNSPEC, no addresses.
    header = SIG + b"\x20\x00\x00\x00"
    assert parsed(header + HTTP) == (ProxyInfo(2, "LOCAL", "UNSPEC", None, None, ()), 16)


def test_v2_local_ignores_addresses_but_keeps_tlvs() -> None:
    body = ipv4_block("10.0.0.1", "10.0.0.2", 1, 2) + tlv(PP2_TYPE_UNIQUE_ID, b"id-1")
    info, consumed = parsed(v2(0x20, 0x11, body))
    assert consumed == 16 + len(body)
    assert info == ProxyInfo(2, "LOCAL", "TCP4", None, None, ((PP2_TYPE_UNIQUE_ID, b"id-1"),))
    # TLVs after an empty UNSPEC block, with a checksum, as HAProxy's LOCAL can carry them.
    info, _ = parsed(with_crc(0x20, 0x00, tlv(PP2_TYPE_UNIQUE_ID, b"id-2")))
    assert info.tlv(PP2_TYPE_UNIQUE_ID) == b"id-2"


def test_v2_proxy_with_unspec_or_unix_falls_back_to_the_real_connection() -> None:
    info, consumed = parsed(v2(0x21, 0x00) + HTTP)
    assert (info.command, info.family, info.source, consumed) == ("PROXY", "UNSPEC", None, 16)
    paths = b"/run/src.sock".ljust(108, b"\0") + b"/run/dst.sock".ljust(108, b"\0")
    info, consumed = parsed(v2(0x21, 0x31, paths) + HTTP)
    assert (info.family, info.source, info.destination, consumed) == ("UNIX", None, None, 232)


def test_v2_unspec_block_is_parsed_as_tlvs() -> None:
    # AF_UNSPEC has no address block of known size; HAProxy's LOCAL puts TLVs right there.
    info, _ = parsed(v2(0x21, 0x00, tlv(PP2_TYPE_NOOP, b"")))
    assert info.tlvs == ((PP2_TYPE_NOOP, b""),)
    with pytest.raises(ProxyHeaderError, match="TLV"):
        parse_proxy_header(v2(0x21, 0x00, b"opaque!"))


def test_v2_with_alpn_authority_and_correct_crc32c() -> None:
    body = (
        ipv4_block("203.0.113.7", "10.0.0.5", 50123, 443)
        + tlv(PP2_TYPE_ALPN, b"h2")
        + tlv(PP2_TYPE_AUTHORITY, "mcp.exämple.com".encode())
    )
    header = with_crc(0x21, 0x11, body)
    info, consumed = parsed(header + HTTP)
    assert consumed == len(header) == 16 + 12 + 5 + 19 + 7
    assert info.source == ("203.0.113.7", 50123)
    assert info.destination == ("10.0.0.5", 443)
    assert [kind for kind, _ in info.tlvs] == [PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_CRC32C]
    assert info.tlv(PP2_TYPE_ALPN) == b"h2"
    assert info.authority == "mcp.exämple.com"
    assert info.tlv(PP2_TYPE_CRC32C) == header[-4:]
    assert info.tlv(PP2_TYPE_SSL) is None
    assert ProxyInfo(2, "LOCAL", "UNSPEC", None, None).authority is None


def test_v2_crc32c_may_sit_anywhere_among_tlvs() -> None:
    addr = ipv4_block("1.2.3.4", "5.6.7.8", 1, 2)
    header = v2(0x21, 0x11, addr + tlv(PP2_TYPE_CRC32C, bytes(4)) + tlv(PP2_TYPE_ALPN, b"h2"))
    checksum = crc32c(header)
    at = 16 + 12 + 3
    header = header[:at] + struct.pack("!I", checksum) + header[at + 4 :]
    assert parsed(header)[0].tlv(PP2_TYPE_ALPN) == b"h2"


def test_v2_wrong_crc32c_is_rejected() -> None:
    body = ipv4_block("203.0.113.7", "10.0.0.5", 50123, 443) + tlv(PP2_TYPE_ALPN, b"h2")
    good = with_crc(0x21, 0x11, body)
    bad_checksum = good[:-1] + bytes([good[-1] ^ 0x01])
    with pytest.raises(ProxyHeaderError, match="CRC32C mismatch"):
        parse_proxy_header(bad_checksum)
    spoofed_port = good[:26] + b"\x00\x50" + good[28:]  # source port changed in flight
    with pytest.raises(ProxyHeaderError, match="CRC32C mismatch"):
        parse_proxy_header(spoofed_port)


@given(st.integers(min_value=16, max_value=16 + 36 - 1), st.integers(min_value=1, max_value=255))
def test_v2_any_address_corruption_fails_the_checksum(index: int, flip: int) -> None:
    good = with_crc(0x21, 0x21, ipv6_block("2001:db8::1", "2001:db8::2", 1000, 443))
    bad = good[:index] + bytes([good[index] ^ flip]) + good[index + 1 :]
    with pytest.raises(ProxyHeaderError, match="CRC32C mismatch"):
        parse_proxy_header(bad)


def test_v2_crc32c_tlv_must_be_4_bytes_and_unique() -> None:
    addr = ipv4_block("1.2.3.4", "5.6.7.8", 1, 2)
    with pytest.raises(ProxyHeaderError, match="4 bytes"):
        parse_proxy_header(v2(0x21, 0x11, addr + tlv(PP2_TYPE_CRC32C, b"\0\0\0")))
    twice = with_crc(0x21, 0x11, addr + tlv(PP2_TYPE_CRC32C, b"\0\0\0\0"))
    with pytest.raises(ProxyHeaderError, match="more than one"):
        parse_proxy_header(twice)


def test_v2_ssl_unique_id_and_custom_tlvs() -> None:
    ssl_subtlvs = tlv(0x21, b"TLSv1.3") + tlv(0x23, b"TLS_AES_128_GCM_SHA256")
    ssl_value = struct.pack("!BI", 0x01, 0) + ssl_subtlvs
    tlvs = (
        tlv(PP2_TYPE_SSL, ssl_value)
        + tlv(PP2_TYPE_UNIQUE_ID, b"u" * 128)
        + tlv(PP2_TYPE_NOOP, b"\0\0")
        + tlv(0xEA, b"\x01vpce-0123")  # AWS's custom-range VPC endpoint TLV
    )
    info, _ = parsed(v2(0x21, 0x11, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + tlvs))
    assert info.tlvs == (
        (PP2_TYPE_SSL, ssl_value),
        (PP2_TYPE_UNIQUE_ID, b"u" * 128),
        (PP2_TYPE_NOOP, b"\0\0"),
        (0xEA, b"\x01vpce-0123"),
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (v2(0x11, 0x11, bytes(12)), "version"),  # version 1 in the binary format
        (v2(0x31, 0x11, bytes(12)), "version"),
        (v2(0x01, 0x11, bytes(12)), "version"),
        (v2(0x22, 0x11, bytes(12)), "command"),
        (v2(0x2F, 0x11, bytes(12)), "command"),
        (v2(0x21, 0x12, bytes(12)), "family"),  # UDP over IPv4
        (v2(0x21, 0x22, bytes(36)), "family"),  # UDP over IPv6
        (v2(0x21, 0x32, bytes(216)), "family"),  # UNIX datagram
        (v2(0x20, 0x12, bytes(12)), "family"),  # ... even for LOCAL
        (v2(0x21, 0x41, bytes(12)), "family"),
        (v2(0x21, 0x13, bytes(12)), "family"),
        (v2(0x21, 0x10, bytes(12)), "family"),
        (v2(0x21, 0x01, b""), "family"),
        (v2(0x21, 0x11, bytes(11)), "too short"),
        (v2(0x21, 0x21, bytes(35)), "too short"),
        (v2(0x21, 0x31, bytes(215)), "too short"),
        (v2(0x20, 0x11, b""), "too short"),
        (v2(0x21, 0x11, bytes(12) + b"\x01"), "truncated TLV"),
        (v2(0x21, 0x11, bytes(12) + b"\x01\x00"), "truncated TLV"),
        (v2(0x21, 0x11, bytes(12) + b"\x01\x00\x03ab"), "overruns"),
        (v2(0x21, 0x11, bytes(12) + tlv(1, b"h2") + b"\x02"), "truncated TLV"),
        (v2(0x21, 0x11, bytes(12) + tlv(PP2_TYPE_AUTHORITY, b"\xff\xfe")), "UTF-8"),
        (v2(0x21, 0x11, bytes(12) + tlv(PP2_TYPE_UNIQUE_ID, bytes(129))), "128"),
        (v2(0x21, 0x11, bytes(12) + tlv(PP2_TYPE_SSL, b"\x01\0\0\0")), "SSL"),
        (v2(0x21, 0x11, bytes(12) + tlv(PP2_TYPE_SSL, b"\x01\0\0\0\0\x21\x00")), "TLV"),
        (v2(0x21, 0x11, bytes(12) + tlv(PP2_TYPE_SSL, b"\x01\0\0\0\0\x21\0\x09ab")), "TLV"),
    ],
)
def test_v2_malformed_headers_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message):
        parse_proxy_header(data + HTTP)


def test_v2_bad_fixed_bytes_fail_before_the_body_arrives() -> None:
    with pytest.raises(ProxyHeaderError, match="version"):
        parse_proxy_header(SIG + b"\x11")
    with pytest.raises(ProxyHeaderError, match="family"):
        parse_proxy_header(SIG + b"\x21\x12")
    with pytest.raises(ProxyHeaderError, match="too short"):
        parse_proxy_header(SIG + b"\x21\x11\x00\x0b")
    with pytest.raises(ProxyHeaderError, match="not a PROXY"):
        parse_proxy_header(SIG[:11] + b"\r")


def test_v2_length_is_bounded_by_max_v2_length() -> None:
    addr = ipv4_block("1.2.3.4", "5.6.7.8", 1, 2)
    # 16 + 65535: the largest header the length field can describe, refused up front.
    with pytest.raises(ProxyHeaderError, match="exceeds 4096"):
        parse_proxy_header(SIG + b"\x21\x11\xff\xff")
    at_limit = v2(0x21, 0x11, addr + tlv(PP2_TYPE_NOOP, bytes(4096 - 16 - 12 - 3)))
    assert len(at_limit) == 4096
    assert parsed(at_limit)[1] == 4096
    over = v2(0x21, 0x11, addr + tlv(PP2_TYPE_NOOP, bytes(4097 - 16 - 12 - 3)))
    with pytest.raises(ProxyHeaderError, match="exceeds"):
        parse_proxy_header(over[:16])
    assert parse_proxy_header(over, max_v2_length=4097) is not None
    with pytest.raises(ProxyHeaderError, match="exceeds 64"):
        parse_proxy_header(at_limit, max_v2_length=64)
    biggest = v2(0x21, 0x11, addr + tlv(PP2_TYPE_NOOP, bytes(65535 - 12 - 3)))
    assert parsed_with(biggest, 16 + 65535) == 16 + 65535


def parsed_with(data: bytes, max_v2_length: int) -> int:
    result = parse_proxy_header(data, max_v2_length=max_v2_length)
    assert result is not None
    return result[1]


# --- incremental parsing ---------------------------------------------------------------

VALID_HEADERS = [
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    b"PROXY TCP6 2001:db8::1 ::1 40000 443\r\n",
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN " + b"y" * 90 + b"\r\n",
    SIG + b"\x20\x00\x00\x00",
    v2(0x21, 0x11, ipv4_block("172.19.0.1", "172.19.0.3", 42578, 80)),
    v2(0x21, 0x21, ipv6_block("::1", "::2", 1, 2) + tlv(PP2_TYPE_ALPN, b"http/1.1")),
    with_crc(0x21, 0x11, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + tlv(PP2_TYPE_NOOP, b"")),
    v2(0x21, 0x31, bytes(216)),
]


@pytest.mark.parametrize("header", VALID_HEADERS)
def test_every_strict_prefix_needs_more_and_trailing_bytes_are_left(header: bytes) -> None:
    for cut in range(len(header)):
        assert parse_proxy_header(header[:cut]) is None, cut
        assert parse_proxy_header(bytearray(header[:cut])) is None, cut
    for trailer in (b"", HTTP, b"\r\n\r\n", b"\x16\x03\x01\x00\xa5", SIG + b"\x21\x11"):
        result = parse_proxy_header(bytearray(header + trailer))
        assert result is not None
        assert result[1] == len(header)


def test_looks_like_proxy_header() -> None:
    for sig in (b"PROXY ", SIG):
        for cut in range(len(sig) + 1):
            assert looks_like_proxy_header(sig[:cut])
    assert looks_like_proxy_header(b"PROXY TCP4 1.2.3.4")
    assert looks_like_proxy_header(bytearray(SIG + b"\x99"))  # signature only, not content
    for other in (b"GET / HTTP/1.1", b"\x16\x03\x01", b"PROXYTCP4", b"proxy ", SIG[:11] + b"X"):
        assert not looks_like_proxy_header(other)


# --- properties ------------------------------------------------------------------------

ports = st.integers(min_value=0, max_value=65535)
trailers = st.binary(max_size=64)


@given(st.ip_addresses(v=4), st.ip_addresses(v=4), ports, ports, trailers)
def test_v1_tcp4_round_trip(
    src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, sport: int, dport: int, tail: bytes
) -> None:
    line = f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()
    info, consumed = parsed(line + tail)
    assert consumed == len(line)
    assert info == ProxyInfo(1, "PROXY", "TCP4", (str(src), sport), (str(dst), dport), ())


@given(
    st.ip_addresses(v=6),
    st.ip_addresses(v=6),
    ports,
    ports,
    st.sampled_from(["compressed", "exploded", "upper"]),
    trailers,
)
def test_v1_tcp6_round_trip(
    src: ipaddress.IPv6Address,
    dst: ipaddress.IPv6Address,
    sport: int,
    dport: int,
    form: str,
    tail: bytes,
) -> None:
    def text(addr: ipaddress.IPv6Address) -> str:
        if form == "exploded":
            return addr.exploded
        return addr.compressed.upper() if form == "upper" else addr.compressed

    line = f"PROXY TCP6 {text(src)} {text(dst)} {sport} {dport}\r\n".encode()
    info, consumed = parsed(line + tail)
    assert consumed == len(line) <= 104
    assert info.source is not None
    assert info.destination is not None
    assert (ipaddress.ip_address(info.source[0]), info.source[1]) == (src, sport)
    assert (ipaddress.ip_address(info.destination[0]), info.destination[1]) == (dst, dport)


tlv_lists = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([PP2_TYPE_ALPN, PP2_TYPE_NOOP, 0x30, 0xE0, 0xF7]), st.binary()),
        st.tuples(st.just(PP2_TYPE_AUTHORITY), st.text().map(str.encode)),
        st.tuples(st.just(PP2_TYPE_UNIQUE_ID), st.binary(max_size=128)),
    ),
    max_size=5,
)


@given(
    st.one_of(
        st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)),
        st.tuples(st.ip_addresses(v=6), st.ip_addresses(v=6)),
    ),
    ports,
    ports,
    tlv_lists,
    st.booleans(),
    trailers,
)
def test_v2_round_trip_and_incremental(
    addrs: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]
    | tuple[ipaddress.IPv6Address, ipaddress.IPv6Address],
    sport: int,
    dport: int,
    tlvs: list[tuple[int, bytes]],
    checksum: bool,
    tail: bytes,
) -> None:
    src, dst = addrs
    fam = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    body += b"".join(tlv(kind, value) for kind, value in tlvs)
    header = with_crc(0x21, fam, body) if checksum else v2(0x21, fam, body)
    info, consumed = parsed(header + tail)
    assert consumed == len(header)
    assert info.version == 2
    assert info.command == "PROXY"
    assert info.family == ("TCP4" if fam == 0x11 else "TCP6")
    assert info.source == (str(src), sport)
    assert info.destination == (str(dst), dport)
    expected = [*tlvs, (PP2_TYPE_CRC32C, header[-4:])] if checksum else tlvs
    assert list(info.tlvs) == expected
    for cut in range(len(header)):
        assert parse_proxy_header(header[:cut]) is None


@given(
    st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", SIG, SIG + b"\x21\x11"]),
    st.binary(max_size=300),
)
def test_arbitrary_bytes_only_ever_raise_proxy_header_error(prefix: bytes, rest: bytes) -> None:
    data = prefix + rest
    try:
        result = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    if result is not None:
        info, consumed = result
        assert 0 < consumed <= len(data)
        # The consumed bytes alone are a complete header, and parse the same.
        assert parse_proxy_header(data[:consumed]) == result
        assert info.version in (1, 2)


# --- sans-IO ---------------------------------------------------------------------------


def test_module_imports_no_io() -> None:
    code = (
        "import json, sys\n"
        "import proxy.protocol.proxy_header\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(proxy.__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout))
    assert "proxy.protocol.proxy_header" in loaded
    for name in ("trio", "socket", "selectors", "asyncio", "ssl", "proxy.net"):
        assert name not in loaded, name


def _outcome(data: bytes) -> object:
    try:
        return parse_proxy_header(data)
    except ProxyHeaderError:
        return ProxyHeaderError


@given(
    st.sampled_from([b"PROXY TCP4 1.2.3.4 ", b"PROXY UNKNOWN", SIG + b"\x21\x11\x00", SIG]),
    st.binary(max_size=40),
)
def test_decisions_are_monotonic_as_bytes_arrive(prefix: bytes, rest: bytes) -> None:
    # Once a buffer is complete or invalid, more bytes never change the answer; so a
    # caller can parse after every read without ever seeing "need more" after a verdict.
    data = prefix + rest
    verdict: object = None
    for cut in range(len(data) + 1):
        outcome = _outcome(data[:cut])
        if verdict is not None:
            assert outcome == verdict, cut
        verdict = outcome
