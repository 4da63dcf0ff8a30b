"""JSON-RPC 2.0 envelopes, decoded just enough to route: bodies stay msgspec.Raw.

The proxy needs `jsonrpc`, `id`, `method`, and the few params MCP mirrors into headers
(`name`, `uri`, `_meta["io.modelcontextprotocol/protocolVersion"]`, initialize's
`protocolVersion`). Everything else is kept as `msgspec.Raw`, the exact bytes of the
value, so nothing is re-encoded on the way through.

Cost (timeit, best of 15 x 100k, Python 3.11, msgspec 0.22, a shared 2-core dev box):
`decode_message` on a typical 2026-07-28 `tools/call` (337 bytes: name, arguments,
`_meta` with clientInfo and capabilities) ~1.5 µs; a 2025-era `tools/call` (144 bytes)
~1.1 µs; a result response (100 bytes) ~0.6 µs; `error_body` ~0.3 µs. json.loads alone
takes 3-4 µs on the same bodies. About 0.4 µs of a request is the second, params pass.

Batches: JSON-RPC 2.0 allows an array of messages; MCP allowed them only in 2025-03-26
(changelog: added by PR #228, removed by PR #416 in 2025-06-18). 2025-11-25 keeps "the
body of the POST request MUST be a single JSON-RPC request, notification, or response",
2026-07-28 "a single JSON-RPC request or notification"; 2024-11-05 never had them, and
the reference SDK (mcp 2.3, server/streamable_http.py, server/_streamable_http_modern.py)
rejects an array body on every path. So a batch raises `JsonRpcDecodeError` with
`batch=True` and code -32600; where the request is of a 2025-03-26 session,
``proxy.mcp_routing`` decodes it with `decode_batch` instead and forwards it.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from msgspec import UNSET, Raw

from proxy.protocol.jsonrpc_structs import (
    PROTOCOL_VERSION_META_KEY,
    Envelope,
    ErrorObject,
    ErrorResponse,
    Kind,
    RequestId,
    Wire,
    any_decoder,
    array_decoder,
    encoder,
    params_decoder,
    probe_decoder,
    wire_decoder,
)

__all__ = [
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "PROTOCOL_VERSION_META_KEY",
    "Envelope",
    "JsonRpcDecodeError",
    "Kind",
    "RequestId",
    "decode_batch",
    "decode_message",
    "error_body",
    "response_id",
]

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603


# The string fields lifted out of params; a present but non-string value is named in
# Envelope.non_string so MCP rules can tell "absent" from "wrong type".
_LIFTED = ("name", "uri", "protocolVersion", PROTOCOL_VERSION_META_KEY)


class JsonRpcDecodeError(Exception):
    """A body that is not one valid JSON-RPC message; answer with `code` (and `id`)."""

    def __init__(
        self, code: int, message: str, *, id: RequestId | None = None, batch: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id
        self.batch = batch


_WHITESPACE = b" \t\r\n"
_OPEN_BRACE = ord("{")
_ARRAY_OR_NULL = (ord("["), ord("n"))  # a Raw starts at its value's first byte


def _lenient_params(raw: Raw) -> tuple[dict[str, str | None], frozenset[str]]:
    """Slow path when a lifted field has the wrong type: decode params generically."""
    params = any_decoder.decode(raw)
    values: dict[str, str | None] = {}
    bad: set[str] = set()
    meta = params.get("_meta")
    sources = {key: params.get(key) for key in _LIFTED[:3]}
    if meta is not None and not isinstance(meta, dict):
        bad.add("_meta")
    elif meta is not None:
        sources[PROTOCOL_VERSION_META_KEY] = meta.get(PROTOCOL_VERSION_META_KEY)
    for key, value in sources.items():
        if isinstance(value, str):
            values[key] = value
        elif value is not None:
            bad.add(key)
    return values, frozenset(bad)


def _request(kind: Kind, request_id: RequestId | None, method: str, params: Raw) -> Envelope:
    if not params:
        return Envelope(kind, request_id, method, None, None, None)
    first = memoryview(params)[0]
    if first != _OPEN_BRACE:
        # Null or by-position params: nothing to lift. Scalars are not params.
        if first not in _ARRAY_OR_NULL:
            raise JsonRpcDecodeError(INVALID_REQUEST, "params must be an object", id=request_id)
        return Envelope(kind, request_id, method, params, None, None)
    try:
        p = params_decoder.decode(params)
    except msgspec.ValidationError:
        values, bad = _lenient_params(params)
        return Envelope(
            kind,
            request_id,
            method,
            params,
            None,
            None,
            name=values.get("name"),
            uri=values.get("uri"),
            protocol_version=values.get(PROTOCOL_VERSION_META_KEY),
            offered_version=values.get("protocolVersion"),
            non_string=bad,
        )
    meta = p.meta
    version = traceparent = None
    if meta is not None:
        version, traceparent = meta.version, meta.traceparent
    return Envelope(
        kind,
        request_id,
        method,
        params,
        None,
        None,
        p.name,
        p.uri,
        version,
        p.offered,
        traceparent=traceparent,
    )


def _classify(wire: Wire) -> Envelope:
    # (Each member read once: a Struct's attribute is a lookup, not a field access.)
    if wire.jsonrpc != "2.0":
        raise JsonRpcDecodeError(INVALID_REQUEST, 'jsonrpc must be "2.0"')
    wire_id = wire.id
    method = wire.method
    result = wire.result
    error = wire.error
    request_id = None if wire_id is UNSET else wire_id
    if method is not UNSET:
        if result or error:
            raise JsonRpcDecodeError(INVALID_REQUEST, "request with result or error", id=request_id)
        if wire_id is UNSET:
            return _request("notification", None, method, wire.params)
        if wire_id is None:
            # JSON-RPC discourages null ids; MCP forbids them (ids are strings or integers).
            raise JsonRpcDecodeError(INVALID_REQUEST, "request id must not be null")
        return _request("request", wire_id, method, wire.params)
    if wire_id is UNSET:
        raise JsonRpcDecodeError(INVALID_REQUEST, "missing method")
    if bool(result) == bool(error):
        raise JsonRpcDecodeError(
            INVALID_REQUEST, "response needs exactly one of result and error", id=request_id
        )
    if not result:
        return Envelope("error", wire_id, None, None, None, error)
    if wire_id is None:
        raise JsonRpcDecodeError(INVALID_REQUEST, "result with null id")
    return Envelope("response", wire_id, None, None, result, None)


def _reject_array(body: bytes) -> JsonRpcDecodeError:
    try:
        items = array_decoder.decode(body)
    except msgspec.DecodeError:
        return JsonRpcDecodeError(PARSE_ERROR, "Parse error")
    return JsonRpcDecodeError(
        INVALID_REQUEST, f"batch of {len(items)} messages not supported", batch=True
    )


def decode_batch(body: bytes) -> tuple[Envelope, ...]:
    """Decode a JSON-RPC batch (an array of messages, 2025-03-26 only); raise
    JsonRpcDecodeError for an empty array or a member that is not one message."""
    try:
        items = array_decoder.decode(body.lstrip(_WHITESPACE))
    except msgspec.DecodeError:
        raise JsonRpcDecodeError(PARSE_ERROR, "Parse error") from None
    if not items:
        raise JsonRpcDecodeError(INVALID_REQUEST, "empty batch")
    envelopes = []
    for item in items:
        member = bytes(item)
        if member[:1] != b"{":
            raise JsonRpcDecodeError(INVALID_REQUEST, "a batch member is not a JSON-RPC message")
        envelopes.append(decode_message(member))
    return tuple(envelopes)


def decode_message(body: bytes) -> Envelope:
    """Decode one JSON-RPC message; raise JsonRpcDecodeError with the code to answer.

    -32700 for bytes that are not JSON (or not UTF-8); -32600 for JSON that is not one
    message: not an object, `jsonrpc` other than "2.0", neither method nor id, both
    result and error, a request with a null id, scalar params, or a batch (`batch=True`).
    Duplicate keys resolve last-wins, as in Python's json, pydantic-core and JSON.parse.
    """
    if body[:1] != b"{":
        stripped = body.lstrip(_WHITESPACE)
        if stripped[:1] == b"[":
            raise _reject_array(stripped)
    try:
        if not body.isascii():
            # msgspec skips unread strings without checking their UTF-8; the backend won't.
            body.decode("utf-8")
        wire = wire_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise JsonRpcDecodeError(INVALID_REQUEST, f"Invalid request: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise JsonRpcDecodeError(PARSE_ERROR, "Parse error") from None
    return _classify(wire)


def response_id(payload: bytes) -> int | str | None:
    """The id of a JSON-RPC response (result or error), None for anything else."""
    try:
        message = probe_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not message.result and not message.error:
        return None
    return message.id


def error_body(id: RequestId | None, code: int, message: str, data: Any = None) -> bytes:
    """A JSON-RPC error response; `data` is left out when None, spliced in as-is if Raw."""
    error = ErrorObject(code, message, UNSET if data is None else data)
    return encoder.encode(ErrorResponse("2.0", id, error))
