"""The machine holding a ``tools/list`` answer for a caller with an identity until it is
whole, then sending it rewritten (``proxy.protocol.tool_lists``) with its own
Content-Length; a backend that fails meanwhile gets the client a 502/504, never a
partial or unfiltered list."""

from __future__ import annotations

import json

import pytest

from proxy.auth import Identity
from tests.support.machine import World
from tests.support.machine_traffic import SSE_HEAD, call_2026, chunk, mcp_post, ok, routes_config
from tests.support.wire import backend_request, client_answer

pytestmark = pytest.mark.usefixtures("both_ways")

TOOLS = [{"name": n, "inputSchema": {"type": "object"}} for n in ("a", "b", "c")]
RESULT = json.dumps({"jsonrpc": "2.0", "id": 4, "result": {"tools": TOOLS}}).encode()


def world() -> World:
    w = World(routes_config())
    w.env.identities[b"carol-key"] = Identity("key", "carol", allowed_tools=frozenset({"b"}))
    w.env.identities[b"dave-key"] = Identity("key", "dave")
    return w


def list_tools(key: bytes, method: bytes = b"tools/list") -> bytes:
    body = b'{"jsonrpc":"2.0","id":4,"method":"%s","params":{}}' % method
    return mcp_post(
        body,
        b"MCP-Protocol-Version: 2025-11-25",
        b"Authorization: Bearer " + key,
        target=b"/tools",
    )


def listed(body: bytes) -> list[str]:
    return [t["name"] for t in json.loads(body)["result"]["tools"]]


def test_a_json_list_is_sent_filtered_once_whole(bytewise: bool) -> None:
    w = world()
    w.feed(list_tools(b"carol-key"))
    head, body = ok(RESULT, b"Content-Type: application/json").split(b"\r\n\r\n")
    w.answer(head + b"\r\n\r\n" + body[:20], byte_at_a_time=bytewise)
    assert w.t.take_client() == b""  # held: nothing of it yet
    assert w.state == "RESPONSE"
    w.answer(body[20:], byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client(), b"POST")
    assert answer.status == 200 and listed(answer.body) == ["b"]
    assert answer.header(b"content-length") == b"%d" % len(answer.body)
    assert w.state == "IDLE"
    assert w.t.up.finished == {"reusable": True, "ok": True, "failure": None}
    [x] = w.accounted
    assert (x.status, x.error, x.bytes_out) == (200, None, len(answer.body))


def test_a_chunked_event_stream_list_is_sent_filtered_with_a_length(bytewise: bool) -> None:
    w = world()
    w.feed(list_tools(b"carol-key"))
    events = b"event: message\ndata: " + RESULT + b"\n\n"
    w.answer(
        SSE_HEAD + chunk(events[:30]) + chunk(events[30:]) + b"0\r\n\r\n", byte_at_a_time=bytewise
    )
    answer = client_answer(w.t.take_client(), b"POST")
    assert answer.status == 200
    assert answer.header(b"content-type") == b"text/event-stream"
    assert answer.header(b"transfer-encoding") is None
    assert answer.body.startswith(b"event: message\ndata: ") and answer.body.endswith(b"\n\n")
    assert listed(answer.body[len(b"event: message\ndata: ") : -2]) == ["b"]
    assert w.state == "IDLE"


def test_a_caller_allowed_every_tool_gets_the_list_as_it_came() -> None:
    w = world()
    w.feed(list_tools(b"dave-key"))
    backend_answer = ok(RESULT, b"Content-Type: application/json")
    w.answer(backend_answer)
    answer = client_answer(w.t.take_client(), b"POST")
    assert answer.body == RESULT


def test_other_methods_are_relayed_as_they_come() -> None:
    w = world()
    w.feed(list_tools(b"carol-key", b"resources/list"))
    head, body = ok(RESULT, b"Content-Type: application/json").split(b"\r\n\r\n")
    w.answer(head + b"\r\n\r\n" + body[:20])
    assert w.t.take_client().endswith(body[:20])  # not held


