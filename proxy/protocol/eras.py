"""What the two MCP eras require of a message, as the era translations need it
(``proxy.protocol.era_translation``: handshake-era clients on 2026-07-28 backends;
``proxy.protocol.upstream_sessions``: 2026-07-28 clients on 2025-11-25 backends): the
2026-07-28 envelope's ``_meta`` keys, the rules a 2026-07-28 server applies before a
request reaches a handler, and what every translated request carries. Sans-IO.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from mypy_extensions import mypyc_attr

from proxy.protocol.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    PROTOCOL_VERSION_META_KEY,
    RequestId,
    error_body,
)
from proxy.protocol.mcp import HEADER_MISMATCH, UNSUPPORTED_PROTOCOL_VERSION

MODERN_VERSION: Final = "2026-07-28"
HANDSHAKE_VERSION: Final = "2025-11-25"
"""The handshake era's latest revision: what upstream sessions speak, and what a
translated session settles on when the client offers no version we know."""
CLIENT_INFO_META_KEY: Final = "io.modelcontextprotocol/clientInfo"
CLIENT_CAPABILITIES_META_KEY: Final = "io.modelcontextprotocol/clientCapabilities"
SERVER_INFO_META_KEY: Final = "io.modelcontextprotocol/serverInfo"
LOG_LEVEL_META_KEY: Final = "io.modelcontextprotocol/logLevel"
SUBSCRIPTION_ID_META_KEY: Final = "io.modelcontextprotocol/subscriptionId"
RESOURCE_NOT_FOUND: Final = -32002
"""2025-11-25's code for a resource the server does not have."""
WITHHELD_CAPABILITIES: Final = ("elicitation", "sampling", "roots")
"""Client capabilities for server-to-client requests, which a translated session cannot
carry (docs/mcp.md, "What translation does not carry")."""
CACHEABLE_METHODS: Final = frozenset(
    {"tools/list", "prompts/list", "resources/list", "resources/templates/list", "resources/read"}
)
"""Methods whose 2026-07-28 results carry ``ttlMs`` and ``cacheScope``."""
REMOVED_METHODS: Final = frozenset(
    {"initialize", "ping", "logging/setLevel", "resources/subscribe", "resources/unsubscribe"}
)
"""Handshake-era methods 2026-07-28 removed: a 2026-07-28 request of one is refused
(404, -32601) as a 2026-07-28 server refuses it, not sent into the session."""
MISSING_REQUIRED_CLIENT_CAPABILITY: Final = -32021
ERROR_STATUS: Final = {
    PARSE_ERROR: 400,
    INVALID_REQUEST: 400,
    INVALID_PARAMS: 400,
    HEADER_MISMATCH: 400,
    MISSING_REQUIRED_CLIENT_CAPABILITY: 400,
    UNSUPPORTED_PROTOCOL_VERSION: 400,
    METHOD_NOT_FOUND: 404,
}
"""The HTTP status 2026-07-28 gives a JSON-RPC error (the reference SDK's table;
-32603 and unlisted codes: 200)."""


_decode = msgspec.json.decode


def refusal(message: dict[str, Any], request_id: RequestId | None) -> tuple[int, bytes] | None:
    """What a 2026-07-28 server answers a request it will not serve — a method the
    revision removed (404 -32601), a ``_meta`` without the envelope's client
    capabilities (400 -32602), a protocol version it does not speak (400 -32022) — as
    (status, body); None for a request that goes within a session."""
    method = message.get("method")
    if method in REMOVED_METHODS:
        return 404, error_body(request_id, METHOD_NOT_FOUND, "Method not found")
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    if CLIENT_CAPABILITIES_META_KEY not in meta:
        return 400, error_body(
            request_id,
            INVALID_PARAMS,
            f"params._meta is missing the required envelope key(s): {CLIENT_CAPABILITIES_META_KEY}",
        )
    version = meta.get(PROTOCOL_VERSION_META_KEY)
    if version != MODERN_VERSION:
        data = {"supported": [MODERN_VERSION], "requested": version}
        unsupported = "Unsupported protocol version"
        return 400, error_body(request_id, UNSUPPORTED_PROTOCOL_VERSION, unsupported, data)
    return None


@mypyc_attr(allow_interpreted_subclasses=True)
class Translation:
    """What every translated request carries, whichever way it is translated: the MCP
    headers its upstream request gets in place of the client's, and those it loses."""

    __slots__ = ("dropped_headers", "request_headers")

    upstream_method: bytes | None = None
    """The upstream request's method where it is not the client's."""

    def __init__(self) -> None:
        self.request_headers: tuple[tuple[bytes, bytes], ...] = ()
        self.dropped_headers: frozenset[bytes] = frozenset()

    def stream_prelude(self) -> bytes:
        """Events of the proxy's own that open a relayed answer stream."""
        return b""

    def rewrite(self, body: bytes, *, event_stream: bool) -> bytes | None:
        """The client's copy of the answer's bytes (whole events where
        ``event_stream``), or None where they need no change."""
        raise NotImplementedError

    def rewrite_relayed(self, events: bytes) -> bytes | None:
        """The client's copy of whole events of a stream relayed as it comes."""
        return self.rewrite(events, event_stream=True)


def response_to(payload: bytes, request_id: RequestId | None) -> dict[str, Any] | None:
    """``payload`` decoded, if it is the JSON-RPC response (or error) to ``request_id``."""
    try:
        message = _decode(payload)
    except msgspec.DecodeError:
        return None
    if not isinstance(message, dict) or message.get("id") != request_id:
        return None
    return message
