"""Era translation the other way: 2026-07-28 (stateless) clients on a route whose backends
speak only the handshake era (``backend_era = "2025-11-25"``). Sans-IO: what the
proxy's upstream sessions are keyed by and hold, the handshake's messages, a request as
the backend gets it, and the backend's answer as the client gets it.

A 2026-07-28 request names no session; a 2025-11-25 backend wants one. The proxy keeps
upstream sessions itself, one per (replica, caller, client): initialized with the client
info and capabilities the request's ``_meta`` declares, reused by every later request
with the same, on the same worker (``UpstreamSessions``, bounded, oldest first out).
A request whose session is not there yet waits while the worker opens it
(``proxy.net.session_opener``: ``initialize``, then ``notifications/initialized``).

- ``server/discover`` is answered by the proxy from the session's initialize result.
- Every other request goes within the session: ``Mcp-Session-Id`` and
  ``MCP-Protocol-Version: 2025-11-25``, its ``_meta`` without the 2026-07-28 envelope
  keys, without ``Mcp-Method``/``Mcp-Name``.
- The answer (held where it is one body): a result gets the ``resultType`` 2026-07-28
  requires, a list its ``ttlMs`` and ``cacheScope`` (the conservative 0 and
  ``private``); a missing resource is -32602 again (2025-11-25 says -32002). A 404 means
  the backend forgot the session: it is dropped, and the next request opens another.
- A client that closes its stream before the answer cancels the request, as 2026-07-28
  has it: the backend is sent ``notifications/cancelled`` within the session.
- Not carried: the capabilities for server-to-client requests (``elicitation``,
  ``sampling``, ``roots``) are not declared upstream, since a request the backend sent
  mid-call would have to become an ``input_required`` answer whose retry, on any
  worker, finds the upstream request still waiting. docs/mcp.md ("Era translation")
  says so. (``subscriptions/listen``: ``proxy.protocol.listen_translation``.)
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Final

import msgspec

from proxy.mcp_routing import event_payloads
from proxy.protocol.eras import (
    CACHEABLE_METHODS,
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    ERROR_STATUS,
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
    INVALID_PARAMS,
    PROTOCOL_VERSION_META_KEY,
    RequestId,
)
from proxy.protocol.mcp import METHOD_HEADER, NAME_HEADER, SESSION_HEADER, VERSION_HEADER
from proxy.protocol.sse import rewrite_events

ENVELOPE_KEYS: Final = (
    PROTOCOL_VERSION_META_KEY,
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    LOG_LEVEL_META_KEY,
)
INITIALIZE_ID: Final = "switchboard-initialize"
MAX_SESSIONS: Final = 4096
"""Upstream sessions a worker keeps; the oldest goes first (the backend expires it)."""
MAX_HANDSHAKE_ANSWER: Final = 1 << 20

_decode = msgspec.json.decode
_encode = msgspec.json.encode

SessionKey = tuple[str, str, str]
"""(replica, caller, client): the backend, who calls, and the client's declared
capabilities and info."""


class UpstreamSession:
    """A handshake-era session the proxy holds with one replica."""

    __slots__ = ("id", "result")

    def __init__(self, session_id: str, result: dict[str, Any]) -> None:
        self.id = session_id
        """The backend's ``Mcp-Session-Id``."""
        self.result = result
        """Its initialize result (``server/discover`` is answered from it)."""


class SessionRefused:
    """The backend would not open a session: the client gets ``status`` and ``message``."""

    __slots__ = ("message", "status")

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


class SessionRequest:
    """What the worker needs to open a session (``Check.SESSION``)."""

    __slots__ = ("backend", "body", "dedicated", "key", "subscribe", "target")

    def __init__(
        self,
        backend: object,
        key: SessionKey,
        target: bytes,
        body: bytes,
        *,
        dedicated: bool = False,
        subscribe: tuple[bytes, ...] = (),
    ) -> None:
        self.backend = backend
        self.key = key
        self.target = target
        """The MCP endpoint's target on the backend."""
        self.body = body
        """The ``initialize`` request."""
        self.dedicated = dedicated
        """A session of the request's own (a listen's: one GET stream per session), not
        the worker's shared one for the key."""
        self.subscribe = subscribe
        """``resources/subscribe`` requests to make within it once it is open."""


