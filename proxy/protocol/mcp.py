"""MCP transport rules the proxy enforces: era detection, header/body agreement, and the
legacy HTTP+SSE `endpoint` rewrite. Plain functions over header lists and Envelopes.

What the spec and the reference SDK (mcp 2.3.0 in .venv; paths under site-packages)
establish, and what this module relies on:

- Eras. 2026-07-28 is "modern" (per-request `_meta` envelope, no initialize, no session);
  2024-11-05 .. 2025-11-25 are "handshake" versions (mcp_types/version.py:
  HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS). The SDK routes on the
  `MCP-Protocol-Version` header alone: absent or a handshake version -> stateful path,
  any other value, unknown ones included -> modern path, so an unknown version gets a
  structured -32022 (server/streamable_http_manager.py `_handle_request`). Without the
  header the spec says assume 2025-03-26 (2025-11-25 transports.mdx, "Protocol Version
  Header"). `initialize` never carries it; its offer is params.protocolVersion.
- The legacy HTTP+SSE transport is a transport, not a version: any handshake version can
  run over it. Its POSTs carry the session in the query (`session_id` in the Python SDK,
  server/sse.py; `sessionId` in the TypeScript SDK) and no Mcp-Session-Id.
- Header agreement (2026-07-28 basic/transports/streamable-http.mdx "Request Metadata",
  "Server Validation"; mcp/shared/inbound.py `classify_inbound_request`): every POST
  carries MCP-Protocol-Version, equal to params._meta["io.modelcontextprotocol/
  protocolVersion"]; `Mcp-Method` equals `method`; `Mcp-Name` equals params.name for
  tools/call and prompts/get, params.uri for resources/read (NAME_BEARING_METHODS), and
  is only checked when the body has that field. Mcp-Name may be `=?base64?...?=`
  (UTF-8, canonical base64, case-sensitive markers), decoded before comparing. A
  missing, repeated (`find_duplicated_routing_header`), malformed or disagreeing header
  is HTTP 400 + JSON-RPC -32020 HeaderMismatch (mcp_types/jsonrpc.py; status table
  ERROR_CODE_HTTP_STATUS). The SDK checks `_meta` first (missing -> -32602) and the
  version header before Mcp-Method; this module keeps that order so answers match.
- Notifications: the 2026-07-28 spec defines no client notifications over HTTP and
  leaves their header requirements undefined; the SDK answers 202 without checking
  Mcp-Method (server/_streamable_http_modern.py `_acknowledge_notification`). Posted
  responses and batches are -32600 at HTTP 400 there (`_INVALID_BODY`).
- server/discover is an ordinary modern request (client/session.py `send_discover`):
  version header + Mcp-Method, no Mcp-Name. Session ids must be visible ASCII 0x21-0x7E
  (server/streamable_http.py SESSION_ID_PATTERN); the header is `mcp-session-id`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final
from urllib.parse import unquote_plus, urljoin, urlsplit

from proxy.protocol.byte_classes import PRINTABLE_ASCII
from proxy.protocol.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    PROTOCOL_VERSION_META_KEY,
    Envelope,
    RequestId,
    error_body,
)

HEADER_MISMATCH: Final = -32020
UNSUPPORTED_PROTOCOL_VERSION: Final = -32022
HANDSHAKE_VERSIONS: Final = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
MODERN_VERSIONS: Final = frozenset({"2026-07-28"})
ASSUMED_VERSION: Final = "2025-03-26"
"""What a request without MCP-Protocol-Version (and not initialize) is taken to speak."""

NAME_BEARING_METHODS: Final[Mapping[str, str]] = MappingProxyType(
    {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
)
_NAME_BEARING: Final = dict(NAME_BEARING_METHODS)  # (a plain dict reads faster)
LEGACY_SESSION_PARAMS: Final = ("sessionId", "session_id")

VERSION_HEADER: Final = b"mcp-protocol-version"
METHOD_HEADER: Final = b"mcp-method"
NAME_HEADER: Final = b"mcp-name"
SESSION_HEADER: Final = b"mcp-session-id"
_NO_META_VERSION = f"params._meta must carry {PROTOCOL_VERSION_META_KEY}"
_ROUTING_HEADERS = frozenset({VERSION_HEADER, METHOD_HEADER, NAME_HEADER})
_SENTINEL = re.compile(r"=\?base64\?(.*)\?=", re.DOTALL)
_URI_SAFE = re.compile(r"[\x21-\x7e]+")


class Era(enum.Enum):
    LEGACY_SSE = "2024-11-05 HTTP+SSE"
    STATEFUL = "2025-11-25"
    """Streamable HTTP with initialize and Mcp-Session-Id (2025-03-26 .. 2025-11-25)."""
    STATELESS = "2026-07-28"


@dataclass(frozen=True, slots=True)
class EraGuess:
    era: Era
    version: str | None
    """The protocol version the request claims, or the one assumed for it."""


@dataclass(frozen=True, slots=True)
class HeaderMismatch:
    """What the proxy answers itself when a 2026-07-28 POST fails the header check."""

    code: int
    message: str
    status: int = 400

    def body(self, request_id: RequestId | None) -> bytes:
        return error_body(request_id, self.code, self.message)


def first_header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


ORIGIN_HEADER: Final = b"origin"
MCP_HEADER_NAMES: Final = frozenset(
    {VERSION_HEADER, METHOD_HEADER, NAME_HEADER, SESSION_HEADER, ORIGIN_HEADER}
)
"""The request headers the MCP rules read."""


class McpHeaders:
    """The request headers the MCP rules read (``MCP_HEADER_NAMES``), every copy of each
    in order, gathered in one pass over a head's headers (the request-head parser
    gathers them while it reads the head). The rules take either this or a header list."""

    __slots__ = ("values",)

    def __init__(self, values: dict[bytes, list[bytes]] | None = None) -> None:
        self.values: dict[bytes, list[bytes]] = values if values is not None else {}

    @classmethod
    def of(cls, headers: Sequence[tuple[bytes, bytes]] | McpHeaders) -> McpHeaders:
        if isinstance(headers, McpHeaders):
            return headers
        values: dict[bytes, list[bytes]] = {}
        for key, value in headers:
            name = key.lower()
            if name in MCP_HEADER_NAMES:
                values.setdefault(name, []).append(value)
        return cls(values)

    def first(self, name: bytes) -> bytes | None:
        found = self.values.get(name)
        return found[0] if found else None


def _has_legacy_session(target: bytes) -> bool:
    try:
        return _target_session(target)[1] is not None
    except EndpointRewriteError:
        return True  # two session parameters: still the legacy transport, and refused later


def detect_era(
    http_method: bytes,
    headers: Sequence[tuple[bytes, bytes]] | McpHeaders,
    envelope: Envelope | None = None,
    target: bytes = b"/",
) -> EraGuess:
    """Which transport era a request belongs to, from its headers, body and target.

    In order: a version header outside the handshake set -> STATELESS (as the SDK: an
    unknown version is the modern path's to reject); a body with the modern `_meta`
    version but no header -> STATELESS (the header check then reports it missing);
    no Mcp-Session-Id and a `sessionId`/`session_id` query -> LEGACY_SSE (a POST to the
    old message endpoint); a GET with neither MCP-Protocol-Version nor Mcp-Session-Id
    -> LEGACY_SSE (opening the old SSE stream; 2025-era clients send one of the two);
    else STATEFUL at the header's version, initialize's offer, or 2025-03-26. These are
    guesses from one request; a route configured for one era should not ask.
    """
    return EraGuess(*era_of(http_method, McpHeaders.of(headers).values, envelope, target))


def era_of(
    http_method: bytes,
    values: dict[bytes, list[bytes]],
    envelope: Envelope | None,
    target: bytes,
) -> tuple[Era, str | None]:
    """``detect_era`` for the request path: ``McpHeaders.values`` in, (era, version) out."""
    version = values.get(VERSION_HEADER)
    if version is not None:
        claimed: str | None = version[0].decode("latin-1")
        if claimed not in HANDSHAKE_VERSIONS:
            return Era.STATELESS, claimed
    elif envelope is not None and envelope.protocol_version and envelope.method != "initialize":
        return Era.STATELESS, envelope.protocol_version
    else:
        claimed = None
    legacy = (target.find(b"?") >= 0 and _has_legacy_session(target)) or (
        http_method == b"GET" and claimed is None
    )
    if legacy and SESSION_HEADER not in values:
        return Era.LEGACY_SSE, claimed
    if claimed is None and envelope is not None and envelope.method == "initialize":
        claimed = envelope.offered_version
    return Era.STATEFUL, claimed or ASSUMED_VERSION


def decode_header_value(value: str) -> str | None:
    """Undo the `=?base64?...?=` sentinel; None for a malformed one (never matches)."""
    match = _SENTINEL.fullmatch(value) if value.startswith("=?base64?") else None
    if match is None:
        return value
    payload = match.group(1)
    try:
        decoded = base64.b64decode(payload, validate=True)
        # validate=True still admits non-zero trailing bits; the encoder never emits them.
        if base64.b64encode(decoded).decode("ascii") != payload:
            return None
        return decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def encode_header_value(value: str) -> str:
    """A value as ``Mcp-Name`` carries it: as it is where it is printable ASCII without
    edge spaces, else in the ``=?base64?...?=`` sentinel (the inverse of
    ``decode_header_value``)."""
    raw = value.encode("utf-8")
    if (
        PRINTABLE_ASCII.holds_only(raw)
        and value == value.strip()
        and not (value.startswith("=?base64?") and value.endswith("?="))
    ):
        return value
    return f"=?base64?{base64.b64encode(raw).decode('ascii')}?="


def _mismatch(message: str) -> HeaderMismatch:
    return HeaderMismatch(HEADER_MISMATCH, f"Header mismatch: {message}")


def _routing_headers(values: dict[bytes, list[bytes]]) -> dict[bytes, str] | HeaderMismatch:
    found: dict[bytes, str] = {}
    for name, raws in values.items():
        if name not in _ROUTING_HEADERS:
            continue
        if len(raws) > 1:
            # First-copy and last-copy readers would disagree about which one counts.
            return _mismatch(f"{name.decode()} header appears more than once")
        if not PRINTABLE_ASCII.holds_only(raws[0]):  # 0x20-0x7E, the spec's safe set
            return _mismatch(f"{name.decode()} header contains invalid characters")
        found[name] = raws[0].decode("ascii")
    return found


def _agree_plainly(values: dict[bytes, list[bytes]], envelope: Envelope) -> bool:
    """The usual request, decided without decoding anything: one copy of each routing
    header, printable ASCII, equal byte for byte to the body's values (and no base64
    Mcp-Name). False is no verdict: the full check decides, and says what is wrong."""
    if envelope.kind != "request" or envelope.non_string:
        return False
    version = values.get(VERSION_HEADER)
    method = values.get(METHOD_HEADER)
    body_version = envelope.protocol_version
    body_method = envelope.method
    if (
        version is None
        or method is None
        or len(version) != 1
        or len(method) != 1
        or body_version is None
        or body_method is None
        or not body_version.isascii()
        or not body_method.isascii()
        or version[0] != body_version.encode()
        or method[0] != body_method.encode()
        or not PRINTABLE_ASCII.holds_only(version[0])
        or not PRINTABLE_ASCII.holds_only(method[0])
    ):
        return False
    name = values.get(NAME_HEADER)
    if name is None:
        key = _NAME_BEARING.get(body_method)
        return key is None or (envelope.name if key == "name" else envelope.uri) is None
    if len(name) != 1 or not PRINTABLE_ASCII.holds_only(name[0]):
        return False
    key = _NAME_BEARING.get(body_method)
    if key is None:
        return True
    body_value = envelope.name if key == "name" else envelope.uri
    if body_value is None:
        return True
    return (
        body_value.isascii()
        and name[0] == body_value.encode()
        and not name[0].startswith(b"=?base64?")
    )


def check_header_body_agreement(
    headers: Sequence[tuple[bytes, bytes]] | McpHeaders, envelope: Envelope
) -> HeaderMismatch | None:
    """For a 2026-07-28 POST: None when headers and body agree, else what to answer.

    Requests: params._meta must carry the protocol version (-32602 otherwise, as the
    SDK), MCP-Protocol-Version must be present and equal it, Mcp-Method present and
    equal to `method`, and for tools/call, prompts/get, resources/read whose body has
    the name / uri, Mcp-Name present and equal after sentinel decoding (a non-string
    body value can never match). Notifications: only a present, contradicting
    Mcp-Method is rejected (requirements are undefined for them). Responses: -32600,
    clients must not post them. Values are compared exactly (they are case-sensitive).
    """
    return header_body_mismatch(McpHeaders.of(headers).values, envelope)


def header_body_mismatch(
    values: dict[bytes, list[bytes]], envelope: Envelope
) -> HeaderMismatch | None:
    """``check_header_body_agreement`` for the request path (``McpHeaders.values``)."""
    if _agree_plainly(values, envelope):
        return None
    found = _routing_headers(values)
    if isinstance(found, HeaderMismatch):
        return found
    if envelope.kind == "response" or envelope.kind == "error":
        return HeaderMismatch(INVALID_REQUEST, "Body must be a single request or notification")
    method_header = found.get(METHOD_HEADER)
    if envelope.kind == "notification":
        if method_header is not None and method_header != envelope.method:
            return _mismatch("Mcp-Method header does not match the body's method")
        return None
    if envelope.protocol_version is None and PROTOCOL_VERSION_META_KEY not in envelope.non_string:
        return HeaderMismatch(INVALID_PARAMS, _NO_META_VERSION)
    version_header = found.get(VERSION_HEADER)
    if version_header is None:
        return _mismatch("MCP-Protocol-Version header is missing")
    if version_header != envelope.protocol_version:
        return _mismatch("MCP-Protocol-Version header does not match params._meta")
    if method_header is None:
        return _mismatch("Mcp-Method header is missing")
    if method_header != envelope.method:
        return _mismatch("Mcp-Method header does not match the body's method")
    key = _NAME_BEARING.get(method_header)
    if key is None:
        return None
    if key in envelope.non_string:
        return _mismatch(f"the body's params.{key} is not a string")
    body_value = envelope.name if key == "name" else envelope.uri
    if body_value is None:
        return None  # the backend rejects the missing field; nothing to route on
    name_header = found.get(NAME_HEADER)
    if name_header is None:
        return _mismatch("Mcp-Name header is missing")
    decoded = decode_header_value(name_header)
    if decoded is None:
        return _mismatch("Mcp-Name header carries a malformed base64 value")
    if decoded != body_value:
        return _mismatch(f"Mcp-Name header does not match the body's params.{key}")
    return None


class EndpointRewriteError(ValueError):
    """An `endpoint` event or message target the proxy cannot map; fail the stream (502)."""


@dataclass(frozen=True, slots=True)
class LegacyEndpoint:
    """A backend's `endpoint` event, resolved: where the client must POST."""

    path: str
    """Absolute path on the backend, dot-segments resolved."""
    query: tuple[str, ...]
    """The query's `&`-separated parameters, as sent."""
    session_index: int
    """Which of them carries the session."""
    session_param: str
    session_id: str
    """The backend's session id: the parameter's value as sent (still percent-encoded)."""


