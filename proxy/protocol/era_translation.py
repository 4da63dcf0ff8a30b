"""Era translation at the edge: a handshake-era client (2025-03-26, 2025-06-18,
2025-11-25 Streamable HTTP) on a route whose backends speak only 2026-07-28
(``backend_era = "2026-07-28"``). Sans-IO: a decoded request in, the request the backend
gets (or the proxy's own answer) out; a held answer's bytes in, the client's out.

The session lives at the proxy and in its token, nowhere else. ``initialize`` goes to the
backend as ``server/discover``; its result becomes the initialize result, and the proxy
mints the ``Mcp-Session-Id``: a signed token (``proxy.protocol.session_token``, replica
``TRANSLATED``) that carries the client's state — the negotiated version, its
capabilities, its name and version — so that any worker of any proxy with the same
session keys translates the session's later requests with no shared state. Each later
request gets the 2026-07-28 form: ``params._meta`` with the protocol version, client
capabilities and client info, and the ``MCP-Protocol-Version``, ``Mcp-Method`` and
``Mcp-Name`` headers agreeing with it; the session id does not go upstream.

What the proxy answers itself: ``ping`` and ``logging/setLevel`` (empty results: the
backend has no session to set a level on), every notification and response a client
posts (202: there is no session upstream to deliver one to), ``DELETE`` (the session
ends with its token), and the session's ``GET`` stream (405, which the 2025-11-25
transport allows a server to answer: the translated session has no standalone stream).

The answer: the fields 2025-11-25 does not know (``resultType``, ``ttlMs``,
``cacheScope``, the server info in ``_meta``) leave results; a resource the backend does
not have is -32002 again (2026-07-28 says -32602); a JSON-RPC error that 2026-07-28 sends
with a 4xx or 5xx status goes out with 200, as a handshake-era server answers it (a 404
would tell the client its session is gone).

What the translated session does not offer, so that a correct client never asks for it:
the capabilities the client declares for server-to-client requests (``elicitation``,
``sampling``, ``roots``) are not passed on — a 2026-07-28 backend would answer with an
``input_required`` result, whose questions the proxy cannot carry to the client and its
answers back to a waiting request on another connection, possibly another worker — and
the initialize result offers no ``listChanged`` or ``subscribe``, which need the
session's GET stream. docs/mcp.md ("Era translation") lists this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import msgspec

from proxy.mcp_routing import SESSION_NOT_FOUND
from proxy.protocol.eras import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    HANDSHAKE_VERSION,
    LOG_LEVEL_META_KEY,
    MODERN_VERSION,
    RESOURCE_NOT_FOUND,
    SERVER_INFO_META_KEY,
    WITHHELD_CAPABILITIES,
    Translation,
    response_to,
)
from proxy.protocol.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    PROTOCOL_VERSION_META_KEY,
    Envelope,
    RequestId,
    error_body,
)
from proxy.protocol.mcp import (
    HANDSHAKE_VERSIONS,
    METHOD_HEADER,
    NAME_BEARING_METHODS,
    NAME_HEADER,
    SESSION_HEADER,
    VERSION_HEADER,
    encode_header_value,
)
from proxy.protocol.session_token import MAX_TRANSLATED_STATE_BYTES
from proxy.protocol.sse import rewrite_events

if TYPE_CHECKING:
    from proxy.protocol.exchange import AnswerRewrite

MODERN_RESULT_FIELDS: Final = ("resultType", "ttlMs", "cacheScope")
ANSWERED_HERE: Final = frozenset({"ping", "logging/setLevel"})
MISSING_SESSION: Final = "Bad Request: Missing session ID"
"""The reference SDK's words for a handshake-era request before ``initialize``."""
_CLIENT_INFO_FIELDS: Final = ("name", "title", "version")
_CLIENT_SESSION_HEADERS: Final = frozenset({SESSION_HEADER, b"last-event-id"})
"""The session stays at the proxy: its id and resumption point do not go upstream."""
_KEPT_STATUSES: Final = frozenset({401, 403, 407, 429})
"""Statuses that mean something to the client beyond the JSON-RPC error they carry."""

_decode = msgspec.json.decode
_encode = msgspec.json.encode


class ClientState(msgspec.Struct, array_like=True, frozen=True):
    """What a translated session's token carries: the version agreed with the client,
    and what each request upstream must say of the client."""

    version: str
    capabilities: dict[str, Any]
    info: dict[str, Any] | None = None


_state_decoder = msgspec.json.Decoder(ClientState)


def decode_state(text: str) -> ClientState | None:
    """The state in a translated session's token; None if it is not one."""
    try:
        return _state_decoder.decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


