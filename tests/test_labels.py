"""Bounded metric labels: whatever clients or backends send, the label values stay in
fixed sets."""

from __future__ import annotations

import random
import string

from proxy.labels import (
    HTTP_METHOD_LABELS,
    MCP_METHOD_LABELS,
    OTHER,
    STATUS_LABELS,
    ToolLabels,
    http_method_label,
    mcp_method_label,
    status_label,
    tool_label,
)


def _junk(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(string.printable) for _ in range(length))


def test_http_methods_fold_into_other() -> None:
    assert http_method_label(b"GET") == "GET"
    assert http_method_label("PATCH") == "PATCH"
    assert http_method_label(b"FOO1") == OTHER
    assert http_method_label(b"get") == OTHER  # methods are case-sensitive
    rng = random.Random(1)
    labels = {http_method_label(_junk(rng, 6).encode()) for _ in range(1000)}
    assert labels <= HTTP_METHOD_LABELS


def test_mcp_methods_fold_into_classes() -> None:
    assert mcp_method_label("tools/call") == "tools/call"
    assert mcp_method_label("notifications/initialized") == "notification"
    assert mcp_method_label("notifications/made-up") == "notification"
    assert mcp_method_label("x/made-up-by-a-client") == OTHER
    assert mcp_method_label(None) == OTHER
    assert mcp_method_label(None, is_response=True) == "response"
    rng = random.Random(2)
    labels = {mcp_method_label(_junk(rng, 12)) for _ in range(1000)}
    assert labels <= MCP_METHOD_LABELS


def test_status_codes_fold_into_other() -> None:
    assert status_label(200) == "200"
    assert status_label(499) == "499"
    assert status_label(299) == OTHER
    assert status_label(999) == OTHER
    assert {status_label(code) for code in range(-5, 2000)} <= STATUS_LABELS


def test_tool_labels_are_configured_or_first_seen_up_to_the_limit() -> None:
    tools = ToolLabels(configured=["search", "bad name"], limit=3)
    assert tool_label(None, tools) == "none"
    assert tool_label("search", tools) == "search"
    assert tool_label("bad name", tools) == OTHER  # not a valid tool name: never a label
    assert [tool_label(n, tools) for n in ("a", "b", "c", "d", "a")] == ["a", "b", "c", OTHER, "a"]
    assert tool_label("x" * 129, tools) == OTHER
    # A new snapshot replaces the configured names; names already seen keep theirs.
    tools.configure(["fetch"])
    assert tool_label("fetch", tools) == "fetch"
    assert tool_label("search", tools) == OTHER
    assert tool_label("b", tools) == "b"


def test_random_tool_names_give_a_bounded_set() -> None:
    tools = ToolLabels(configured=["search"])
    rng = random.Random(3)
    labels = {tool_label(_junk(rng, rng.randint(1, 20)), tools) for _ in range(5000)}
    assert len(labels) <= 1 + tools.limit + 1  # configured + seen + other
