"""Pure decisions for MCP routes: which era, which replica, what to rewrite, what to refuse.

Given one request (method, target, headers, body) and the route's session tokens, say
where it goes and what changes on the wire, or how to refuse it. No I/O: the connection
driver (``proxy.net.exchange``) acts on the decision.

Session affinity without shared state: the proxy answers ``initialize`` with its own
``Mcp-Session-Id``, a signed token carrying the replica's id and the backend's own
session id (``proxy.protocol.session_token``). Any worker of any proxy with the same keys
routes a later request of that session to the same replica and restores the backend's
id, with no lookup. The legacy 2024-11-05 transport gets the same treatment through the
``session_id`` query parameter of its message endpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.labels import (
    HTTP_METHOD_LABELS,
    MCP_METHOD_LABELS,
    http_method_label,
    mcp_method_label,
)
from proxy.protocol.jsonrpc import (
    INVALID_REQUEST,
    Envelope,
    JsonRpcDecodeError,
    RequestId,
    decode_batch,
    decode_message,
    error_body,
)
from proxy.protocol.mcp import (
    ASSUMED_VERSION,
    ORIGIN_HEADER,
    SESSION_HEADER,
    VERSION_HEADER,
    EndpointRewriteError,
    Era,
    McpHeaders,
    era_of,
    header_body_mismatch,
    legacy_session_token,
    restore_message_target,
)
from proxy.protocol.session_token import (
    TRANSLATED,
    InvalidSessionToken,
    SessionClaims,
    SessionTokens,
)

SESSION_NOT_FOUND = "Session not found"  # the reference SDK's wording, code -32600, 404


class McpRefusal(Exception):
    """The proxy answers this request itself with a JSON-RPC error."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        request_id: RequestId | None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.headers = tuple(headers)

    def body(self) -> bytes:
        return error_body(self.request_id, self.code, self.message)


@dataclass(slots=True, init=False)
class McpDecision:
    """How one MCP request is routed. (Its own ``__init__``: the one ``dataclass`` writes
    would run as plain Python, once per request.)"""

    era: Era
    envelope: Envelope | None
    replica: str | None
    """The replica this request must go to (its session's), or None to pick one."""
    backend_session: str | None = None
    """The backend's own session id, to restore in Mcp-Session-Id."""
    target: bytes | None = None
    """A rewritten target (legacy message endpoint), or None to keep it."""
    issue_session: bool = False
    """Turn the backend's Mcp-Session-Id in the response into a token."""
    legacy_stream: bool = False
    """A legacy GET /sse stream: its ``endpoint`` event must be rewritten."""
    cancel_on_disconnect: bool = False
    """2026-07-28: closing the response stream cancels the request upstream."""
    batch: tuple[Envelope, ...] = ()
    """The messages of a 2025-03-26 batch (``envelope`` is then None)."""
    session_state: str | None = None
    """The client state of a session that lives at the proxy (era translation,
    ``proxy.protocol.era_translation``), from its token; None for any other request."""
    translated_to: str | None = None
    """The backend's era where the request is translated to it at the proxy."""
    backend_era: str | None = None
    """The era an ``auto`` route's backends were found to speak (``era_probe``)."""

    def __init__(
        self,
        era: Era,
        envelope: Envelope | None,
        replica: str | None,
        backend_session: str | None = None,
        target: bytes | None = None,
        *,
        issue_session: bool = False,
        legacy_stream: bool = False,
        cancel_on_disconnect: bool = False,
        batch: tuple[Envelope, ...] = (),
        session_state: str | None = None,
        translated_to: str | None = None,
        backend_era: str | None = None,
    ) -> None:
        self.era = era
        self.envelope = envelope
        self.replica = replica
        self.backend_session = backend_session
        self.target = target
        self.issue_session = issue_session
        self.legacy_stream = legacy_stream
        self.cancel_on_disconnect = cancel_on_disconnect
        self.batch = batch
        self.session_state = session_state
        self.translated_to = translated_to
        self.backend_era = backend_era

    @property
    def request_id(self) -> RequestId | None:
        return self.envelope.id if self.envelope is not None else None

    @property
    def method(self) -> str | None:
        return self.envelope.method if self.envelope is not None else None

    @property
    def name(self) -> str | None:
        envelope = self.envelope
        if envelope is None:
            return None
        return envelope.name or envelope.uri


