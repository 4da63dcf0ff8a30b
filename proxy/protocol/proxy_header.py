"""The HAProxy PROXY protocol, versions 1 (text) and 2 (binary), receiving side.

Incremental and sans-IO: hand ``parse_proxy_header`` the bytes read so far and it answers
"complete", "need more" or "this cannot be a valid header". Spec:
https://github.com/haproxy/haproxy/blob/master/doc/proxy-protocol.txt (sections cited below).
The listener must be configured to expect the header; the spec (§5) forbids guessing.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final, Literal

V1_SIGNATURE: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_LINE: Final = 107
"""Longest v1 line the spec allows, CRLF included (§2.1, the "worst case")."""
DEFAULT_MAX_V2_LENGTH: Final = 4096

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20

_SIGNATURES: Final[tuple[tuple[Literal[1, 2], bytes], ...]] = ((1, V1_SIGNATURE), (2, V2_SIGNATURE))
Family = Literal["TCP4", "TCP6", "UNIX", "UNSPEC"]
Address = tuple[str, int]

# fam byte -> (family, address block size). DGRAM (0x12/0x22/0x32) is deliberately
# absent: a datagram header on a stream connection is a misconfigured sender.
_V2_FAMILIES: Final[dict[int, tuple[Family, int]]] = {
    0x00: ("UNSPEC", 0),
    0x11: ("TCP4", 12),
    0x21: ("TCP6", 36),
    0x31: ("UNIX", 216),
}
_V1_PROTOCOLS: Final = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r")
# Decimal without heading zeroes (§2.1 forbids them to avoid octal confusion).
_DEC_OCTET: Final = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_V1_IPV4: Final = re.compile(rb"(?:" + _DEC_OCTET + rb"\.){3}" + _DEC_OCTET)
_V1_IPV6_CHARS: Final = re.compile(rb"[0-9A-Fa-f:.]+")  # no "%scope", no spaces
_V1_PORT: Final = re.compile(rb"0|[1-9][0-9]{0,4}")


class ProxyHeaderError(ValueError):
    """The bytes cannot be a valid PROXY header: the connection must be closed."""


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """What a complete PROXY header said.

    ``source`` None means "use the real connection's addresses": LOCAL (v2), UNKNOWN
    (v1, reported as LOCAL/UNSPEC) and the families carrying no IP address (UNSPEC, UNIX).
    """

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    family: Family
    source: Address | None
    destination: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    """v2 TLVs in wire order, raw (CRC32C and NOOP included), already validated."""

    def tlv(self, kind: int) -> bytes | None:
        """Value of the first TLV of this type, or None."""
        return next((value for tlv_type, value in self.tlvs if tlv_type == kind), None)

    @property
    def authority(self) -> str | None:
        """PP2_TYPE_AUTHORITY (the client's SNI / host name); validated UTF-8."""
        value = self.tlv(PP2_TYPE_AUTHORITY)
        return None if value is None else value.decode("utf-8")


def _make_crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _make_crc32c_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C (Castagnoli, RFC 4960 appendix B); pass a previous result to continue it."""
    crc ^= 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _signature_version(buf: bytes) -> Literal[1, 2] | None:
    """1 or 2 once a whole signature is there, None while a prefix of one, else raise."""
    for version, signature in _SIGNATURES:
        have = min(len(buf), len(signature))
        if buf[:have] == signature[:have]:
            return None if have < len(signature) else version
    raise ProxyHeaderError("not a PROXY protocol header")


def looks_like_proxy_header(prefix: bytes | bytearray) -> bool:
    """True if ``prefix`` agrees with the v1 or v2 signature as far as it goes.

    An empty prefix agrees. For diagnostics only (say, logging that a client sent a
    header to a listener not configured for one): deciding by sniffing is forbidden.
    """
    try:
        _signature_version(bytes(prefix[: len(V2_SIGNATURE)]))
    except ProxyHeaderError:
        return False
    return True


def parse_proxy_header(
    buf: bytes | bytearray, *, max_v2_length: int = DEFAULT_MAX_V2_LENGTH
) -> tuple[ProxyInfo, int] | None:
    """Parse the PROXY header at the start of ``buf``.

    Returns (info, bytes consumed) once complete, None while more bytes are needed (the
    caller reads more, under a timeout), and raises ProxyHeaderError as soon as the bytes
    at hand rule out a valid header. ``max_v2_length`` bounds a v2 header, all 16 fixed
    bytes included, so a sender cannot make the caller buffer 64 KiB.
    """
    version = _signature_version(bytes(buf[: len(V2_SIGNATURE)]))
    if version is None:
        return None
    if version == 1:
        return _parse_v1(bytes(buf[:V1_MAX_LINE]))
    return _parse_v2(buf, max_v2_length)


def _parse_v1(window: bytes) -> tuple[ProxyInfo, int] | None:
    after = window[len(V1_SIGNATURE) :]
    if not any(after[: len(p)] == p[: len(after)] for p in _V1_PROTOCOLS):
        raise ProxyHeaderError("v1: protocol must be TCP4, TCP6 or UNKNOWN")
    cr, lf = window.find(b"\r"), window.find(b"\n")
    # §2.1: a lone CR or LF must not end the line; failing early beats waiting for 107.
    if lf != -1 and lf != cr + 1:
        raise ProxyHeaderError("v1: CR and LF must come together, as the final CRLF")
    if lf == -1:
        if cr != -1 and cr != len(window) - 1:
            raise ProxyHeaderError("v1: CR not followed by LF")
        if len(window) >= V1_MAX_LINE:
            raise ProxyHeaderError(f"v1: no CRLF in the first {V1_MAX_LINE} bytes")
        return None
    fields = window[len(V1_SIGNATURE) : cr].split(b" ")
    if fields[0] == b"UNKNOWN":  # §2.1: the receiver ignores the rest of the line
        return ProxyInfo(1, "LOCAL", "UNSPEC", None, None), cr + 2
    if len(fields) != 5:
        raise ProxyHeaderError("v1: expected 4 fields after the protocol, single spaces")
    family: Family = "TCP4" if fields[0] == b"TCP4" else "TCP6"
    src_ip, dst_ip = (_v1_address(field, family) for field in fields[1:3])
    src_port, dst_port = (_v1_port(field) for field in fields[3:5])
    return ProxyInfo(1, "PROXY", family, (src_ip, src_port), (dst_ip, dst_port)), cr + 2


def _v1_address(field: bytes, family: Family) -> str:
    # The regexes run first so that only ASCII of the right shape reaches ipaddress.
    if family == "TCP4":
        if _V1_IPV4.fullmatch(field) is None:
            raise ProxyHeaderError(f"v1: bad IPv4 address {field!r}")
        return field.decode("ascii")
    try:
        if _V1_IPV6_CHARS.fullmatch(field) is None:
            raise ValueError(field)
        return str(ipaddress.IPv6Address(field.decode("ascii")))
    except ValueError:
        raise ProxyHeaderError(f"v1: bad IPv6 address {field!r}") from None


def _v1_port(field: bytes) -> int:
    if _V1_PORT.fullmatch(field) is None or int(field) > 0xFFFF:
        raise ProxyHeaderError(f"v1: bad port {field!r}")
    return int(field)


def _parse_v2(buf: bytes | bytearray, max_v2_length: int) -> tuple[ProxyInfo, int] | None:
    # Each fixed byte is checked as soon as it arrives, so garbage fails fast.
    if len(buf) > 12 and (buf[12] >> 4 != 2 or buf[12] & 0x0F > 1):
        raise ProxyHeaderError(f"v2: bad version/command byte {buf[12]:#04x}")
    if len(buf) > 13 and buf[13] not in _V2_FAMILIES:
        raise ProxyHeaderError(f"v2: unsupported family/transport byte {buf[13]:#04x}")
    if len(buf) < 16:
        return None
    command: Literal["PROXY", "LOCAL"] = "PROXY" if buf[12] & 0x0F else "LOCAL"
    family, address_size = _V2_FAMILIES[buf[13]]
    total = 16 + int.from_bytes(buf[14:16], "big")
    if total > max_v2_length:
        raise ProxyHeaderError(f"v2: header of {total} bytes exceeds {max_v2_length}")
    # The address block sits where the family says even for LOCAL, whose addresses are
    # then ignored; TLVs follow it.
    if total < 16 + address_size:
        raise ProxyHeaderError(f"v2: length too short for a {family} address block")
    if len(buf) < total:
        return None
    header = bytes(buf[:total])
    source = destination = None
    if command == "PROXY" and family in ("TCP4", "TCP6"):
        size = 4 if family == "TCP4" else 16
        ports = 16 + 2 * size
        src_port, dst_port = header[ports : ports + 2], header[ports + 2 : ports + 4]
        source = (_v2_ip(header[16 : 16 + size]), int.from_bytes(src_port, "big"))
        destination = (_v2_ip(header[16 + size : ports]), int.from_bytes(dst_port, "big"))
    tlvs = _v2_tlvs(header, 16 + address_size)
    return ProxyInfo(2, command, family, source, destination, tlvs), total


def _v2_ip(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def _split_tlvs(data: bytes, start: int) -> list[tuple[int, int, int]]:
    """(type, value start, value end) for the TLVs that must exactly fill data[start:]."""
    spans = []
    pos = start
    while pos < len(data):
        if len(data) - pos < 3:
            raise ProxyHeaderError("v2: truncated TLV header")
        end = pos + 3 + int.from_bytes(data[pos + 1 : pos + 3], "big")
        if end > len(data):
            raise ProxyHeaderError(f"v2: TLV {data[pos]:#04x} overruns the header")
        spans.append((data[pos], pos + 3, end))
        pos = end
    return spans


def _v2_tlvs(header: bytes, start: int) -> tuple[tuple[int, bytes], ...]:
    spans = _split_tlvs(header, start)
    crc_spans = [(s, e) for kind, s, e in spans if kind == PP2_TYPE_CRC32C]
    if len(crc_spans) > 1:
        raise ProxyHeaderError("v2: more than one CRC32C TLV")
    if crc_spans:
        s, e = crc_spans[0]
        if e - s != 4:
            raise ProxyHeaderError("v2: CRC32C TLV must hold 4 bytes")
        # §2.2.3: checksum of the whole header with the checksum field zeroed.
        if crc32c(header[:s] + b"\0\0\0\0" + header[e:]) != int.from_bytes(header[s:e], "big"):
            raise ProxyHeaderError("v2: CRC32C mismatch")
    tlvs = tuple((kind, header[s:e]) for kind, s, e in spans)
    for kind, value in tlvs:
        if kind == PP2_TYPE_AUTHORITY:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                raise ProxyHeaderError("v2: AUTHORITY TLV is not UTF-8") from None
        elif kind == PP2_TYPE_UNIQUE_ID and len(value) > 128:
            raise ProxyHeaderError("v2: UNIQUE_ID TLV longer than 128 bytes")
        elif kind == PP2_TYPE_SSL:
            if len(value) < 5:  # client flags (1) + verify (4), then sub-TLVs
                raise ProxyHeaderError("v2: SSL TLV shorter than 5 bytes")
            _split_tlvs(value, 5)
    return tlvs


def unmap_ipv4(address: str) -> str:
    """``::ffff:192.0.2.1`` -> ``192.0.2.1``: HAProxy sends IPv4 clients of an IPv6
    listener as IPv4-mapped addresses; logs and X-Forwarded-For want the IPv4 form."""
    if address.startswith("::ffff:"):
        mapped = ipaddress.IPv6Address(address).ipv4_mapped
        if mapped is not None:
            return str(mapped)
    return address