def test_an_error_answer_is_relayed_as_it_comes() -> None:
    w = world()
    w.feed(list_tools(b"carol-key"))
    w.answer(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 10\r\n\r\nabc")
    assert w.t.take_client().endswith(b"abc")


def test_a_backend_that_dies_mid_list_gets_the_client_a_502(bytewise: bool) -> None:
    w = world()
    w.feed(list_tools(b"carol-key"))
    w.answer(ok(RESULT, b"Content-Type: application/json")[:-10], byte_at_a_time=bytewise)
    w.c.upstream_closed()
    answer = client_answer(w.t.take_client(), b"POST")
    assert answer.status == 502 and json.loads(answer.body)["id"] == 4
    [x] = w.accounted
    assert x.status == 502


def test_a_backend_that_goes_silent_mid_list_gets_the_client_a_504() -> None:
    w = world()
    w.feed(list_tools(b"carol-key"))
    w.answer(ok(RESULT, b"Content-Type: application/json")[:-10])
    w.advance(w.env.config.upstream.read_timeout + 1)
    answer = client_answer(w.t.take_client(), b"POST")
    assert answer.status == 504


def test_a_close_delimited_list_is_filtered_at_the_close() -> None:
    w = world()
    w.feed(list_tools(b"carol-key"))
    w.answer(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + RESULT
    )
    assert w.t.take_client() == b""
    w.c.upstream_closed()
    answer = client_answer(w.t.take_client(), b"POST")
    assert answer.status == 200 and listed(answer.body) == ["b"]


def test_a_hidden_tools_call_is_answered_as_the_backend_answers_an_unknown_tool(
    bytewise: bool,
) -> None:
    w = world()
    call = call_2026(9, b"echo", b"Authorization: Bearer carol-key")
    w.feed(call.replace(b"POST /mcp", b"POST /tools"), byte_at_a_time=bytewise)
    sent = backend_request(w.t.up.sent)
    stand_in = json.loads(sent.body)["params"]["name"]
    assert stand_in.startswith("switchboard-hidden-") and b"echo" not in sent.body
    assert sent.header(b"mcp-name") == stand_in.encode()
    assert sent.header(b"content-length") == b"%d" % len(sent.body)
    assert sent.header(b"authorization") is None
    unknown = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 9,
            "error": {"code": -32602, "message": f"Unknown tool: {stand_in}"},
        }
    ).encode()
    w.answer(ok(unknown, b"Content-Type: application/json"), byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client(), b"POST")
    assert json.loads(answer.body) == {
        "jsonrpc": "2.0",
        "id": 9,
        "error": {"code": -32602, "message": "Unknown tool: echo"},
    }
    assert w.env.denied_tools == 1 and w.state == "IDLE"


def test_an_allowed_call_goes_as_it_came() -> None:
    w = world()
    call = call_2026(9, b"b", b"Authorization: Bearer carol-key")
    w.feed(call.replace(b"POST /mcp", b"POST /tools"))
    sent = backend_request(w.t.up.sent)
    assert json.loads(sent.body)["params"]["name"] == "b"
    w.answer(ok(b"x" * 50, b"Content-Type: application/json")[:-10])
    assert w.t.take_client().endswith(b"x" * 40)  # relayed as it comes, not held


def test_a_batch_has_its_hidden_calls_renamed_and_its_lists_filtered(bytewise: bool) -> None:
    w = world()
    batch = (
        b'[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}},'
        b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"b"}},'
        b'{"jsonrpc":"2.0","id":4,"method":"tools/list"}]'
    )
    # A 2025-03-26 client: no MCP-Protocol-Version header.
    w.feed(
        mcp_post(batch, b"Authorization: Bearer carol-key", target=b"/tools"),
        byte_at_a_time=bytewise,
    )
    sent = backend_request(w.t.up.sent)
    hidden, allowed, _ = json.loads(sent.body)
    stand_in = hidden["params"]["name"]
    assert stand_in.startswith("switchboard-hidden-") and allowed["params"]["name"] == "b"
    assert sent.header(b"content-length") == b"%d" % len(sent.body)
    answers = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "error": {"code": -32602, "message": f"Unknown tool: {stand_in}"},
        },
        {"jsonrpc": "2.0", "id": 2, "result": {"content": []}},
        json.loads(RESULT),
    ]
    w.answer(
        ok(json.dumps(answers).encode(), b"Content-Type: application/json"), byte_at_a_time=bytewise
    )
    got = json.loads(client_answer(w.t.take_client(), b"POST").body)
    assert got[0]["error"]["message"] == "Unknown tool: echo"
    assert got[1] == answers[1]
    assert [t["name"] for t in got[2]["result"]["tools"]] == ["b"]
    assert w.env.denied_tools == 1
