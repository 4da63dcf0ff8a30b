"""HTTP/1.1 proxy rules on top of h11: what is checked, what is rewritten, what is sent.

Pure functions over h11 events and header lists. h11 parses and frames; these functions
add the rules a reverse proxy needs and h11 leaves to its user: stricter framing checks,
hop-by-hop header removal, X-Forwarded-* and Via, Host handling, and the canned error
responses every limit answers with.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal, Protocol

import h11

from proxy.protocol.byte_classes import FIELD_BYTES

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1, plus the de-facto ones (Keep-Alive, Proxy-Connection). Content-Length
# is not hop-by-hop: it is passed on and h11 enforces it on both sides.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Headers a Connection: option may not remove: dropping them would change how the
# message is framed or routed, not just which hop-level hints travel.
_NOT_NOMINATABLE = frozenset({b"host", b"content-length", b"content-type", b"authorization"})


class RequestRejected(Exception):
    """A request the proxy answers itself, with this status, without a backend;
    ``headers`` go on the answer (426's ``Sec-WebSocket-Version``, say)."""

    def __init__(
        self, status: int, reason: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = tuple(headers)


@dataclass(slots=True, init=False)
class RequestInfo:
    """What the proxy learned from a request head, beyond the h11 event.

    (``init=False`` and an ``__init__`` of its own, here and on the request path's other
    dataclasses: the one ``dataclass`` writes is plain Python even in a compiled module,
    one interpreted call per request.)"""

    path: str
    """Path without the query, for routing."""
    target: bytes
    """Origin-form target (path + query) to forward."""
    host: bytes
    chunked: bool
    content_length: int | None
    upgrade: bytes | None
    """The Upgrade header's value when the client asks to switch protocols."""
    connection_tokens: frozenset[bytes]
    host_missing: bool = False
    """True for an HTTP/1.0 request that sent no Host header."""
    expect_continue: bool = False
    """An HTTP/1.1 request with ``Expect: 100-continue``: its client waits for a 100
    before it sends the body."""

    def __init__(
        self,
        path: str,
        target: bytes,
        host: bytes,
        chunked: bool,
        content_length: int | None,
        upgrade: bytes | None,
        connection_tokens: frozenset[bytes],
        host_missing: bool = False,
        expect_continue: bool = False,
    ) -> None:
        self.path = path
        self.target = target
        self.host = host
        self.chunked = chunked
        self.content_length = content_length
        self.upgrade = upgrade
        self.connection_tokens = connection_tokens
        self.host_missing = host_missing
        self.expect_continue = expect_continue


def _connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


_VERSIONS = frozenset({b"1.0", b"1.1"})
_REQUEST_LINE = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21-\x7e\x80-\xff]+ HTTP/([0-9])\.([0-9])"
)


def check_request_line(line: bytes) -> None:
    """Judge a request line as soon as it is complete, before the rest of the head
    arrives: anything but ``method SP target SP HTTP/d.d`` (an HTTP/0.9 ``GET /``, say)
    gets 400 at once instead of waiting for a head that will never be valid, and a
    version other than 1.0 and 1.1 gets 505. ``line`` has no line ending."""
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise RequestRejected(400, "malformed request line")
    if match.group(1) != b"1" or match.group(2) not in b"01":
        raise RequestRejected(505, "HTTP version not supported")


_WS_VERSION = (b"sec-websocket-version", b"13")


def check_websocket_handshake(method: bytes, headers: Sequence[tuple[bytes, bytes]]) -> None:
    """RFC 6455 §4.2.1: what a WebSocket opening handshake must carry before it may reach
    a backend. A version other than 13 gets 426 naming the one we speak (§4.4)."""
    versions = [value for name, value in headers if name == b"sec-websocket-version"]
    if versions != [b"13"]:
        raise RequestRejected(426, "unsupported WebSocket version", headers=(_WS_VERSION,))
    if method != b"GET":
        raise RequestRejected(400, "WebSocket handshake must be a GET")
    keys = [value for name, value in headers if name == b"sec-websocket-key"]
    if len(keys) != 1 or not _is_websocket_key(keys[0]):
        raise RequestRejected(400, "missing or malformed Sec-WebSocket-Key")


def _is_websocket_key(value: bytes) -> bool:
    """The base64 encoding of exactly 16 bytes: 22 characters and ``==``."""
    if len(value) != 24 or not value.endswith(b"==") or not value.isascii():
        return False
    try:
        return len(base64.b64decode(value, validate=True)) == 16
    except binascii.Error:
        return False


def _split_target(target: bytes) -> tuple[bytes, bytes]:
    """Return (origin-form target, authority from absolute-form or b"")."""
    if target.startswith(b"/"):
        return target, b""
    lowered = target[:8].lower()
    if lowered.startswith(b"http://") or lowered.startswith(b"https://"):
        rest = target.split(b"://", 1)[1]
        slash = rest.find(b"/")
        query = rest.find(b"?")
        if slash == -1 or (query != -1 and query < slash):
            cut = query if query != -1 else len(rest)
            return b"/" + rest[cut:], rest[:cut]
        return rest[slash:], rest[:slash]
    raise RequestRejected(400, "request target must be origin-form or absolute-form")