class UpstreamSessions:
    """A worker's upstream sessions by key; at most ``limit``, the oldest out first."""

    __slots__ = ("_sessions", "limit")

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self._sessions: OrderedDict[SessionKey, UpstreamSession] = OrderedDict()
        self.limit = limit

    def get(self, key: SessionKey) -> UpstreamSession | None:
        return self._sessions.get(key)

    def put(self, key: SessionKey, session: UpstreamSession) -> None:
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        while len(self._sessions) > self.limit:
            self._sessions.popitem(last=False)

    def forget(self, key: SessionKey, session_id: str) -> None:
        """Drop the session, if it is still the one the key names."""
        session = self._sessions.get(key)
        if session is not None and session.id == session_id:
            del self._sessions[key]

    def __len__(self) -> int:
        return len(self._sessions)


class ClientEnvelope:
    """A 2026-07-28 request's envelope: the client as it declares itself."""

    __slots__ = ("capabilities", "info")

    def __init__(self, capabilities: dict[str, Any], info: dict[str, Any] | None) -> None:
        self.capabilities = capabilities
        self.info = info

    @classmethod
    def of(cls, message: dict[str, Any]) -> ClientEnvelope:
        params = message.get("params")
        meta = params.get("_meta") if isinstance(params, dict) else None
        meta = meta if isinstance(meta, dict) else {}
        capabilities = meta.get(CLIENT_CAPABILITIES_META_KEY)
        info = meta.get(CLIENT_INFO_META_KEY)
        return cls(
            {
                k: v
                for k, v in (capabilities if isinstance(capabilities, dict) else {}).items()
                if k not in WITHHELD_CAPABILITIES
            },
            info if isinstance(info, dict) else None,
        )

    def key(self, replica: str, caller: str) -> SessionKey:
        client = _encode([self.capabilities, self.info])
        return (replica, caller, hashlib.sha256(client).hexdigest()[:32])

    def initialize_body(self) -> bytes:
        params: dict[str, Any] = {
            "protocolVersion": HANDSHAKE_VERSION,
            "capabilities": self.capabilities,
            "clientInfo": self.info or {"name": "switchboard", "version": "0"},
        }
        return _encode(
            {"jsonrpc": "2.0", "id": INITIALIZE_ID, "method": "initialize", "params": params}
        )


INITIALIZED_BODY: Final = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'


def initialize_result(content_type: bytes, body: bytes) -> dict[str, Any] | str:
    """The result of the backend's answer to ``initialize`` (JSON, or an event stream),
    or what is wrong with it."""
    payloads = event_payloads(body) if content_type.startswith(b"text/event-stream") else [body]
    for payload in payloads:
        try:
            message = _decode(payload)
        except msgspec.DecodeError:
            continue
        if not isinstance(message, dict) or message.get("id") != INITIALIZE_ID:
            continue
        result = message.get("result")
        if isinstance(result, dict):
            return result
        error = message.get("error")
        if isinstance(error, dict):
            return f"initialize failed: {error.get('message', 'error')}"
    return "no initialize result in the backend's answer"


def discover_body(request_id: RequestId | None, session: UpstreamSession) -> bytes:
    """The proxy's answer to ``server/discover``, from the session's initialize result."""
    init = session.result
    info = init.get("serverInfo")
    capabilities = init.get("capabilities")
    result: dict[str, Any] = {
        "resultType": "complete",
        "supportedVersions": [MODERN_VERSION],
        "capabilities": capabilities if isinstance(capabilities, dict) else {},
        "ttlMs": 0,
        "cacheScope": "private",
        "_meta": {SERVER_INFO_META_KEY: info if isinstance(info, dict) else {"name": "unknown"}},
    }
    instructions = init.get("instructions")
    if isinstance(instructions, str):
        result["instructions"] = instructions
    return _encode({"jsonrpc": "2.0", "id": request_id, "result": result})


def handshake_form(message: dict[str, Any]) -> bytes:
    """The request as a 2025-11-25 session's message: the envelope keys leave ``_meta``."""
    params = message.get("params")
    if isinstance(params, dict):
        meta = params.get("_meta")
        if isinstance(meta, dict):
            for key in ENVELOPE_KEYS:
                meta.pop(key, None)
            if not meta:
                del params["_meta"]
    return _encode(message)


