"""``CallerView``: a ``tools/list`` answer rewritten for a caller with an allow-list (JSON
and event streams, single answers and batches, every other byte kept), and hidden tools'
calls sent under stand-in names that their answers lose again."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from proxy.protocol.jsonrpc import decode_batch, decode_message
from proxy.protocol.tool_lists import STAND_IN_PREFIX, CallerView

IDS = frozenset({3})


def allowed_only(*names: str) -> Callable[[object], bool]:
    return lambda name: name in names


TOOLS = [{"name": n, "inputSchema": {"type": "object"}} for n in ("a", "b", "c")]


def listing(request_id: object = 3, **result: Any) -> bytes:
    body = {"jsonrpc": "2.0", "id": request_id, "result": {"tools": TOOLS, **result}}
    return json.dumps(body).encode()


def names(payload: bytes) -> list[str]:
    return [t["name"] for t in json.loads(payload)["result"]["tools"]]


def test_a_json_answer_lists_only_the_allowed_tools() -> None:
    out = CallerView(allowed_only("a", "c"), IDS).rewrite(listing(), event_stream=False)
    assert out is not None and names(out) == ["a", "c"]


def test_the_next_page_cursor_stays() -> None:
    out = CallerView(allowed_only("b"), IDS).rewrite(
        listing(nextCursor="page-2"), event_stream=False
    )
    assert out is not None and json.loads(out)["result"]["nextCursor"] == "page-2"
    assert names(out) == ["b"]


def test_a_page_with_nothing_allowed_is_empty_but_keeps_its_cursor() -> None:
    out = CallerView(allowed_only("z"), IDS).rewrite(listing(nextCursor="p2"), event_stream=False)
    assert out is not None
    assert json.loads(out)["result"] == {"tools": [], "nextCursor": "p2"}


@pytest.mark.parametrize("limited", [True, False])
def test_a_public_cache_scope_becomes_private(limited: bool) -> None:
    out = CallerView(allowed_only("a") if limited else None, IDS).rewrite(
        listing(ttlMs=60000, cacheScope="public"), event_stream=False
    )
    assert out is not None
    result = json.loads(out)["result"]
    assert (result["cacheScope"], result["ttlMs"]) == ("private", 60000)


def test_nothing_to_change_leaves_the_answer_alone() -> None:
    everything = CallerView(allowed_only("a", "b", "c", "d"), IDS)
    assert everything.rewrite(listing(), event_stream=False) is None
    assert CallerView(None, IDS).rewrite(listing(cacheScope="private"), event_stream=False) is None


@pytest.mark.parametrize(
    "body",
    [
        listing(request_id=4),  # another request's answer
        listing(request_id="3"),  # a string id is another id
        b'{"jsonrpc":"2.0","id":3,"error":{"code":-32601,"message":"no"}}',
        b"not json",
        b'[{"jsonrpc":"2.0","id":3,"result":{"tools":[]}}]',
        b'{"jsonrpc":"2.0","id":3,"result":{"tools":"odd"}}',
    ],
)
def test_what_is_not_this_requests_tool_list_is_left_alone(body: bytes) -> None:
    assert CallerView(allowed_only("a"), IDS).rewrite(body, event_stream=False) is None


def test_an_event_stream_has_its_response_event_rewritten_and_the_rest_kept() -> None:
    progress = (
        b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\r\n\r\n'
    )
    payload = listing()
    split = payload.index(b'"result"')
    response = b"id: 7\nevent: message\ndata: %s\ndata: %s\n\n" % (payload[:split], payload[split:])
    comment = b": keep-alive\n\n"
    stream = progress + comment + response + b"data: {}\n\n"
    out = CallerView(allowed_only("b"), IDS).rewrite(stream, event_stream=True)
    assert out is not None
    assert out.startswith(progress + comment) and out.endswith(b"data: {}\n\n")
    rewritten = out[len(progress + comment) : -len(b"data: {}\n\n")]
    lines = rewritten.split(b"\n")
    assert lines[:2] == [b"id: 7", b"event: message"]
    assert lines[2].startswith(b"data: ") and lines[3:] == [b"", b""]
    assert names(lines[2][len(b"data: ") :]) == ["b"]


def test_an_event_stream_without_the_response_is_left_alone() -> None:
    stream = b'data: {"jsonrpc":"2.0","method":"notifications/message"}\n\n'
    assert CallerView(allowed_only("a"), IDS).rewrite(stream, event_stream=True) is None


def test_an_unfinished_last_event_is_filtered_too() -> None:
    # No client that follows the SSE rules reads it, but a lax one might.
    out = CallerView(allowed_only("a"), IDS).rewrite(b"data: " + listing(), event_stream=True)
    assert out is not None and out.startswith(b"data: ") and names(out[6:]) == ["a"]


def test_a_batch_answer_has_its_lists_filtered_and_the_rest_kept() -> None:
    answers = [json.loads(listing()), {"jsonrpc": "2.0", "id": 4, "result": {"tools": TOOLS}}]
    out = CallerView(allowed_only("a"), IDS).rewrite(
        json.dumps(answers).encode(), event_stream=False
    )
    assert out is not None
    first, second = json.loads(out)
    assert [t["name"] for t in first["result"]["tools"]] == ["a"]
    assert second == answers[1]  # id 4 was not a list request of this caller


def call(request_id: int, name: str) -> dict[str, Any]:
    params = {"name": name, "arguments": {"x": name}}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


def test_a_hidden_call_goes_under_a_stand_in_and_its_answer_names_it_again() -> None:
    body = json.dumps(call(5, "secret")).encode()
    view = CallerView.of((decode_message(body),), body, allowed_only("a"), {"secret"})
    assert view is not None and view.body is not None and view.holds(404, event_stream=False)
    sent = json.loads(view.body)
    stand_in = sent["params"]["name"]
    assert stand_in.startswith(STAND_IN_PREFIX) and b"secret" not in view.body.replace(
        b'"x":"secret"', b""
    )
    assert sent["params"]["arguments"] == {"x": "secret"}  # only the name changes
    # Its Mcp-Name (the machine writes it, with the new Content-Length:
    # test_connection_tool_lists.py).
    assert view.stand_in() == stand_in.encode()
    answer = {
        "jsonrpc": "2.0",
        "id": 5,
        "error": {"code": -32602, "message": f"Unknown tool: {stand_in}"},
    }
    out = view.rewrite(json.dumps(answer).encode(), event_stream=False)
    assert out is not None and json.loads(out)["error"]["message"] == "Unknown tool: secret"


def test_a_name_that_needs_escaping_comes_back_escaped() -> None:
    name = 'quo"te\\'
    body = json.dumps(call(5, name)).encode()
    view = CallerView.of((decode_message(body),), body, allowed_only(), {name})
    assert view is not None and view.body is not None
    stand_in = json.loads(view.body)["params"]["name"]
    answer = json.dumps(
        {"jsonrpc": "2.0", "id": 5, "result": {"text": f"Unknown tool: {stand_in}"}}
    )
    out = view.rewrite(answer.encode(), event_stream=False)
    assert out is not None and json.loads(out)["result"]["text"] == f"Unknown tool: {name}"


def test_a_batch_gets_a_stand_in_per_hidden_tool_and_its_list_filtered() -> None:
    batch = [
        call(1, "a"),
        call(2, "b"),
        call(3, "b"),
        {"jsonrpc": "2.0", "id": 4, "method": "tools/list"},
    ]
    body = json.dumps(batch).encode()
    view = CallerView.of(decode_batch(body), body, allowed_only("a"), {"b"})
    assert view is not None and view.body is not None and view.list_ids == {4}
    sent = json.loads(view.body)
    names = [m["params"]["name"] for m in sent[:3]]
    assert names[0] == "a" and names[1] == names[2] and names[1].startswith(STAND_IN_PREFIX)
    assert view.stand_in() == names[1].encode()


def test_a_request_with_nothing_to_rewrite_has_no_view() -> None:
    body = json.dumps(call(5, "a")).encode()
    assert CallerView.of((decode_message(body),), body, allowed_only("a"), set()) is None
