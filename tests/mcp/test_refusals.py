"""What a ``kind = "mcp"`` route refuses itself, before any backend sees the request.

Each refusal must come back with its documented status (docs/mcp.md) and a JSON-RPC
error body, be logged as an access line with that status and an ``error``, and never
reach the backend (the official-SDK backend records every request it receives). Each
request goes on its own connection, so its access line is found by the client's port.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.routing import replica_id
from tests.mcp.conftest import SESSION_KID, key_sections, tokens_for
from tests.support.backends import HttpClient, HttpResponse, proxy_running, wait_for_line
from tests.support.mcp_servers import (
    HANDSHAKE_VERSION,
    MCP_ACCEPT,
    MODERN_VERSION,
    McpBackend,
    handshake_request,
    initialize_body,
    modern_request,
    rpc_response,
)
from tests.support.proxy_process import ProxyProcess

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
HEADER_MISMATCH = -32020
ALLOWED_ORIGIN = "https://app.example"
OTHER_SECRET = "another-switchboard-key-0123456789abcdef"  # 40 characters
WHOAMI = {"name": "whoami", "arguments": {}}


@dataclass
class Exchange:
    response: HttpResponse
    line: dict[str, Any]
    """The proxy's access line for this request."""
    backend_requests: int
    """How many requests the backend received because of this one."""

    @property
    def body(self) -> dict[str, Any]:
        decoded = json.loads(self.response.body)
        assert isinstance(decoded, dict)
        return decoded

    def header(self, name: str) -> list[str]:
        return self.response.header(name)


async def _send(
    proxy: ProxyProcess,
    backend: McpBackend,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | dict[str, Any] | None = None,
) -> Exchange:
    """One request on a fresh connection; its response, access line and backend effect."""
    payload = json.dumps(body).encode() if isinstance(body, dict) else body
    head = [("Accept", MCP_ACCEPT), *headers]
    if payload is not None:
        head.append(("Content-Type", "application/json"))
    before = len(backend.requests)
    client = await HttpClient.connect(proxy.port)
    try:
        with trio.fail_after(10):
            response = await client.request(method, target, headers=head, body=payload)
    finally:
        await client.aclose()
    port = client.local_port
    line = await wait_for_line(
        proxy, lambda line: line.get("event") == "access" and line.get("port") == port
    )
    # The access line is written when the exchange is over: had the proxy forwarded the
    # request, the backend would have received it by now.
    return Exchange(response, line, len(backend.requests) - before)


def _modern_headers(method: str, name: str | None = None) -> list[tuple[str, str]]:
    headers = [("MCP-Protocol-Version", MODERN_VERSION), ("Mcp-Method", method)]
    if name is not None:
        headers.append(("Mcp-Name", name))
    return headers


def _session_headers(session: str) -> list[tuple[str, str]]:
    return [("MCP-Protocol-Version", HANDSHAKE_VERSION), ("Mcp-Session-Id", session)]


def _assert_refused(
    x: Exchange,
    status: int,
    code: int,
    *,
    message: str | None = None,
    request_id: int | None = None,
    method: str = "POST",
    path: str = "/mcp",
) -> None:
    assert x.response.status == status, x.response
    assert x.header("content-type") == ["application/json"]
    body = x.body
    assert body["jsonrpc"] == "2.0"
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    if message is not None:
        assert body["error"]["message"] == message
    if request_id is not None:
        assert body["id"] == request_id
    assert "result" not in body
    assert x.line["status"] == status
    assert x.line["method"] == method
    assert x.line["path"] == path
    assert x.line["error"] == body["error"]["message"]
    assert x.backend_requests == 0


def _tampered(token: str) -> str:
    """The token with one character of its payload changed to another valid one."""
    version, kid, payload, mac = token.split(".")
    i = len(payload) // 2
    flipped = "A" if payload[i] != "A" else "B"
    return ".".join((version, kid, payload[:i] + flipped + payload[i + 1 :], mac))


@pytest.fixture
async def backend(nursery: trio.Nursery) -> McpBackend:
    server = McpBackend("r1")
    await nursery.start(server.serve)
    return server


async def test_refusals(backend: McpBackend, tmp_path: Path) -> None:
    routes: list[dict[str, Any]] = [
        {"prefix": "/mcp", "kind": "mcp", "backends": [backend.url]},
        # /app/mcp -> /mcp on the same backend, for browsers from one origin only.
        {
            "prefix": "/app",
            "kind": "mcp",
            "backends": [backend.url],
            "strip_prefix": True,
            "origins": [ALLOWED_ORIGIN],
        },
    ]
    async with proxy_running(tmp_path, routes, sections=key_sections()) as proxy:
        await _stateless_refusals(proxy, backend)
        await _origin_checks(proxy, backend)
        await _session_refusals(proxy, backend)