def _find_session_param(params: Sequence[str]) -> tuple[int, str, str] | None:
    """(index, name, raw value) of the one session parameter.

    Names are compared percent-decoded, as the backend's query parser will see them:
    otherwise `session%5Fid=<someone else's>` would ride past the token check.
    """
    found = None
    for index, param in enumerate(params):
        raw_name, _, value = param.partition("=")
        name = unquote_plus(raw_name)
        if name in LEGACY_SESSION_PARAMS:
            if found is not None:
                raise EndpointRewriteError("more than one session parameter")
            found = (index, name, value)
    return found


def _target_session(target: bytes) -> tuple[list[str], tuple[int, str, str] | None]:
    query = target.partition(b"?")[2].decode("latin-1")
    params = query.split("&") if query else []
    return params, _find_session_param(params)


def parse_endpoint_event(data: bytes, *, sse_path: str = "/") -> LegacyEndpoint:
    """Resolve an `endpoint` event's data (a URI reference) and find its session.

    Relative references resolve against `sse_path`, the backend path the SSE stream was
    opened on, as the client would against the SSE URL. Scheme and authority of an
    absolute URI are dropped: the client must come back through the proxy whatever
    public URL the backend believes it has. The fragment is dropped.
    """
    text = data.decode("latin-1").strip()
    if _URI_SAFE.fullmatch(text) is None:
        raise EndpointRewriteError("endpoint is not a visible-ASCII URI")
    parts = urlsplit(urljoin("http://backend" + sse_path, text))
    # The proxy refuses these in request paths (http1._check_path); WHATWG URL parsers
    # also read a backslash as a slash, so "/\host" would leave the origin.
    if "\\" in parts.path or any(
        seg.lower().replace("%2e", ".") in (".", "..") for seg in parts.path.split("/")
    ):
        raise EndpointRewriteError("endpoint path has a dot-segment or a backslash")
    params = parts.query.split("&") if parts.query else []
    found = _find_session_param(params)
    if found is None:
        raise EndpointRewriteError("endpoint has no sessionId / session_id parameter")
    index, name, value = found
    if not value:
        raise EndpointRewriteError("endpoint session parameter is empty")
    return LegacyEndpoint(parts.path or "/", tuple(params), index, name, value)