_LOOPBACK_HOSTS = (b"localhost", b"127.0.0.1", b"[::1]")


def _origin_matches(origin: bytes, pattern: bytes) -> bool:
    """Exact, or ``scheme://host:*`` for any port (as the reference SDK allows)."""
    if pattern.endswith(b":*"):
        base = pattern[:-2]
        return origin == base or (
            origin.startswith(base + b":") and origin[len(base) + 1 :].isdigit()
        )
    return origin == pattern


def check_origin(
    headers: Sequence[tuple[bytes, bytes]] | McpHeaders,
    allowed: frozenset[bytes],
    host: bytes = b"",
) -> None:
    """Refuse a browser request from an origin not allowed (the DNS-rebinding defence
    the spec asks servers to apply). Requests without Origin pass. With no list
    configured, same-origin requests (Origin's authority equals Host) and loopback
    origins pass, as the reference SDK does on loopback."""
    origin = McpHeaders.of(headers).first(ORIGIN_HEADER)
    if origin is None:
        return
    if allowed:
        if any(_origin_matches(origin, pattern) for pattern in allowed):
            return
    else:
        authority = origin.partition(b"://")[2]
        if authority and authority == host:
            return
        hostname = authority.rsplit(b":", 1)[0] if not authority.endswith(b"]") else authority
        if origin.startswith(b"http://") and hostname in _LOOPBACK_HOSTS:
            return
    raise McpRefusal(403, INVALID_REQUEST, "Origin not allowed", None)


def _verify(tokens: SessionTokens, token: str, request_id: RequestId | None) -> SessionClaims:
    try:
        return tokens.verify(token)
    except InvalidSessionToken:
        # Tampered, foreign or expired: the spec's signal to start a new session.
        raise McpRefusal(404, INVALID_REQUEST, SESSION_NOT_FOUND, request_id) from None


def decide(
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]] | McpHeaders,
    body: bytes | None,
    tokens: SessionTokens,
) -> McpDecision:
    """Classify and route one MCP request; McpRefusal for what must not reach a backend."""
    envelope: Envelope | None = None
    headers = McpHeaders.of(headers)
    values = headers.values
    if method == b"POST":
        try:
            envelope = decode_message(body or b"")
        except JsonRpcDecodeError as exc:
            if exc.batch and _batches_allowed(values):
                return _decide_batch(body or b"", headers, tokens)
            raise McpRefusal(400, exc.code, exc.message, exc.id) from None
    request_id = envelope.id if envelope is not None else None
    era = era_of(method, values, envelope, target)[0]
    if era is Era.STATELESS:
        if method != b"POST":
            raise McpRefusal(
                405,
                INVALID_REQUEST,
                "Method not allowed: 2026-07-28 requests are POSTs",
                None,
                headers=[(b"allow", b"POST")],
            )
        assert envelope is not None
        mismatch = header_body_mismatch(values, envelope)
        if mismatch is not None:
            raise McpRefusal(mismatch.status, mismatch.code, mismatch.message, request_id)
        return McpDecision(era, envelope, None, cancel_on_disconnect=True)
    if era is Era.LEGACY_SSE:
        try:
            token = legacy_session_token(target)
        except EndpointRewriteError as exc:
            raise McpRefusal(400, INVALID_REQUEST, str(exc), request_id) from None
        if token is None:
            return McpDecision(era, envelope, None, legacy_stream=method == b"GET")
        claims = _verify(tokens, token, request_id)
        return McpDecision(
            era,
            envelope,
            claims.replica,
            claims.backend_session,
            target=restore_message_target(target, claims.backend_session),
        )
    session = headers.first(SESSION_HEADER)
    if session is None:
        return McpDecision(era, envelope, None, issue_session=True)
    claims = _verify(tokens, session.decode("latin-1"), request_id)
    if claims.replica == TRANSLATED:
        return McpDecision(era, envelope, None, session_state=claims.backend_session)
    return McpDecision(era, envelope, claims.replica, claims.backend_session, issue_session=True)


