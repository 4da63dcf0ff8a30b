"""2026-07-28 clients on 2025-11-25 backends, sans-IO (``proxy.protocol.upstream_sessions``):
what sessions are keyed by and opened with, a request within one, and the answer as
the client gets it."""

from __future__ import annotations

import json
from typing import Any

from proxy.protocol.eras import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    SERVER_INFO_META_KEY,
)
from proxy.protocol.jsonrpc import PROTOCOL_VERSION_META_KEY
from proxy.protocol.upstream_sessions import (
    INITIALIZE_ID,
    ClientEnvelope,
    ModernAnswer,
    UpstreamSession,
    UpstreamSessions,
    discover_body,
    handshake_form,
    initialize_result,
)

META = {
    PROTOCOL_VERSION_META_KEY: "2026-07-28",
    CLIENT_CAPABILITIES_META_KEY: {"elicitation": {"form": {}}, "experimental": {"x": {}}},
    CLIENT_INFO_META_KEY: {"name": "agent", "version": "3"},
    "progressToken": 4,
}


def message(method: str = "tools/call", **params: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 9,
        "method": method,
        "params": {**params, "_meta": dict(META)},
    }


def test_the_session_is_opened_with_the_clients_declared_info_less_what_cannot_be_carried() -> None:
    client = ClientEnvelope.of(message())
    body = json.loads(client.initialize_body())
    assert body["id"] == INITIALIZE_ID and body["method"] == "initialize"
    assert body["params"] == {
        "protocolVersion": "2025-11-25",
        "capabilities": {"experimental": {"x": {}}},
        "clientInfo": {"name": "agent", "version": "3"},
    }


def test_sessions_are_keyed_by_replica_caller_and_client() -> None:
    one = ClientEnvelope.of(message())
    same = ClientEnvelope.of(message("tools/list"))
    other = message()
    other["params"]["_meta"][CLIENT_INFO_META_KEY] = {"name": "other", "version": "3"}
    assert one.key("r1", "alice") == same.key("r1", "alice")
    assert one.key("r1", "alice") != one.key("r2", "alice")
    assert one.key("r1", "alice") != one.key("r1", "bob")
    assert one.key("r1", "alice") != ClientEnvelope.of(other).key("r1", "alice")


