"""An OAuth resource route in the connection machine: its metadata answered by the
proxy, the caller told to the backend in the proxy's own headers (never the client's),
a tool whose scope the token lacks refused with 403 naming it, and hidden from
``tools/list``. (Token checks: tests/test_oauth.py; the whole flow with a real
authorization server and the SDK client: tests/mcp/test_oauth_flow.py.)"""

from __future__ import annotations

import json

import pytest

from proxy.auth import Identity
from tests.support.machine import World, make_config
from tests.support.machine_traffic import JWT_AUTH, call_2026, mcp_post, ok
from tests.support.wire import backend_request, client_answer

pytestmark = pytest.mark.usefixtures("both_ways")

RESOURCE = "https://mcp.example.com/mcp"
ROUTE = {
    "prefix": "/mcp",
    "kind": "mcp",
    "backends": ["http://10.0.1.1:80"],
    "oauth": {
        "resource": RESOURCE,
        "authorization_servers": ["https://auth.example.com"],
        "scopes": ["mcp"],
        "tool_scopes": {"deploy": "mcp:admin"},
        "caller_headers": {"subject": "x-caller", "client_id": "x-caller-client"},
    },
}
ADA = Identity("jwt", "ada", scopes=frozenset({"mcp"}), client_id="app-1")


def world() -> World:
    w = World(make_config([ROUTE], auth=JWT_AUTH))
    w.env.identities[b"ada-token"] = ADA
    return w


def test_the_metadata_is_answered_by_the_proxy(bytewise: bool) -> None:
    w = world()
    w.feed(
        b"GET /.well-known/oauth-protected-resource/mcp HTTP/1.1\r\nHost: mcp.example.com\r\n\r\n",
        byte_at_a_time=bytewise,
    )
    answer = client_answer(w.t.take_client())
    assert answer.status == 200 and w.t.upstreams == []
    assert answer.header(b"content-type") == b"application/json"
    assert answer.header(b"access-control-allow-origin") == b"*"
    assert json.loads(answer.body)["resource"] == RESOURCE
    assert w.state == "IDLE"  # the connection stays open
    [x] = w.accounted
    assert (x.status, x.refused, x.error) == (200, False, None)


def test_other_well_known_paths_are_not_found() -> None:
    w = world()
    w.feed(b"GET /.well-known/oauth-protected-resource/other HTTP/1.1\r\nHost: a\r\n\r\n")
    assert client_answer(w.t.take_client()).status == 404


def test_the_backend_is_told_who_calls_by_the_proxy_alone(bytewise: bool) -> None:
    w = world()
    forged = b"X-Caller: root", b"x-caller-client: forged", b"Authorization: Bearer ada-token"
    w.feed(call_2026(3, b"echo", *forged), byte_at_a_time=bytewise)
    sent = backend_request(w.t.up.sent)
    assert sent.header(b"x-caller") == b"ada"
    assert sent.header(b"x-caller-client") == b"app-1"
    assert sent.header(b"authorization") is None  # no token passthrough


def test_a_tool_whose_scope_the_token_lacks_is_403_naming_it(bytewise: bool) -> None:
    w = world()
    w.feed(call_2026(3, b"deploy", b"Authorization: Bearer ada-token"), byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client(), b"POST")
    assert answer.status == 403 and w.t.upstreams == []
    challenge = answer.header(b"www-authenticate")
    assert challenge is not None
    assert challenge.startswith(b'Bearer error="insufficient_scope", resource_metadata=')
    assert challenge.endswith(b'scope="mcp:admin"')
    error = json.loads(answer.body)["error"]
    assert (error["code"], error["message"]) == (-32001, "tool needs scope mcp:admin")


def test_tools_list_hides_what_the_tokens_scopes_do_not_allow() -> None:
    w = world()
    body = b'{"jsonrpc":"2.0","id":4,"method":"tools/list"}'
    w.feed(mcp_post(body, b"MCP-Protocol-Version: 2025-11-25", b"Authorization: Bearer ada-token"))
    tools = [{"name": n, "inputSchema": {"type": "object"}} for n in ("echo", "deploy")]
    result = json.dumps({"jsonrpc": "2.0", "id": 4, "result": {"tools": tools}}).encode()
    w.answer(ok(result, b"Content-Type: application/json"))
    listed = json.loads(client_answer(w.t.take_client(), b"POST").body)["result"]["tools"]
    assert [t["name"] for t in listed] == ["echo"]