class LocalAnswer:
    """The proxy answers the request itself; nothing goes upstream."""

    __slots__ = ("body", "headers", "reason", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        reason: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self.status = status
        self.body = body
        self.reason = reason
        """Why it was refused (for the access line); None for an answer."""
        self.headers = headers


class Upstream:
    """The request as the backend gets it, and how its answer is translated back."""

    __slots__ = ("answer", "body", "headers")

    def __init__(
        self, body: bytes, headers: tuple[tuple[bytes, bytes], ...], answer: AnswerTranslation
    ) -> None:
        self.body = body
        self.headers = headers
        """MCP headers set on the upstream request (replacing the client's)."""
        self.answer = answer


def translate(
    envelope: Envelope, body: bytes, state_text: str | None, mint: Callable[[str], str]
) -> LocalAnswer | Upstream:
    """One handshake-era message of a translated session (``state_text`` from its token,
    None before ``initialize``); ``mint`` signs a new session's token."""
    kind = envelope.kind
    request_id = envelope.id
    if kind != "request":
        # Notifications (initialized, cancelled, roots changed) and responses: there is
        # no session upstream to deliver them to.
        return LocalAnswer(202)
    method = envelope.method or ""
    if method == "initialize":
        return _initialize(request_id, body, mint)
    if state_text is None:
        return LocalAnswer(
            400,
            error_body(request_id, INVALID_REQUEST, MISSING_SESSION),
            "request before initialize",
        )
    state = decode_state(state_text)
    if state is None:
        return LocalAnswer(404, error_body(request_id, INVALID_REQUEST, SESSION_NOT_FOUND))
    if method in ANSWERED_HERE:
        return LocalAnswer(200, _result_body(request_id, {}))
    try:
        message = _decode(body)
    except msgspec.DecodeError:
        return LocalAnswer(400, error_body(request_id, INVALID_REQUEST, "invalid JSON"), "bad body")
    params = message.get("params") if isinstance(message, dict) else None
    if params is None:
        params = message["params"] = {}
    if not isinstance(params, dict):
        return LocalAnswer(
            200, error_body(request_id, INVALID_PARAMS, "params must be an object"), "bad params"
        )
    meta = params.get("_meta")
    if not isinstance(meta, dict):
        meta = params["_meta"] = {}
    meta.update(_envelope_meta(state))
    headers = [(VERSION_HEADER, MODERN_VERSION.encode()), (METHOD_HEADER, method.encode())]
    name_key = NAME_BEARING_METHODS.get(method)
    name = params.get(name_key) if name_key is not None else None
    if isinstance(name, str):
        headers.append((NAME_HEADER, encode_header_value(name).encode("ascii")))
    return Upstream(_encode(message), tuple(headers), AnswerTranslation(request_id, method))


def _initialize(
    request_id: RequestId | None, body: bytes, mint: Callable[[str], str]
) -> LocalAnswer | Upstream:
    message = _decode(body)
    params = message.get("params") if isinstance(message, dict) else None
    if not isinstance(params, dict):
        params = {}
    offered = params.get("protocolVersion")
    version = offered if offered in HANDSHAKE_VERSIONS else HANDSHAKE_VERSION
    capabilities = params.get("capabilities")
    if not isinstance(capabilities, dict):
        capabilities = {}
    capabilities = {k: v for k, v in capabilities.items() if k not in WITHHELD_CAPABILITIES}
    info = params.get("clientInfo")
    kept_info = (
        {k: info[k] for k in _CLIENT_INFO_FIELDS if isinstance(info.get(k), str)}
        if isinstance(info, dict)
        else None
    )
    state = ClientState(version, capabilities, kept_info or None)
    state_text = _encode(state).decode("utf-8")
    if len(state_text.encode("utf-8")) > MAX_TRANSLATED_STATE_BYTES:
        return LocalAnswer(
            400,
            error_body(
                request_id,
                INVALID_PARAMS,
                f"client capabilities too large to carry in a session "
                f"({MAX_TRANSLATED_STATE_BYTES} bytes at most)",
            ),
            "client capabilities too large for a translated session",
        )
    discover = {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "server/discover",
        "params": {"_meta": _envelope_meta(state)},
    }
    headers = ((VERSION_HEADER, MODERN_VERSION.encode()), (METHOD_HEADER, b"server/discover"))
    answer = AnswerTranslation(request_id, "initialize", version=version, token=mint(state_text))
    return Upstream(_encode(discover), headers, answer)


def _envelope_meta(state: ClientState) -> dict[str, Any]:
    meta: dict[str, Any] = {
        PROTOCOL_VERSION_META_KEY: MODERN_VERSION,
        CLIENT_CAPABILITIES_META_KEY: state.capabilities,
        # A handshake-era server sends the log messages it likes until the client sets a
        # level; a 2026-07-28 one sends none unless the request names one.
        LOG_LEVEL_META_KEY: "debug",
    }
    if state.info is not None:
        meta[CLIENT_INFO_META_KEY] = state.info
    return meta


def _result_body(request_id: RequestId | None, result: dict[str, Any]) -> bytes:
    return _encode({"jsonrpc": "2.0", "id": request_id, "result": result})


class AnswerTranslation(Translation):
    """The backend's answer to one translated request, as the handshake-era client
    gets it. Held until whole where it is one JSON body (or a whole event stream), as
    ``proxy.protocol.upstream_side`` holds rewritten answers."""

    __slots__ = (
        "_answered",
        "_session_granted",
        "inner",
        "method",
        "request_id",
        "token",
        "version",
    )

    def __init__(
        self,
        request_id: RequestId | None,
        method: str,
        *,
        version: str = HANDSHAKE_VERSION,
        token: str | None = None,
    ) -> None:
        super().__init__()
        self.dropped_headers = _CLIENT_SESSION_HEADERS
        self.request_id = request_id
        self.method = method
        self.version = version
        self.token = token
        """initialize: the session id the proxy minted, sent with a successful answer."""
        self._answered = False
        self._session_granted = False
        self.inner: AnswerRewrite | None = None
        """A rewrite applied first (the caller's tool list, ``proxy.protocol.tool_lists``)."""

    def holds(self, status: int, *, event_stream: bool) -> bool:
        """Every answer but an event stream (its events go as they come) is held."""
        inner = self.inner
        return (
            not event_stream
            or self.method == "initialize"
            or (inner is not None and inner.holds(status, event_stream=event_stream))
        )

    def stand_in(self) -> bytes | None:
        return self.inner.stand_in() if self.inner is not None else None

    def rewrite(self, body: bytes, *, event_stream: bool) -> bytes | None:
        """The client's copy of a held answer, or None where it needs no change."""
        inner = self.inner
        if inner is not None:
            body = inner.rewrite(body, event_stream=event_stream) or body
        out = (
            rewrite_events(body, self._rewrite_message)
            if event_stream
            else self._rewrite_message(body)
        )
        if out is None and inner is not None:
            return body
        return out

    def answer_status(self, status: int) -> int:
        """A JSON-RPC answer to the request goes out with 200, whatever status
        2026-07-28 gave it (a 404 would tell the client its session is gone)."""
        if self._answered and status >= 400 and status not in _KEPT_STATUSES:
            return 200
        return status

    def answer_content_type(self) -> bytes | None:
        return None

    def answer_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        if self._session_granted and self.token is not None:
            return ((b"mcp-session-id", self.token.encode("ascii")),)
        return ()

    def _rewrite_message(self, payload: bytes) -> bytes | None:
        message = response_to(payload, self.request_id)
        if message is None:
            return None  # a notification on the way, or not JSON-RPC: as it came
        result = message.get("result")
        error = message.get("error")
        if isinstance(result, dict):
            self._answered = True
            if self.method == "initialize":
                message["result"] = self._initialize_result(result)
                self._session_granted = True
            elif result.get("resultType") == "input_required":
                del message["result"]
                message["error"] = {
                    "code": INTERNAL_ERROR,
                    "message": "the server asked the client for input (elicitation, sampling "
                    "or roots), which a translated 2025-11-25 session cannot carry",
                }
            else:
                _strip_modern_fields(result)
        elif isinstance(error, dict):
            self._answered = True
            if (
                self.method == "resources/read"
                and error.get("code") == INVALID_PARAMS
                and isinstance(error.get("data"), dict)
                and "uri" in error["data"]
            ):
                error["code"] = RESOURCE_NOT_FOUND
        else:
            return None
        return _encode(message)

    def _initialize_result(self, discovered: dict[str, Any]) -> dict[str, Any]:
        capabilities = discovered.get("capabilities")
        offered: dict[str, Any] = {}
        if isinstance(capabilities, dict):
            for name, value in capabilities.items():
                if isinstance(value, dict):
                    # No GET stream: no list-changed or resource-updated notifications.
                    value = {
                        k: v for k, v in value.items() if k not in ("listChanged", "subscribe")
                    }
                offered[name] = value
        meta = discovered.get("_meta")
        info = meta.get(SERVER_INFO_META_KEY) if isinstance(meta, dict) else None
        result: dict[str, Any] = {
            "protocolVersion": self.version,
            "capabilities": offered,
            "serverInfo": info if isinstance(info, dict) else {"name": "unknown", "version": ""},
        }
        instructions = discovered.get("instructions")
        if isinstance(instructions, str):
            result["instructions"] = instructions
        return result


def _strip_modern_fields(result: dict[str, Any]) -> None:
    for field in MODERN_RESULT_FIELDS:
        result.pop(field, None)
    meta = result.get("_meta")
    if isinstance(meta, dict):
        meta.pop(SERVER_INFO_META_KEY, None)
        if not meta:
            del result["_meta"]