def _check_path(path: bytes) -> None:
    # Dot segments (raw or percent-encoded) let "/public/../admin" match the /public
    # route while the backend serves /admin. Clients normalise paths before sending,
    # so rejecting them costs nothing legitimate.
    for segment in path.split(b"/"):
        if segment and segment.replace(b"%2e", b".").replace(b"%2E", b".") in (b".", b".."):
            raise RequestRejected(400, "dot-segment in request path")
    if b"\\" in path:
        raise RequestRejected(400, "backslash in request path")


def inspect_request(request: h11.Request) -> RequestInfo:
    """Validate a request head beyond what h11 checks and extract what routing needs.

    Raises RequestRejected for what must never reach a backend: Content-Length together
    with Transfer-Encoding (RFC 9112 §6.1: a proxy must not forward both, and the
    combination is the classic smuggling vector), a missing or repeated Host, absolute
    targets whose authority disagrees with Host, dot-segments.
    """
    version = request.http_version
    if version not in _VERSIONS:
        raise RequestRejected(505, "HTTP version not supported")
    host: bytes | None = None
    content_length: int | None = None
    chunked = False
    upgrade: bytes | None = None
    expect_continue = False
    connection_values: list[bytes] = []
    for name, value in request.headers:
        if not FIELD_BYTES.holds_only(value):
            # h11 admits control bytes other than NUL, CR, LF, VT and FF inside values;
            # a backend may read them as line breaks or terminators.
            raise RequestRejected(400, "control character in a header value")
        if name == b"host":
            if host is not None:
                raise RequestRejected(400, "more than one Host header")
            host = value
        elif name == b"content-length":
            content_length = int(value)  # h11 validated the digits and the agreement
        elif name == b"transfer-encoding":
            chunked = True  # h11 admits nothing but a single "chunked"
        elif name == b"connection":
            connection_values.append(value)
        elif name == b"upgrade":
            upgrade = value
        elif name == b"expect":
            expect_continue = value.lower() == b"100-continue" and version == b"1.1"
    if chunked and content_length is not None:
        raise RequestRejected(400, "both Content-Length and Transfer-Encoding")
    if chunked and version == b"1.0":
        # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing.
        raise RequestRejected(400, "Transfer-Encoding in an HTTP/1.0 request")
    target, authority = _split_target(request.target)
    host_missing = host is None
    if host is None:
        if request.http_version != b"1.0":
            raise RequestRejected(400, "missing Host header")
        host = authority
    elif authority and authority.lower() != host.lower():
        raise RequestRejected(400, "absolute-form target disagrees with Host")
    query_at = target.find(b"?")
    raw_path = target if query_at == -1 else target[:query_at]
    _check_path(raw_path)
    tokens = _connection_tokens(connection_values)
    if upgrade is not None and b"upgrade" not in tokens:
        upgrade = None
    if upgrade is not None and b"websocket" in _connection_tokens((upgrade,)):
        check_websocket_handshake(request.method, request.headers)
    return RequestInfo(
        path=raw_path.decode("ascii", "replace"),
        target=target,
        host=host,
        chunked=chunked,
        content_length=content_length,
        upgrade=upgrade,
        connection_tokens=tokens,
        host_missing=host_missing,
        expect_continue=expect_continue,
    )


@dataclass(frozen=True, slots=True)
class ForwardingPolicy:
    host_mode: Literal["preserve", "rewrite"]
    xff_mode: Literal["append", "replace"]
    via: bytes
    proto: bytes = b"http"


def _drop(name: bytes, tokens: frozenset[bytes]) -> bool:
    return name in HOP_BY_HOP or (name in tokens and name not in _NOT_NOMINATABLE)


class RequestHead(Protocol):
    """What header rewriting needs of a request head (h11's Request, or the express
    lane's FastHead)."""

    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]: ...

    @property
    def http_version(self) -> bytes: ...