async def _stateless_refusals(proxy: ProxyProcess, backend: McpBackend) -> None:
    # Control: a 2026-07-28 request whose headers agree with its body goes through.
    ok = await _send(
        proxy,
        backend,
        "POST",
        "/mcp",
        _modern_headers("tools/call", "whoami"),
        modern_request(1, "tools/call", WHOAMI),
    )
    assert ok.response.status == 200
    assert ok.backend_requests == 1
    assert ok.line["mcp_era"] == "2026-07-28" and ok.line["error"] is None
    result = rpc_response(ok.header("content-type")[0], ok.response.body)
    assert result["result"]["content"][0]["text"] == "r1"

    # Mcp-Method says tools/list, the body says tools/call.
    mismatch = await _send(
        proxy,
        backend,
        "POST",
        "/mcp",
        _modern_headers("tools/list", "whoami"),
        modern_request(7, "tools/call", WHOAMI),
    )
    _assert_refused(mismatch, 400, HEADER_MISMATCH, request_id=7)
    assert "Mcp-Method" in mismatch.body["error"]["message"]

    # Mcp-Name names another tool than params.name.
    wrong_name = await _send(
        proxy,
        backend,
        "POST",
        "/mcp",
        _modern_headers("tools/call", "count"),
        modern_request(8, "tools/call", WHOAMI),
    )
    _assert_refused(wrong_name, 400, HEADER_MISMATCH, request_id=8)
    assert "Mcp-Name" in wrong_name.body["error"]["message"]

    # A 2026-07-28 body (its _meta names the version) without MCP-Protocol-Version.
    no_version = await _send(
        proxy,
        backend,
        "POST",
        "/mcp",
        [("Mcp-Method", "tools/list")],
        modern_request(9, "tools/list"),
    )
    _assert_refused(no_version, 400, HEADER_MISMATCH, request_id=9)
    assert "MCP-Protocol-Version" in no_version.body["error"]["message"]

    # GET and DELETE have no meaning at 2026-07-28: 405 with Allow: POST.
    for method in ("GET", "DELETE"):
        not_allowed = await _send(
            proxy, backend, method, "/mcp", [("MCP-Protocol-Version", MODERN_VERSION)]
        )
        _assert_refused(not_allowed, 405, INVALID_REQUEST, method=method)
        assert not_allowed.header("allow") == ["POST"]

    # Not JSON at all.
    garbage = await _send(
        proxy,
        backend,
        "POST",
        "/mcp",
        _modern_headers("tools/list"),
        b'{"jsonrpc": "2.0", "id": 3, "method": ',
    )
    _assert_refused(garbage, 400, PARSE_ERROR)


async def _origin_checks(proxy: ProxyProcess, backend: McpBackend) -> None:
    request = modern_request(2, "tools/call", WHOAMI)
    headers = _modern_headers("tools/call", "whoami")
    evil = await _send(
        proxy, backend, "POST", "/app/mcp", [*headers, ("Origin", "https://evil.example")], request
    )
    _assert_refused(evil, 403, INVALID_REQUEST, path="/app/mcp")

    for extra in ([("Origin", ALLOWED_ORIGIN)], []):
        allowed = await _send(proxy, backend, "POST", "/app/mcp", [*headers, *extra], request)
        assert allowed.response.status == 200, (extra, allowed.response)
        assert allowed.backend_requests == 1
        assert allowed.line["status"] == 200 and allowed.line["error"] is None
        result = rpc_response(allowed.header("content-type")[0], allowed.response.body)
        assert result["result"]["content"][0]["text"] == "r1"


async def _session_refusals(proxy: ProxyProcess, backend: McpBackend) -> None:
    init = await _send(proxy, backend, "POST", "/mcp", [], initialize_body())
    assert init.response.status == 200
    (token,) = init.header("mcp-session-id")
    assert token.startswith("v1.")
    claims = tokens_for().verify(token)
    assert claims.backend_session == backend.sessions_created[-1]
    initialized = await _send(
        proxy,
        backend,
        "POST",
        "/mcp",
        _session_headers(token),
        handshake_request(None, "notifications/initialized"),
    )
    assert initialized.response.status == 202

    # Control: the genuine token works, so each refusal below is the token's fault.
    call = handshake_request(4, "tools/call", WHOAMI)
    ok = await _send(proxy, backend, "POST", "/mcp", _session_headers(token), call)
    assert ok.response.status == 200
    assert ok.backend_requests == 1
    result = rpc_response(ok.header("content-type")[0], ok.response.body)
    assert result["result"]["content"][0]["text"] == "r1"
    assert backend.whoami_calls[-1] == (claims.backend_session, "r1")

    replica = replica_id(backend.url)
    other_key = tokens_for(secret=OTHER_SECRET)
    unknown_kid = tokens_for(kid="k9", secret=OTHER_SECRET)
    # A genuine signature for a replica this route does not have.
    gone_replica = tokens_for().issue("000000000000", claims.backend_session)
    bad_sessions = {
        "tampered": _tampered(token),
        "signed with another key": other_key.issue(replica, claims.backend_session),
        "unknown key id": unknown_kid.issue(replica, claims.backend_session),
        "unknown session": "3f2b7c1e-not-a-token",
        "replica not in the route": gone_replica,
    }
    assert tokens_for().verify(gone_replica).kid == SESSION_KID
    for case, session in bad_sessions.items():
        refused = await _send(proxy, backend, "POST", "/mcp", _session_headers(session), call)
        assert refused.response.status == 404, case
        _assert_refused(refused, 404, INVALID_REQUEST, message="Session not found", request_id=4)
    # The stream and the session's end are refused alike.
    for method in ("GET", "DELETE"):
        refused = await _send(
            proxy, backend, method, "/mcp", _session_headers(bad_sessions["tampered"])
        )
        _assert_refused(refused, 404, INVALID_REQUEST, message="Session not found", method=method)
