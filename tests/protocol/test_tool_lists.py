"""``ToolListFilter``: a ``tools/list`` answer rewritten for a caller with an allow-list,
JSON and event streams, every other byte kept."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.protocol.tool_lists import ToolListFilter

TOOLS = [{"name": n, "inputSchema": {"type": "object"}} for n in ("a", "b", "c")]


def listing(request_id: object = 3, **result: Any) -> bytes:
    body = {"jsonrpc": "2.0", "id": request_id, "result": {"tools": TOOLS, **result}}
    return json.dumps(body).encode()


def names(payload: bytes) -> list[str]:
    return [t["name"] for t in json.loads(payload)["result"]["tools"]]


def test_a_json_answer_lists_only_the_allowed_tools() -> None:
    out = ToolListFilter(frozenset({"a", "c"}), 3).rewrite(listing(), event_stream=False)
    assert out is not None and names(out) == ["a", "c"]


def test_the_next_page_cursor_stays() -> None:
    out = ToolListFilter(frozenset({"b"}), 3).rewrite(
        listing(nextCursor="page-2"), event_stream=False
    )
    assert out is not None and json.loads(out)["result"]["nextCursor"] == "page-2"
    assert names(out) == ["b"]


def test_a_page_with_nothing_allowed_is_empty_but_keeps_its_cursor() -> None:
    out = ToolListFilter(frozenset({"z"}), 3).rewrite(listing(nextCursor="p2"), event_stream=False)
    assert out is not None
    assert json.loads(out)["result"] == {"tools": [], "nextCursor": "p2"}


@pytest.mark.parametrize("allowed", [frozenset({"a"}), None])
def test_a_public_cache_scope_becomes_private(allowed: frozenset[str] | None) -> None:
    out = ToolListFilter(allowed, 3).rewrite(
        listing(ttlMs=60000, cacheScope="public"), event_stream=False
    )
    assert out is not None
    result = json.loads(out)["result"]
    assert (result["cacheScope"], result["ttlMs"]) == ("private", 60000)


def test_nothing_to_change_leaves_the_answer_alone() -> None:
    everything = ToolListFilter(frozenset({"a", "b", "c", "d"}), 3)
    assert everything.rewrite(listing(), event_stream=False) is None
    assert (
        ToolListFilter(None, 3).rewrite(listing(cacheScope="private"), event_stream=False) is None
    )


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
    assert ToolListFilter(frozenset({"a"}), 3).rewrite(body, event_stream=False) is None


def test_an_event_stream_has_its_response_event_rewritten_and_the_rest_kept() -> None:
    progress = (
        b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\r\n\r\n'
    )
    payload = listing()
    split = payload.index(b'"result"')
    response = b"id: 7\nevent: message\ndata: %s\ndata: %s\n\n" % (payload[:split], payload[split:])
    comment = b": keep-alive\n\n"
    stream = progress + comment + response + b"data: {}\n\n"
    out = ToolListFilter(frozenset({"b"}), 3).rewrite(stream, event_stream=True)
    assert out is not None
    assert out.startswith(progress + comment) and out.endswith(b"data: {}\n\n")
    rewritten = out[len(progress + comment) : -len(b"data: {}\n\n")]
    lines = rewritten.split(b"\n")
    assert lines[:2] == [b"id: 7", b"event: message"]
    assert lines[2].startswith(b"data: ") and lines[3:] == [b"", b""]
    assert names(lines[2][len(b"data: ") :]) == ["b"]


def test_an_event_stream_without_the_response_is_left_alone() -> None:
    stream = b'data: {"jsonrpc":"2.0","method":"notifications/message"}\n\n'
    assert ToolListFilter(frozenset({"a"}), 3).rewrite(stream, event_stream=True) is None


def test_an_unfinished_last_event_is_filtered_too() -> None:
    # No client that follows the SSE rules reads it, but a lax one might.
    out = ToolListFilter(frozenset({"a"}), 3).rewrite(b"data: " + listing(), event_stream=True)
    assert out is not None and out.startswith(b"data: ") and names(out[6:]) == ["a"]
