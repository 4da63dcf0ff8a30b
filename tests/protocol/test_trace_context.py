"""W3C trace context on the request path (proxy.protocol.trace_context), and the machine
carrying it to the backend: the parent the client named, the sampling decision, the
backend's ``traceparent`` naming the proxy's attempt, and a message's
``_meta.traceparent`` rewritten to match."""

from __future__ import annotations

import json

import pytest

from proxy.protocol.trace_context import (
    format_traceparent,
    parse_traceparent,
    start_trace,
    with_meta_traceparent,
)
from proxy.routing import Backend
from tests.support.machine import World, make_config
from tests.support.machine_traffic import mcp_post, ok
from tests.support.wire import backend_request

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
SAMPLED = f"00-{TRACE}-{PARENT}-01"


def test_a_traceparent_is_read_as_the_spec_says() -> None:
    assert parse_traceparent(SAMPLED) == (int(TRACE, 16), int(PARENT, 16), True)
    assert parse_traceparent(SAMPLED[:-2] + "00") == (int(TRACE, 16), int(PARENT, 16), False)
    # A later version may add fields; version 00 may not.
    assert parse_traceparent("01" + SAMPLED[2:] + "-extra") is not None
    for bad in (
        SAMPLED + "-extra",
        "ff" + SAMPLED[2:],
        SAMPLED.replace(TRACE, "0" * 32),
        SAMPLED.replace(PARENT, "0" * 16),
        SAMPLED.upper(),
        SAMPLED[:-1],
        "garbage",
    ):
        assert parse_traceparent(bad) is None, bad
    assert format_traceparent(1, 2) == b"00-" + b"0" * 31 + b"1-" + b"0" * 15 + b"2-01"


def test_sampling_follows_the_parent_and_the_ratio_for_roots() -> None:
    followed = start_trace(SAMPLED.encode(), b"k=v", None, 0.0001)
    assert followed is not None and followed.parent_span_id == int(PARENT, 16)
    assert followed.tracestate == b"k=v"
    assert start_trace(SAMPLED[:-2].encode() + b"00", None, None, 1.0) is None
    assert start_trace(None, None, None, 0.0) is None
    root = start_trace(None, None, None, 1.0)
    assert root is not None and root.parent_span_id == 0 and root.trace_id
    from_meta = start_trace(None, b"k=v", SAMPLED, 0.0001)
    assert from_meta is not None and from_meta.trace_id == int(TRACE, 16)
    assert from_meta.tracestate == b""  # the header's state is not the message's
    rates = sum(start_trace(None, None, None, 0.25) is not None for _ in range(4000))
    assert 800 < rates < 1200


def test_each_attempt_has_its_span_and_ends_the_one_before() -> None:
    trace = start_trace(None, None, None, 1.0)
    assert trace is not None
    reserved = trace.reserve()
    first = trace.attempt(Backend.from_url("http://a:1"), 1.0)
    assert first == reserved
    second = trace.attempt(Backend.from_url("http://b:1"), 2.0)
    assert second != first
    assert trace.attempts[0].ended == 2.0 and trace.attempts[1].ended is None


def test_the_meta_traceparent_of_a_message_is_replaced() -> None:
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"_meta": {"traceparent": SAMPLED}}}
    ).encode()
    out = with_meta_traceparent(body, b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")
    assert out is not None
    assert json.loads(out)["params"]["_meta"]["traceparent"].startswith("00-111")
    assert with_meta_traceparent(b'{"jsonrpc":"2.0","id":1,"method":"ping"}', b"x") is None


ROUTES = [{"prefix": "/mcp", "kind": "mcp", "backends": ["http://10.0.1.1:80"]}]


def traced_world(ratio: float) -> World:
    return World(make_config(ROUTES, tracing={"sample_ratio": ratio}))


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_the_backend_is_told_the_proxys_span(ratio: float) -> None:
    w = traced_world(ratio)
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {"name": "echo", "_meta": {"traceparent": SAMPLED}},
        }
    ).encode()
    w.feed(
        mcp_post(
            body,
            b"MCP-Protocol-Version: 2025-11-25",
            b"traceparent: " + SAMPLED.encode(),
            b"tracestate: vendor=1",
        )
    )
    sent = backend_request(w.t.up.sent)
    w.answer(ok(b'{"jsonrpc":"2.0","id":3,"result":{}}', b"Content-Type: application/json"))
    if not ratio:
        # Off: nothing is looked at or changed.
        assert sent.header(b"traceparent") == SAMPLED.encode() and sent.body == body
        assert w.env.traced == []
        return
    [x] = w.env.traced
    trace = x.trace
    assert trace is not None and len(trace.attempts) == 1
    assert trace.trace_id == int(TRACE, 16) and trace.parent_span_id == int(PARENT, 16)
    expected = format_traceparent(trace.trace_id, trace.attempts[0].span_id)
    assert sent.header(b"traceparent") == expected
    assert sent.header(b"tracestate") == b"vendor=1"
    assert json.loads(sent.body)["params"]["_meta"]["traceparent"] == expected.decode()
    assert sent.header(b"content-length") == b"%d" % len(sent.body)