def rewrite_endpoint_event(
    data: bytes,
    proxy_prefix: str,
    session_token: str,
    *,
    backend_prefix: str = "",
    sse_path: str = "/",
) -> bytes:
    """The `endpoint` event data the client gets: same POST target seen through the proxy.

    The resolved backend path must start with `backend_prefix` (on a segment boundary);
    that prefix is replaced by `proxy_prefix`, so `Route.upstream_target` maps the
    result back to the backend's path. The session parameter's value becomes
    `session_token`; other parameters and their order stay as sent. The result is an
    absolute path reference (`/prefix/messages?sessionId=<token>`), which clients
    resolve against the SSE URL's origin, the proxy's.
    """
    endpoint = parse_endpoint_event(data, sse_path=sse_path)
    path, base = endpoint.path, backend_prefix.rstrip("/")
    if base and not (path == base or path.startswith(base + "/")):
        raise EndpointRewriteError(f"endpoint {path!r} is outside {backend_prefix!r}")
    path = proxy_prefix.rstrip("/") + (path[len(base) :] or "/")
    if path.startswith("//"):
        # A network-path reference: the client would take the token to another host.
        raise EndpointRewriteError(f"endpoint path {path!r} would name a host")
    params = list(endpoint.query)
    params[endpoint.session_index] = f"{endpoint.session_param}={session_token}"
    return f"{path}?{'&'.join(params)}".encode("ascii")


def legacy_session_token(target: bytes) -> str | None:
    """The proxy token in a legacy message POST's query, None when there is none."""
    found = _target_session(target)[1]
    return None if found is None else found[2]


def restore_message_target(target: bytes, backend_session_id: str) -> bytes:
    """A legacy message POST's target with the proxy token swapped back for the backend's."""
    params, found = _target_session(target)
    if found is None:
        raise EndpointRewriteError("message target has no session parameter")
    params[found[0]] = f"{found[1]}={backend_session_id}"
    return target.partition(b"?")[0] + b"?" + "&".join(params).encode("latin-1")