_BATCH_VERSION = ASSUMED_VERSION.encode()
"""2025-03-26, the revision that had batches, and the one a request without
MCP-Protocol-Version is taken to be of."""


def _batches_allowed(values: dict[bytes, list[bytes]]) -> bool:
    """Batches were part of 2025-03-26 only. Its clients send no MCP-Protocol-Version
    (the header came in 2025-06-18, and a request without it is to be taken as
    2025-03-26); a later session's requests all carry their version."""
    version = values.get(VERSION_HEADER)
    return version is None or version == [_BATCH_VERSION]


def _decide_batch(body: bytes, headers: McpHeaders, tokens: SessionTokens) -> McpDecision:
    try:
        members = decode_batch(body)
    except JsonRpcDecodeError as exc:
        raise McpRefusal(400, exc.code, exc.message, exc.id) from None
    if any(m.method == "initialize" for m in members):
        # 2025-03-26: "The initialize request MUST NOT be part of a JSON-RPC batch".
        raise McpRefusal(400, INVALID_REQUEST, "initialize must not be part of a batch", None)
    session = headers.first(SESSION_HEADER)
    if session is None:
        return McpDecision(Era.STATEFUL, None, None, issue_session=True, batch=members)
    claims = _verify(tokens, session.decode("latin-1"), None)
    if claims.replica == TRANSLATED:
        raise McpRefusal(
            400, INVALID_REQUEST, "batches are not translated for a 2026-07-28 backend", None
        )
    return McpDecision(
        Era.STATEFUL,
        None,
        claims.replica,
        claims.backend_session,
        issue_session=True,
        batch=members,
    )


def with_session(headers: list[tuple[bytes, bytes]], backend_session: str) -> None:
    """Put the backend's own session id back in place of the proxy's token."""
    value = backend_session.encode("latin-1")
    for i, (name, _) in enumerate(headers):
        if name == SESSION_HEADER:
            headers[i] = (name, value)


METHOD_LABELS = MCP_METHOD_LABELS | HTTP_METHOD_LABELS | {"stream", "batch"}
"""Every value ``method_label`` can return."""


def method_label(decision: McpDecision, http_method: bytes) -> str:
    """A bounded metric label (``proxy.labels``): the JSON-RPC method if it is a known
    one, else a class; without a JSON-RPC body, ``stream`` for GET or the HTTP method
    (clients choose both strings: unbounded label values would grow without limit)."""
    envelope = decision.envelope
    if envelope is None:
        if decision.batch:
            return "batch"
        return "stream" if http_method == b"GET" else http_method_label(http_method)
    return mcp_method_label(envelope.method, is_response=envelope.kind in ("response", "error"))


def rewrite_endpoint_block(block: bytes, rewrite: Callable[[bytes], bytes]) -> bytes:
    """Apply ``rewrite`` to the data of an SSE event block if it is an ``endpoint``
    event (the legacy transport's first event), leaving other blocks untouched."""
    lines = block.splitlines(keepends=True)
    if not any(line.rstrip(b"\r\n") in (b"event: endpoint", b"event:endpoint") for line in lines):
        return block
    out = []
    for line in lines:
        stripped = line.rstrip(b"\r\n")
        if stripped.startswith(b"data:"):
            value = stripped[5:].removeprefix(b" ")
            line = b"data: " + rewrite(value) + line[len(stripped) :]
        out.append(line)
    return b"".join(out)


def event_payloads(blocks: bytes) -> list[bytes]:
    """The data of each complete SSE event in ``blocks`` (``data:`` lines joined with
    newlines, as a client assembles them)."""
    payloads = []
    for block in blocks.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n"):
        data = [
            line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")
        ]
        if data:
            payloads.append(b"\n".join(data))
    return payloads
