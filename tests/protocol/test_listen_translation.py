"""A 2026-07-28 ``subscriptions/listen`` on a 2025-11-25 backend, sans-IO
(``proxy.protocol.listen_translation``): the session's GET it becomes, the
acknowledgment, and which of the backend's events the client gets, tagged."""

from __future__ import annotations

import json
from typing import Any

from proxy.protocol.eras import SUBSCRIPTION_ID_META_KEY
from proxy.protocol.listen_translation import ACKNOWLEDGED, ListenAnswer
from proxy.protocol.upstream_sessions import UpstreamSession

META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


def listen(**wanted: Any) -> ListenAnswer:
    message = {
        "jsonrpc": "2.0",
        "id": "listen-1",
        "method": "subscriptions/listen",
        "params": {"notifications": wanted, "_meta": META},
    }
    return ListenAnswer(message, "listen-1")


def event(message: dict[str, Any]) -> bytes:
    return b"event: message\ndata: " + json.dumps(message).encode() + b"\n\n"


def data_of(stream: bytes) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:]) for line in stream.decode().splitlines() if line.startswith("data: ")
    ]


def test_the_listen_becomes_the_sessions_get_with_its_subscriptions() -> None:
    answer = listen(toolsListChanged=True, resourceSubscriptions=["test://a", "test://b"])
    assert answer.upstream_method == b"GET"
    assert [json.loads(b)["params"]["uri"] for b in answer.subscribe_bodies()] == [
        "test://a",
        "test://b",
    ]
    assert answer.within(("r", "", "k"), UpstreamSession("s1", {}), b"/mcp") == b""
    assert dict(answer.request_headers) == {
        b"mcp-protocol-version": b"2025-11-25",
        b"mcp-session-id": b"s1",
        b"accept": b"text/event-stream",
    }
    assert {b"content-length", b"content-type", b"mcp-method"} <= answer.dropped_headers
    assert answer.cancellation() is None  # closing the GET ends it


def test_the_stream_opens_with_the_acknowledgment_of_what_was_asked() -> None:
    answer = listen(toolsListChanged=True, promptsListChanged=False)
    [ack] = data_of(answer.stream_prelude())
    assert ack == {
        "jsonrpc": "2.0",
        "method": ACKNOWLEDGED,
        "params": {
            "notifications": {"toolsListChanged": True},
            "_meta": {SUBSCRIPTION_ID_META_KEY: "listen-1"},
        },
    }


def test_only_what_was_asked_for_goes_out_tagged() -> None:
    answer = listen(toolsListChanged=True, resourceSubscriptions=["test://a"])
    stream = b"".join(
        [
            event({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}),
            event({"jsonrpc": "2.0", "method": "notifications/prompts/list_changed"}),
            event(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/resources/updated",
                    "params": {"uri": "test://a"},
                }
            ),
            event(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/resources/updated",
                    "params": {"uri": "test://other"},
                }
            ),
            event({"jsonrpc": "2.0", "method": "notifications/message", "params": {}}),
            event({"jsonrpc": "2.0", "id": 5, "method": "ping"}),
            b": keep-alive\n\n",
        ]
    )
    out = answer.rewrite_relayed(stream)
    assert out is not None
    assert data_of(out) == [
        {
            "jsonrpc": "2.0",
            "method": "notifications/tools/list_changed",
            "params": {"_meta": {SUBSCRIPTION_ID_META_KEY: "listen-1"}},
        },
        {
            "jsonrpc": "2.0",
            "method": "notifications/resources/updated",
            "params": {"uri": "test://a", "_meta": {SUBSCRIPTION_ID_META_KEY: "listen-1"}},
        },
    ]
    assert out.endswith(b": keep-alive\n\n")  # a comment is no event: it stays


def test_a_backend_that_refuses_the_get_is_the_clients_error() -> None:
    answer = listen(toolsListChanged=True)
    out = answer.rewrite(b"Method Not Allowed", event_stream=False)
    assert out is not None
    error = json.loads(out)
    assert error["id"] == "listen-1" and error["error"]["code"] == -32603
    assert answer.answer_status(405) == 502
    assert answer.answer_content_type() == b"application/json"