def upstream_request_headers(
    request: RequestHead,
    info: RequestInfo,
    policy: ForwardingPolicy,
    *,
    client_ip: str,
    backend_authority: bytes,
) -> Headers:
    """The header list sent to the backend.

    Hop-by-hop headers and those the client nominated in Connection are removed; framing
    is re-declared (h11 re-frames the body); X-Forwarded-For/-Proto/-Host and Via are set.
    """
    tokens = info.connection_tokens
    out: Headers = []
    forwarded_for: list[bytes] = []
    via: list[bytes] = []
    for name, value in request.headers:
        if _drop(name, tokens):
            continue
        if name == b"x-forwarded-for":
            forwarded_for.append(value)
        elif name == b"via":
            via.append(value)
        elif name in (b"x-forwarded-proto", b"x-forwarded-host"):
            continue  # replaced below: a client must not choose these
        elif name == b"host":
            out.append((b"host", backend_authority if policy.host_mode == "rewrite" else value))
        else:
            out.append((name, value))
    if info.host_missing:
        # An HTTP/1.0 client may omit Host; the backend gets an HTTP/1.1 request, which
        # must carry one.
        out.append(
            (
                b"host",
                backend_authority if policy.host_mode == "rewrite" or not info.host else info.host,
            )
        )
    if info.chunked:
        out.append((b"transfer-encoding", b"chunked"))
    if info.upgrade is not None:
        out.append((b"connection", b"upgrade"))
        out.append((b"upgrade", info.upgrade))
    client = client_ip.encode("ascii")
    if forwarded_for and policy.xff_mode == "append":
        forwarded_for.append(client)
        out.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    else:
        out.append((b"x-forwarded-for", client))
    out.append((b"x-forwarded-proto", policy.proto))
    if info.host:
        out.append((b"x-forwarded-host", info.host))
    via.append(_via_entry(request.http_version, policy.via))
    out.append((b"via", b", ".join(via)))
    return out


def _via_entry(http_version: bytes, pseudonym: bytes) -> bytes:
    return http_version + b" " + pseudonym


def downstream_response_headers(
    headers: Sequence[tuple[bytes, bytes]],
    http_version: bytes,
    policy: ForwardingPolicy,
    *,
    upgrade: bool = False,
    close: bool = False,
) -> Headers:
    """The header list sent back to the client: hop-by-hop removed, Via appended.

    Transfer-Encoding is dropped because h11 re-frames the body for the client (chunked
    for HTTP/1.1 when the backend gave no Content-Length, close-delimited for 1.0).
    """
    connection_values = [v for n, v in headers if n == b"connection"]
    # RFC 9112 §6.3: with Transfer-Encoding present, Content-Length is wrong by
    # definition (h11 decodes such a response as chunked); it must not be passed on.
    drop_length = any(n == b"transfer-encoding" for n, _ in headers)
    tokens = _connection_tokens(connection_values) if connection_values else frozenset()
    out: Headers = []
    via: list[bytes] = []
    upgrade_value: bytes | None = None
    for name, value in headers:
        if name == b"upgrade":
            upgrade_value = value
        if _drop(name, tokens) or (drop_length and name == b"content-length"):
            continue
        if name == b"via":
            via.append(value)
        else:
            out.append((name, value))
    if upgrade and upgrade_value is not None:
        out.append((b"connection", b"upgrade"))
        out.append((b"upgrade", upgrade_value))
    elif close:
        out.append((b"connection", b"close"))
    via.append(_via_entry(http_version, policy.via))
    out.append((b"via", b", ".join(via)))
    return out


_PHRASES = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


def reason_phrase(status: int, given: bytes = b"") -> bytes:
    """The backend's reason phrase, or the standard one when it sent none (some servers
    send ``HTTP/1.1 200`` with nothing after the code)."""
    return given or _PHRASES.get(status, b"")


def is_event_stream(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
    return False


def error_response(
    status: int, detail: str, *, extra: Sequence[tuple[bytes, bytes]] = (), close: bool = True
) -> tuple[h11.Response, bytes]:
    """A small text/plain response the proxy sends on its own behalf."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {detail}\n".encode()
    headers: Headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
        *extra,
    ]
    if close:
        headers.append((b"connection", b"close"))
    return h11.Response(status_code=status, headers=headers, reason=phrase.encode()), body


def raw_error_response(
    status: int, detail: str, *, extra: Sequence[tuple[bytes, bytes]] = ()
) -> bytes:
    """The same response serialised without an h11 connection (for connections the proxy
    refuses before parsing anything, e.g. when a worker is full)."""
    response, body = error_response(status, detail, extra=extra)
    head = [b"HTTP/1.1 %d %s\r\n" % (status, response.reason)]
    head.extend(b"%s: %s\r\n" % (name, value) for name, value in response.headers)
    head.append(b"\r\n")
    return b"".join(head) + body


def protocol_error_status(exc: h11.RemoteProtocolError) -> tuple[int, str]:
    """Map an h11 parse error to the status to answer with (431 for oversized heads) and
    a reason fit to send: h11 puts the offending bytes' repr in some messages, which a
    response must never echo."""
    status = exc.error_status_hint
    text = str(exc)
    if "Receive buffer too long" in text or "buffer too long" in text:
        return 431, "request header section too large"
    text = _QUOTED_BYTES.split(text, 1)[0].strip()
    return status, text or "malformed request"


# Where h11 starts quoting bytes: ": b'..'", " bytearray(b'..')", " b\"..\"".
_QUOTED_BYTES = re.compile(r":? (?:bytearray\()?b['\"]")
