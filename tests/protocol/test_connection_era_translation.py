"""The machine translating a handshake-era client's session for a route whose backends
speak only 2026-07-28 (``backend_era``, ``proxy.protocol.era_translation``): what the
backend gets, what the client gets back, what is answered at the proxy."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.protocol.eras import CLIENT_INFO_META_KEY, SERVER_INFO_META_KEY
from proxy.protocol.jsonrpc import PROTOCOL_VERSION_META_KEY
from proxy.protocol.session_token import TRANSLATED
from tests.support.machine import World, make_config
from tests.support.machine_traffic import JWT_AUTH, ROUTES, SSE_HEAD, call_2026, chunk, mcp_post, ok
from tests.support.wire import backend_request, client_answer

pytestmark = pytest.mark.usefixtures("both_ways")

MODERN_ROUTE = {
    "prefix": "/modern",
    "kind": "mcp",
    "backends": ["http://10.0.7.1:80", "http://10.0.7.2:80"],
    "backend_era": "2026-07-28",
}
DISCOVERED = {
    "jsonrpc": "2.0",
    "id": 0,
    "result": {
        "resultType": "complete",
        "capabilities": {"tools": {"listChanged": True}},
        "_meta": {SERVER_INFO_META_KEY: {"name": "srv", "version": "1"}},
    },
}


def world() -> World:
    return World(make_config((*ROUTES, MODERN_ROUTE), auth=JWT_AUTH))


def rpc(method: str, params: dict[str, Any] | None = None, request_id: int | None = 1) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if request_id is not None:
        message["id"] = request_id
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode()


def handshake_post(body: bytes, *headers: bytes) -> bytes:
    return mcp_post(body, b"MCP-Protocol-Version: 2025-11-25", *headers, target=b"/modern")


def initialized(w: World, bytewise: bool) -> bytes:
    """Initialize a translated session through ``w``; its token."""
    params = {
        "protocolVersion": "2025-11-25",
        "capabilities": {"sampling": {}},
        "clientInfo": {"name": "agent", "version": "2"},
    }
    w.feed(mcp_post(rpc("initialize", params, 0), target=b"/modern"))
    sent = backend_request(w.t.up.sent)
    assert sent.target == b"/modern"
    assert json.loads(sent.body)["method"] == "server/discover"
    assert sent.header(b"mcp-method") == b"server/discover"
    assert sent.header(b"mcp-protocol-version") == b"2026-07-28"
    w.answer(
        ok(json.dumps(DISCOVERED).encode(), b"Content-Type: application/json"),
        byte_at_a_time=bytewise,
    )
    answer = client_answer(w.t.take_client(), b"POST")
    assert answer.status == 200
    assert json.loads(answer.body)["result"]["serverInfo"] == {"name": "srv", "version": "1"}
    assert answer.header(b"content-length") == b"%d" % len(answer.body)
    token = answer.header(b"mcp-session-id")
    assert token is not None
    return token


def test_initialize_is_answered_from_server_discover_with_a_minted_session(bytewise: bool) -> None:
    w = world()
    token = initialized(w, bytewise)
    claims = w.env.tokens.verify(token.decode())
    assert claims.replica == TRANSLATED
    assert '"agent"' in claims.backend_session
    [x] = w.accounted
    assert x.mcp is not None and x.mcp.translated_to == "2026-07-28"
    assert w.state == "IDLE"


def test_a_later_request_goes_in_2026_form_and_its_error_comes_back_with_200(
    bytewise: bool,
) -> None:
    w = world()
    token = initialized(w, bytewise)
    w.t.up.sent.clear()
    body = rpc("resources/read", {"uri": "x://gone"}, 5)
    w.feed(handshake_post(body, b"Mcp-Session-Id: " + token, b"Last-Event-ID: 4"))
    sent = backend_request(w.t.up.sent)
    assert sent.header(b"mcp-session-id") is None and sent.header(b"last-event-id") is None
    assert sent.header(b"mcp-protocol-version") == b"2026-07-28"
    assert sent.header(b"mcp-name") == b"x://gone"
    assert sent.header(b"content-length") == b"%d" % len(sent.body)
    meta = json.loads(sent.body)["params"]["_meta"]
    assert meta[PROTOCOL_VERSION_META_KEY] == "2026-07-28"
    assert meta[CLIENT_INFO_META_KEY] == {"name": "agent", "version": "2"}
    error = {"code": -32602, "message": "Unknown resource", "data": {"uri": "x://gone"}}
    reply = json.dumps({"jsonrpc": "2.0", "id": 5, "error": error}).encode()
    w.answer(
        ok(reply, b"Content-Type: application/json", status=b"400 Bad Request"),
        byte_at_a_time=bytewise,
    )
    answer = client_answer(w.t.take_client(), b"POST")
    assert answer.status == 200
    assert json.loads(answer.body)["error"]["code"] == -32002
    assert w.accounted[-1].status == 200


def test_ping_is_answered_here_and_nothing_goes_upstream(bytewise: bool) -> None:
    w = world()
    token = initialized(w, bytewise)
    w.t.up.sent.clear()
    w.feed(handshake_post(rpc("ping", None, 8), b"Mcp-Session-Id: " + token))
    answer = client_answer(w.t.take_client(), b"POST")
    assert (answer.status, json.loads(answer.body)) == (
        200,
        {"jsonrpc": "2.0", "id": 8, "result": {}},
    )
    assert w.t.up.sent == b""


def test_a_notification_is_accepted_here(bytewise: bool) -> None:
    w = world()
    token = initialized(w, bytewise)
    w.t.up.sent.clear()
    note = rpc("notifications/initialized", None, None)
    w.feed(handshake_post(note, b"Mcp-Session-Id: " + token))
    assert client_answer(w.t.take_client(), b"POST").status == 202
    assert w.t.up.sent == b""


def test_the_get_stream_is_405_and_delete_ends_the_session_here(bytewise: bool) -> None:
    w = world()
    token = initialized(w, bytewise)
    w.t.up.sent.clear()
    w.feed(
        b"GET /modern HTTP/1.1\r\nHost: p\r\nAccept: text/event-stream\r\n"
        b"MCP-Protocol-Version: 2025-11-25\r\nMcp-Session-Id: %s\r\n\r\n" % token
    )
    answer = client_answer(w.t.take_client(), b"GET")
    assert answer.status == 405 and answer.header(b"allow") == b"POST, DELETE"
    w = world()  # (a refusal ends its connection; any worker knows the token)
    w.feed(
        b"DELETE /modern HTTP/1.1\r\nHost: p\r\n"
        b"MCP-Protocol-Version: 2025-11-25\r\nMcp-Session-Id: %s\r\n\r\n" % token
    )
    assert client_answer(w.t.take_client(), b"DELETE").status == 200
    assert w.t.upstreams == []


def test_a_streamed_answer_goes_out_as_it_comes(bytewise: bool) -> None:
    w = world()
    token = initialized(w, bytewise)
    body = rpc("tools/call", {"name": "count", "arguments": {}}, 6)
    w.feed(handshake_post(body, b"Mcp-Session-Id: " + token))
    progress = b'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n'
    w.answer(SSE_HEAD + chunk(progress), byte_at_a_time=bytewise)
    # Before the result: progress is not held.
    assert client_answer(w.t.take_client(), b"POST").body == progress
    assert w.state == "STREAM"


def test_a_translated_token_on_a_route_that_does_not_translate_is_an_unknown_session(
    bytewise: bool,
) -> None:
    w = world()
    token = initialized(w, bytewise)
    w.t.up.sent.clear()
    w.feed(
        mcp_post(
            rpc("tools/list"),
            b"MCP-Protocol-Version: 2025-11-25",
            b"Mcp-Session-Id: " + token,
            target=b"/mcp",
        )
    )
    assert client_answer(w.t.take_client(), b"POST").status == 404
    assert w.t.up.sent == b""


def test_a_2026_07_28_client_on_the_route_passes_untranslated(bytewise: bool) -> None:
    w = world()
    request = call_2026(9).replace(b"POST /mcp ", b"POST /modern ")
    w.feed(request)
    sent = backend_request(w.t.up.sent)
    assert request.endswith(sent.body)
    assert w.c.x is not None and w.c.x.mcp is not None and w.c.x.mcp.translated_to is None
