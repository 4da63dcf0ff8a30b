"""Era translation, sans-IO (``proxy.protocol.era_translation``): a handshake-era
client's messages as a 2026-07-28 backend gets them, and the backend's answers as the
client gets them back."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from proxy.protocol.era_translation import (
    MISSING_SESSION,
    AnswerTranslation,
    ClientState,
    LocalAnswer,
    Upstream,
    decode_state,
    translate,
)
from proxy.protocol.eras import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    LOG_LEVEL_META_KEY,
    MODERN_VERSION,
    RESOURCE_NOT_FOUND,
    SERVER_INFO_META_KEY,
)
from proxy.protocol.jsonrpc import PROTOCOL_VERSION_META_KEY, decode_message
from proxy.protocol.session_token import MAX_TRANSLATED_STATE_BYTES

CAPABILITIES: dict[str, Any] = {
    "elicitation": {"form": {}},
    "sampling": {},
    "roots": {},
    "experimental": {},
}
INFO = {"name": "agent", "version": "1.2", "title": "Agent", "icons": [{"src": "x"}]}


def body_of(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def request(method: str, params: dict[str, Any] | None = None, request_id: int = 3) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return body_of(message)


def run(body: bytes, state: str | None) -> LocalAnswer | Upstream:
    minted: list[str] = []

    def mint(text: str) -> str:
        minted.append(text)
        return "v1.k1.TOKEN.MAC"

    outcome = translate(decode_message(body), body, state, mint)
    if isinstance(outcome, Upstream) and outcome.answer.token is not None:
        assert minted == [outcome_state(outcome)]
    return outcome


def outcome_state(outcome: Upstream) -> str:
    """The state a session token carries, as rebuilt from what went upstream."""
    meta = json.loads(outcome.body)["params"]["_meta"]
    info = meta.get(CLIENT_INFO_META_KEY)
    state = ClientState(outcome.answer.version, meta[CLIENT_CAPABILITIES_META_KEY], info)
    return msgspec.json.encode(state).decode()


def initialize(version: str = "2025-11-25") -> Upstream:
    params = {"protocolVersion": version, "capabilities": CAPABILITIES, "clientInfo": INFO}
    outcome = run(request("initialize", params, 0), None)
    assert isinstance(outcome, Upstream)
    return outcome


def test_initialize_goes_upstream_as_server_discover_with_the_client_in_its_meta() -> None:
    outcome = initialize()
    sent = json.loads(outcome.body)
    assert sent["method"] == "server/discover" and sent["id"] == 0
    meta = sent["params"]["_meta"]
    assert meta[PROTOCOL_VERSION_META_KEY] == MODERN_VERSION
    # Server-to-client requests cannot be carried to a translated session's client.
    assert meta[CLIENT_CAPABILITIES_META_KEY] == {"experimental": {}}
    assert meta[CLIENT_INFO_META_KEY] == {"name": "agent", "title": "Agent", "version": "1.2"}
    assert dict(outcome.headers) == {
        b"mcp-protocol-version": b"2026-07-28",
        b"mcp-method": b"server/discover",
    }


@pytest.mark.parametrize(
    ("offered", "agreed"),
    [("2025-11-25", "2025-11-25"), ("2025-06-18", "2025-06-18"), ("2099-01-01", "2025-11-25")],
)
def test_the_session_settles_on_the_offered_version_where_it_is_a_handshake_one(
    offered: str, agreed: str
) -> None:
    assert initialize(offered).answer.version == agreed


DISCOVERED = {
    "jsonrpc": "2.0",
    "id": 0,
    "result": {
        "resultType": "complete",
        "supportedVersions": ["2026-07-28"],
        "capabilities": {
            "tools": {"listChanged": True},
            "resources": {"listChanged": True, "subscribe": True},
            "logging": {},
        },
        "instructions": "be kind",
        "cacheScope": "private",
        "ttlMs": 0,
        "_meta": {SERVER_INFO_META_KEY: {"name": "srv", "version": "9"}},
    },
}


def test_the_discover_result_becomes_the_initialize_result_and_the_session_is_minted() -> None:
    answer = initialize().answer
    out = answer.rewrite(body_of(DISCOVERED), event_stream=False)
    assert out is not None
    assert json.loads(out) == {
        "jsonrpc": "2.0",
        "id": 0,
        "result": {
            "protocolVersion": "2025-11-25",
            # No GET stream: nothing may promise list-changed or update notifications.
            "capabilities": {"tools": {}, "resources": {}, "logging": {}},
            "serverInfo": {"name": "srv", "version": "9"},
            "instructions": "be kind",
        },
    }
    assert answer.answer_headers() == ((b"mcp-session-id", b"v1.k1.TOKEN.MAC"),)
    assert answer.answer_status(200) == 200


def test_a_failed_discover_grants_no_session_and_its_error_goes_out_with_200() -> None:
    answer = initialize().answer
    error = {"jsonrpc": "2.0", "id": 0, "error": {"code": -32601, "message": "Method not found"}}
    assert answer.rewrite(body_of(error), event_stream=False) is not None
    assert answer.answer_headers() == ()
    assert answer.answer_status(404) == 200


def test_an_answer_that_is_no_json_rpc_keeps_its_status() -> None:
    answer = initialize().answer
    assert answer.rewrite(b"<html>bad gateway</html>", event_stream=False) is None
    assert answer.answer_status(502) == 502
    assert answer.answer_headers() == ()


def test_a_later_request_carries_the_session_state_in_its_meta_and_headers() -> None:
    state = outcome_state(initialize())
    params = {"name": "count", "arguments": {"n": 2}, "_meta": {"progressToken": 9}}
    outcome = run(request("tools/call", params), state)
    assert isinstance(outcome, Upstream)
    sent = json.loads(outcome.body)
    assert sent["params"]["arguments"] == {"n": 2}
    assert sent["params"]["_meta"] == {
        "progressToken": 9,
        PROTOCOL_VERSION_META_KEY: MODERN_VERSION,
        CLIENT_CAPABILITIES_META_KEY: {"experimental": {}},
        CLIENT_INFO_META_KEY: {"name": "agent", "title": "Agent", "version": "1.2"},
        LOG_LEVEL_META_KEY: "debug",
    }
    assert dict(outcome.headers) == {
        b"mcp-protocol-version": b"2026-07-28",
        b"mcp-method": b"tools/call",
        b"mcp-name": b"count",
    }
    assert outcome.answer.token is None


def test_a_request_without_params_gets_them_for_its_meta() -> None:
    outcome = run(request("tools/list"), outcome_state(initialize()))
    assert isinstance(outcome, Upstream)
    assert PROTOCOL_VERSION_META_KEY in json.loads(outcome.body)["params"]["_meta"]
    assert b"mcp-name" not in dict(outcome.headers)


def test_ping_and_set_level_are_answered_here_with_empty_results() -> None:
    state = outcome_state(initialize())
    for method, params in (("ping", None), ("logging/setLevel", {"level": "info"})):
        outcome = run(request(method, params, 11), state)
        assert isinstance(outcome, LocalAnswer)
        assert outcome.status == 200 and outcome.reason is None
        assert json.loads(outcome.body) == {"jsonrpc": "2.0", "id": 11, "result": {}}


def test_notifications_and_responses_are_accepted_here() -> None:
    state = outcome_state(initialize())
    note = body_of({"jsonrpc": "2.0", "method": "notifications/initialized"})
    response = body_of({"jsonrpc": "2.0", "id": 5, "result": {}})
    for body in (note, response):
        outcome = run(body, state)
        assert isinstance(outcome, LocalAnswer) and (outcome.status, outcome.body) == (202, b"")


def test_a_request_before_initialize_is_refused_as_the_reference_sdk_does() -> None:
    outcome = run(request("tools/list"), None)
    assert isinstance(outcome, LocalAnswer) and outcome.status == 400
    assert json.loads(outcome.body)["error"]["message"] == MISSING_SESSION


def test_params_that_are_no_object_are_refused_in_band() -> None:
    outcome = run(request("tools/list", [1, 2]), outcome_state(initialize()))  # type: ignore[arg-type]
    assert isinstance(outcome, LocalAnswer) and outcome.status == 200
    assert json.loads(outcome.body)["error"]["code"] == -32602


def test_capabilities_too_large_for_a_token_are_refused() -> None:
    params = {
        "protocolVersion": "2025-11-25",
        "capabilities": {"experimental": {"x": "y" * MAX_TRANSLATED_STATE_BYTES}},
        "clientInfo": INFO,
    }
    outcome = run(request("initialize", params, 0), None)
    assert isinstance(outcome, LocalAnswer) and outcome.status == 400
    assert "too large" in json.loads(outcome.body)["error"]["message"]


def test_the_state_round_trips_and_garbage_is_no_state() -> None:
    state = ClientState("2025-11-25", {"experimental": {}}, {"name": "a"})
    assert decode_state(msgspec.json.encode(state).decode()) == state
    assert decode_state("not json") is None
    assert decode_state('{"a": 1}') is None


# -- answers ----------------------------------------------------------------------------------


def call_answer() -> AnswerTranslation:
    return AnswerTranslation(3, "tools/call")


def test_a_result_loses_the_fields_2025_11_25_does_not_know() -> None:
    result = {
        "content": [{"type": "text", "text": "hi"}],
        "resultType": "complete",
        "ttlMs": 0,
        "cacheScope": "private",
        "_meta": {SERVER_INFO_META_KEY: {"name": "srv"}, "keep": 1},
    }
    out = call_answer().rewrite(
        body_of({"jsonrpc": "2.0", "id": 3, "result": result}), event_stream=False
    )
    assert out is not None
    assert json.loads(out)["result"] == {
        "content": [{"type": "text", "text": "hi"}],
        "_meta": {"keep": 1},
    }


def test_an_input_required_result_becomes_an_error_that_says_why() -> None:
    result = {"resultType": "input_required", "inputRequests": {}, "requestState": "s"}
    answer = call_answer()
    out = answer.rewrite(body_of({"jsonrpc": "2.0", "id": 3, "result": result}), event_stream=False)
    assert out is not None
    message = json.loads(out)
    assert "result" not in message and message["error"]["code"] == -32603
    assert "cannot carry" in message["error"]["message"]


def test_a_missing_resource_is_minus_32002_again() -> None:
    answer = AnswerTranslation(3, "resources/read")
    error = {"code": -32602, "message": "Unknown resource: x://y", "data": {"uri": "x://y"}}
    out = answer.rewrite(body_of({"jsonrpc": "2.0", "id": 3, "error": error}), event_stream=False)
    assert out is not None
    assert json.loads(out)["error"]["code"] == RESOURCE_NOT_FOUND
    assert answer.answer_status(400) == 200


def test_invalid_params_elsewhere_stay_invalid_params() -> None:
    error = {"code": -32602, "message": "bad", "data": {"uri": "x"}}
    out = call_answer().rewrite(
        body_of({"jsonrpc": "2.0", "id": 3, "error": error}), event_stream=False
    )
    assert out is not None and json.loads(out)["error"]["code"] == -32602


@pytest.mark.parametrize("status", [401, 403, 429])
def test_statuses_that_mean_more_than_their_error_are_kept(status: int) -> None:
    answer = call_answer()
    error = {"jsonrpc": "2.0", "id": 3, "error": {"code": -32600, "message": "no"}}
    answer.rewrite(body_of(error), event_stream=False)
    assert answer.answer_status(status) == status


def test_another_messages_answer_or_a_notification_is_left_alone() -> None:
    answer = call_answer()
    other = body_of({"jsonrpc": "2.0", "id": 4, "result": {"resultType": "complete"}})
    note = body_of({"jsonrpc": "2.0", "method": "notifications/progress", "params": {}})
    assert answer.rewrite(other, event_stream=False) is None
    assert answer.rewrite(note, event_stream=False) is None
    assert answer.answer_status(400) == 400


def test_in_a_held_event_stream_only_the_response_event_is_rewritten() -> None:
    progress = b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}'
    final = body_of(
        {"jsonrpc": "2.0", "id": 3, "result": {"content": [], "resultType": "complete"}}
    )
    stream = (
        b"event: message\r\nid: 1\r\ndata: "
        + progress
        + b"\r\n\r\nid: 2\r\ndata: "
        + final
        + b"\r\n\r\n"
    )
    out = call_answer().rewrite(stream, event_stream=True)
    assert out is not None
    assert out.startswith(b"event: message\r\nid: 1\r\ndata: " + progress + b"\r\n\r\n")
    assert out.endswith(b'id: 2\r\ndata: {"jsonrpc":"2.0","id":3,"result":{"content":[]}}\r\n\r\n')


def test_what_is_held() -> None:
    assert call_answer().holds(200, event_stream=False)
    assert call_answer().holds(404, event_stream=False)
    # A stream's events go as they come (progress must not wait for the result).
    assert not call_answer().holds(200, event_stream=True)
    assert AnswerTranslation(0, "initialize").holds(200, event_stream=True)