class ModernAnswer(Translation):
    """A 2026-07-28 client's request within an upstream session, and the backend's
    answer as that client gets it (``proxy.protocol.exchange.AnswerRewrite``)."""

    __slots__ = (
        "_error_code",
        "cancelled",
        "client",
        "json_instead",
        "key",
        "message",
        "method",
        "request_id",
        "session",
        "target",
    )

    def __init__(self, message: dict[str, Any], request_id: RequestId | None, method: str) -> None:
        super().__init__()
        self.message = message
        self.request_id = request_id
        self.method = method
        self.client = ClientEnvelope.of(message)
        self.key: SessionKey | None = None
        self.session: UpstreamSession | None = None
        self.dropped_headers = frozenset({METHOD_HEADER, NAME_HEADER})
        self._error_code: int | None = None
        """The code of the JSON-RPC error the answer carried, if it was one."""
        self.json_instead = False
        """The held answer was a stream of one error event, and goes out as JSON."""
        self.target = b""
        """The MCP endpoint's target on the backend (for the cancellation)."""
        self.cancelled = False

    def within(self, key: SessionKey, session: UpstreamSession, target: bytes = b"") -> bytes:
        """The request body within ``session``; its headers are set here."""
        self.target = target
        self.key = key
        self.session = session
        self.request_headers = (
            (VERSION_HEADER, HANDSHAKE_VERSION.encode()),
            (SESSION_HEADER, session.id.encode("latin-1")),
        )
        return handshake_form(self.message)

    def holds(self, status: int, *, event_stream: bool) -> bool:
        return not event_stream

    def cancellation(self) -> bytes | None:
        """The ``notifications/cancelled`` that tells the 2025-11-25 backend the client
        has gone (2026-07-28: closing the stream is the cancellation), once; None where
        there is nothing to cancel."""
        if self.cancelled or self.session is None or self.request_id is None:
            return None
        self.cancelled = True
        params = {"requestId": self.request_id, "reason": "the client closed its stream"}
        return _encode({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params})

    def stand_in(self) -> bytes | None:
        return None

    def session_lost(self, status: int) -> bool:
        """A 404 to a request within a session: the backend no longer knows it."""
        return status == 404 and self.session is not None

    def rewrite(self, body: bytes, *, event_stream: bool) -> bytes | None:
        self.json_instead = False
        if event_stream:
            # (Priming events, with empty data, dispatch nothing: they do not count.)
            payloads = [p for p in event_payloads(body) if p.strip()]
            if len(payloads) == 1:
                # A whole stream whose one message is the answer: a 2026-07-28 server
                # sends that as JSON, an error with its status (the client reads it so).
                out = self._rewrite_message(payloads[0])
                if self._error_code is not None:
                    self.json_instead = True
                    return out or payloads[0]
            # An error after other events keeps the stream's 200, as a 2026-07-28 server
            # that has begun its stream sends it.
            self._error_code = None
            out = rewrite_events(body, self._rewrite_message)
            self._error_code = None
            return out
        return self._rewrite_message(body)

    def rewrite_relayed(self, events: bytes) -> bytes | None:
        """Events of a stream relayed as it comes: its status and type are sent."""
        self._error_code = None
        return rewrite_events(events, self._rewrite_message)

    def answer_content_type(self) -> bytes | None:
        """The content type of the rewritten answer, where it is not the backend's."""
        return b"application/json" if self.json_instead else None

    def answer_status(self, status: int) -> int:
        """A JSON-RPC error in a JSON answer goes out with the status 2026-07-28 gives
        its code."""
        code = self._error_code
        if status == 200 and code is not None:
            return ERROR_STATUS.get(code, 200)
        return status

    def answer_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return ()

    def _rewrite_message(self, payload: bytes) -> bytes | None:
        message = response_to(payload, self.request_id)
        if message is None:
            return None
        result = message.get("result")
        error = message.get("error")
        if isinstance(result, dict):
            result.setdefault("resultType", "complete")
            if self.method in CACHEABLE_METHODS:
                result.setdefault("ttlMs", 0)
                result.setdefault("cacheScope", "private")
        elif isinstance(error, dict):
            code = error.get("code")
            self._error_code = code if isinstance(code, int) else None
            params = self.message.get("params")
            uri = params.get("uri") if isinstance(params, dict) else None
            if (
                self.method != "resources/read"
                or code not in (RESOURCE_NOT_FOUND, INVALID_PARAMS)
                or (code == INVALID_PARAMS and isinstance(error.get("data"), dict))
            ):
                return None  # the status may change; the bytes need not
            # A resource not found: 2026-07-28 says -32602, with the URI in data (SEP-2164).
            error["code"] = self._error_code = INVALID_PARAMS
            if not isinstance(error.get("data"), dict) and isinstance(uri, str):
                error["data"] = {"uri": uri}
        else:
            return None
        return _encode(message)