def test_a_request_without_meta_declares_nothing() -> None:
    client = ClientEnvelope.of({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert (client.capabilities, client.info) == ({}, None)
    assert json.loads(client.initialize_body())["params"]["clientInfo"]["name"] == "switchboard"


def test_the_request_within_a_session_loses_the_envelope_keys_only() -> None:
    sent = json.loads(handshake_form(message(name="count")))
    assert sent["params"] == {"name": "count", "_meta": {"progressToken": 4}}
    bare = message()
    del bare["params"]["_meta"]["progressToken"]
    assert "_meta" not in json.loads(handshake_form(bare))["params"]


def test_within_sets_the_session_headers() -> None:
    answer = ModernAnswer(message(name="count"), 9, "tools/call")
    body = answer.within(("r1", "", "k"), UpstreamSession("abc", {}))
    assert dict(answer.request_headers) == {
        b"mcp-protocol-version": b"2025-11-25",
        b"mcp-session-id": b"abc",
    }
    assert answer.dropped_headers == {b"mcp-method", b"mcp-name"}
    assert PROTOCOL_VERSION_META_KEY not in body.decode()


def test_the_initialize_result_is_read_from_json_or_an_event_stream() -> None:
    result = {"protocolVersion": "2025-11-25", "capabilities": {}}
    answer = json.dumps({"jsonrpc": "2.0", "id": INITIALIZE_ID, "result": result}).encode()
    assert initialize_result(b"application/json", answer) == result
    stream = b"event: message\r\ndata: " + answer + b"\r\n\r\n"
    assert initialize_result(b"text/event-stream", stream) == result
    error = b'{"jsonrpc":"2.0","id":"switchboard-initialize","error":{"code":1,"message":"no"}}'
    assert initialize_result(b"application/json", error) == "initialize failed: no"
    assert isinstance(initialize_result(b"application/json", b"<html>"), str)


def test_discover_is_answered_from_the_initialize_result() -> None:
    session = UpstreamSession(
        "abc",
        {
            "protocolVersion": "2025-11-25",
            "capabilities": {"tools": {"listChanged": True}},
            "serverInfo": {"name": "srv", "version": "1"},
            "instructions": "be brief",
        },
    )
    assert json.loads(discover_body(5, session)) == {
        "jsonrpc": "2.0",
        "id": 5,
        "result": {
            "resultType": "complete",
            "supportedVersions": ["2026-07-28"],
            "capabilities": {"tools": {"listChanged": True}},
            "ttlMs": 0,
            "cacheScope": "private",
            "instructions": "be brief",
            "_meta": {SERVER_INFO_META_KEY: {"name": "srv", "version": "1"}},
        },
    }


def answer_of(method: str, reply: dict[str, Any], *, event_stream: bool = False) -> Any:
    answer = ModernAnswer(message(method), 9, method)
    body = json.dumps({"jsonrpc": "2.0", "id": 9, **reply}).encode()
    if event_stream:
        out = answer.rewrite(b"data: " + body + b"\n\n", event_stream=True)
        assert out is not None and out.startswith(b"data: ") and out.endswith(b"\n\n")
        return json.loads(out[6:-2])
    out = answer.rewrite(body, event_stream=False)
    return None if out is None else json.loads(out)


def test_a_result_gets_the_result_type_2026_07_28_requires() -> None:
    out = answer_of("tools/call", {"result": {"content": []}})
    assert out["result"] == {"content": [], "resultType": "complete"}


def test_a_list_gets_conservative_cache_fields_too() -> None:
    out = answer_of("tools/list", {"result": {"tools": []}}, event_stream=True)
    assert out["result"] == {
        "tools": [],
        "resultType": "complete",
        "ttlMs": 0,
        "cacheScope": "private",
    }


def test_a_missing_resource_is_minus_32602_again() -> None:
    out = answer_of("resources/read", {"error": {"code": -32002, "message": "gone"}})
    assert out["error"]["code"] == -32602


def test_other_errors_and_other_messages_go_as_they_came() -> None:
    assert answer_of("tools/call", {"error": {"code": -32601, "message": "no"}}) is None
    answer = ModernAnswer(message(), 9, "tools/call")
    note = b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}'
    assert answer.rewrite(note, event_stream=False) is None


def test_a_404_within_a_session_means_the_backend_lost_it() -> None:
    answer = ModernAnswer(message(), 9, "tools/call")
    assert not answer.session_lost(404)  # not within a session yet
    answer.within(("r1", "", "k"), UpstreamSession("abc", {}))
    assert answer.session_lost(404) and not answer.session_lost(200)


def test_what_is_held() -> None:
    answer = ModernAnswer(message(), 9, "tools/call")
    assert answer.holds(200, event_stream=False) and not answer.holds(200, event_stream=True)


def test_the_session_table_is_bounded_oldest_first() -> None:
    table = UpstreamSessions(limit=2)
    for i in range(3):
        table.put(("r", "", str(i)), UpstreamSession(str(i), {}))
    assert len(table) == 2 and table.get(("r", "", "0")) is None
    table.forget(("r", "", "1"), "not-that-one")
    assert table.get(("r", "", "1")) is not None
    table.forget(("r", "", "1"), "1")
    assert table.get(("r", "", "1")) is None


def test_an_error_goes_out_with_the_status_2026_07_28_gives_its_code() -> None:
    for code, status in ((-32601, 404), (-32602, 400), (-32603, 200), (-32002, 400)):
        answer = ModernAnswer(message("resources/read", uri="x://y"), 9, "resources/read")
        reply = {"jsonrpc": "2.0", "id": 9, "error": {"code": code, "message": "no"}}
        answer.rewrite(json.dumps(reply).encode(), event_stream=False)
        assert answer.answer_status(200) == status, code
    assert ModernAnswer(message(), 9, "tools/call").answer_status(200) == 200


def test_a_missing_resource_names_its_uri() -> None:
    answer = ModernAnswer(message("resources/read", uri="x://y"), 9, "resources/read")
    reply = {"jsonrpc": "2.0", "id": 9, "error": {"code": -32002, "message": "gone"}}
    out = answer.rewrite(json.dumps(reply).encode(), event_stream=False)
    assert out is not None
    assert json.loads(out)["error"] == {"code": -32602, "message": "gone", "data": {"uri": "x://y"}}


def test_a_read_resource_gets_cache_fields_too() -> None:
    out = answer_of("resources/read", {"result": {"contents": []}})
    assert (out["result"]["ttlMs"], out["result"]["cacheScope"]) == (0, "private")


def test_a_resource_not_found_as_minus_32602_gets_its_uri_too() -> None:
    answer = ModernAnswer(message("resources/read", uri="x://y"), 9, "resources/read")
    reply = {"jsonrpc": "2.0", "id": 9, "error": {"code": -32602, "message": "not found"}}
    out = answer.rewrite(json.dumps(reply).encode(), event_stream=False)
    assert out is not None and json.loads(out)["error"]["data"] == {"uri": "x://y"}
    assert answer.answer_status(200) == 400


def test_a_stream_of_one_error_goes_out_as_json_with_its_status() -> None:
    answer = ModernAnswer(message("resources/read", uri="x://y"), 9, "resources/read")
    reply = {"jsonrpc": "2.0", "id": 9, "error": {"code": -32002, "message": "gone"}}
    out = answer.rewrite(
        b"event: message\ndata: " + json.dumps(reply).encode() + b"\n\n", event_stream=True
    )
    assert out is not None and json.loads(out)["error"]["code"] == -32602
    assert answer.answer_content_type() == b"application/json"
    assert answer.answer_status(200) == 400


def test_an_error_after_other_events_keeps_the_streams_status() -> None:
    answer = ModernAnswer(message("resources/read", uri="x://y"), 9, "resources/read")
    note = b'data: {"jsonrpc":"2.0","method":"notifications/message","params":{}}\n\n'
    reply = {"jsonrpc": "2.0", "id": 9, "error": {"code": -32002, "message": "gone"}}
    stream = note + b"data: " + json.dumps(reply).encode() + b"\n\n"
    out = answer.rewrite(stream, event_stream=True)
    assert out is not None and out.startswith(note) and b"-32602" in out
    assert answer.answer_content_type() is None
    assert answer.answer_status(200) == 200
