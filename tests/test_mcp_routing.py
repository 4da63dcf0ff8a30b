"""proxy.mcp_routing and the health/balancing parts of proxy.routing: pure, no sockets."""

from __future__ import annotations

import random

import msgspec
import pytest

from proxy.mcp_routing import (
    SESSION_NOT_FOUND,
    McpDecision,
    McpRefusal,
    check_origin,
    decide,
    method_label,
    rewrite_endpoint_block,
    with_session,
)
from proxy.protocol.mcp import Era
from proxy.protocol.session_token import Keyring, SessionTokens
from proxy.routing import Backend, BackendHealth, pick_least_loaded, replica_id

KEY = b"k" * 40
TOKENS = SessionTokens(Keyring({"k1": KEY}, "k1"))
OTHER = SessionTokens(Keyring({"k1": b"x" * 40}, "k1"))
INIT = (
    b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25",'
    b'"capabilities":{},"clientInfo":{"name":"t","version":"1"}}}'
)
CALL_2026 = (
    b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{},'
    b'"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}'
)
MODERN = [
    (b"mcp-protocol-version", b"2026-07-28"),
    (b"mcp-method", b"tools/call"),
    (b"mcp-name", b"echo"),
]


def test_initialize_without_session_picks_a_replica_and_issues_a_session() -> None:
    decision = decide(b"POST", b"/mcp", [], INIT, TOKENS)
    assert decision.era is Era.STATEFUL
    assert decision.replica is None
    assert decision.issue_session
    assert decision.method == "initialize"
    assert decision.request_id == 1


def test_a_session_token_routes_to_its_replica_with_the_backend_id_restored() -> None:
    token = TOKENS.issue("replica-a", "backend-sid-1")
    headers = [(b"mcp-session-id", token.encode())]
    decision = decide(
        b"POST", b"/mcp", headers, b'{"jsonrpc":"2.0","id":2,"method":"ping"}', TOKENS
    )
    assert (decision.replica, decision.backend_session) == ("replica-a", "backend-sid-1")
    upstream = list(headers)
    with_session(upstream, "backend-sid-1")
    assert upstream == [(b"mcp-session-id", b"backend-sid-1")]


@pytest.mark.parametrize("method", [b"GET", b"DELETE"])
def test_get_and_delete_follow_the_session_too(method: bytes) -> None:
    token = TOKENS.issue("r", "sid")
    decision = decide(method, b"/mcp", [(b"mcp-session-id", token.encode())], None, TOKENS)
    assert decision.replica == "r"
    assert decision.backend_session == "sid"


@pytest.mark.parametrize("tokens", [TOKENS, OTHER])
def test_tampered_or_foreign_tokens_are_404_session_not_found(tokens: SessionTokens) -> None:
    token = TOKENS.issue("r", "sid")
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    for value in (tampered, "not-a-token") if tokens is TOKENS else (token,):
        with pytest.raises(McpRefusal) as refused:
            decide(
                b"POST",
                b"/mcp",
                [(b"mcp-session-id", value.encode())],
                b'{"jsonrpc":"2.0","id":3,"method":"ping"}',
                tokens,
            )
        assert refused.value.status == 404
        body = msgspec.json.decode(refused.value.body())
        assert body == {
            "jsonrpc": "2.0",
            "id": 3,
            "error": {"code": -32600, "message": SESSION_NOT_FOUND},
        }


def test_modern_post_with_matching_headers_is_balanced_and_cancellable() -> None:
    decision = decide(b"POST", b"/mcp", MODERN, CALL_2026, TOKENS)
    assert decision.era is Era.STATELESS
    assert decision.replica is None
    assert decision.cancel_on_disconnect
    assert not decision.issue_session
    assert decision.name == "echo"


def test_modern_post_with_a_mismatched_method_header_is_400_minus_32020() -> None:
    headers = [MODERN[0], (b"mcp-method", b"tools/list"), MODERN[2]]
    with pytest.raises(McpRefusal) as refused:
        decide(b"POST", b"/mcp", headers, CALL_2026, TOKENS)
    assert refused.value.status == 400
    assert refused.value.code == -32020
    assert msgspec.json.decode(refused.value.body())["id"] == 7


@pytest.mark.parametrize("method", [b"GET", b"DELETE"])
def test_modern_get_and_delete_are_405_with_allow_post(method: bytes) -> None:
    with pytest.raises(McpRefusal) as refused:
        decide(method, b"/mcp", [(b"mcp-protocol-version", b"2026-07-28")], None, TOKENS)
    assert refused.value.status == 405
    assert (b"allow", b"POST") in refused.value.headers


def test_invalid_json_is_a_parse_error() -> None:
    with pytest.raises(McpRefusal) as refused:
        decide(b"POST", b"/mcp", [], b"{not json", TOKENS)
    assert (refused.value.status, refused.value.code) == (400, -32700)


BATCH = b'[{"jsonrpc":"2.0","id":2,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/x"}]'


@pytest.mark.parametrize("version", [None, b"2025-03-26"])
def test_a_2025_03_26_batch_goes_to_its_sessions_replica(version: bytes | None) -> None:
    token = TOKENS.issue("replica-a", "sid-1")
    headers = [(b"mcp-session-id", token.encode())]
    if version is not None:
        headers.append((b"mcp-protocol-version", version))
    decision = decide(b"POST", b"/mcp", headers, b" \n" + BATCH, TOKENS)
    assert decision.envelope is None and decision.request_id is None
    assert [m.method for m in decision.batch] == ["ping", "notifications/x"]
    assert (decision.replica, decision.backend_session) == ("replica-a", "sid-1")
    assert method_label(decision, b"POST") == "batch"
    sessionless = decide(b"POST", b"/mcp", [], BATCH, TOKENS)
    assert sessionless.batch and sessionless.replica is None and sessionless.issue_session


@pytest.mark.parametrize("version", [b"2025-06-18", b"2025-11-25", b"2026-07-28", b"2024-11-05"])
def test_batches_of_other_revisions_are_refused(version: bytes) -> None:
    with pytest.raises(McpRefusal) as refused:
        decide(b"POST", b"/mcp", [(b"mcp-protocol-version", version)], BATCH, TOKENS)
    assert (refused.value.status, refused.value.code) == (400, -32600)
    assert "batch" in refused.value.message


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"[]", -32600),
        (b"[1, 2]", -32600),
        (b'[{"jsonrpc":"2.0","id":1,"method":"ping"}, {"id":2}]', -32600),
        (b'[{"jsonrpc":"2.0","id":1,"method":"ping"}', -32700),
        (b"[" + INIT + b"]", -32600),
    ],
)
def test_a_batch_that_is_not_one_is_refused(body: bytes, code: int) -> None:
    with pytest.raises(McpRefusal) as refused:
        decide(b"POST", b"/mcp", [], body, TOKENS)
    assert (refused.value.status, refused.value.code) == (400, code)


def test_a_batch_in_a_session_not_ours_is_404() -> None:
    headers = [(b"mcp-session-id", OTHER.issue("r", "s").encode())]
    with pytest.raises(McpRefusal) as refused:
        decide(b"POST", b"/mcp", headers, BATCH, TOKENS)
    assert refused.value.status == 404


def test_legacy_stream_and_messages() -> None:
    stream = decide(b"GET", b"/sse", [], None, TOKENS)
    assert stream.era is Era.LEGACY_SSE and stream.legacy_stream and stream.replica is None
    token = TOKENS.issue("r", "abc")
    target = f"/messages/?session_id={token}".encode()
    message = decide(b"POST", target, [], b'{"jsonrpc":"2.0","id":1,"method":"ping"}', TOKENS)
    assert message.replica == "r"
    assert message.target == b"/messages/?session_id=abc"


def test_origin_allow_list() -> None:
    allowed = frozenset({b"https://app.example"})
    check_origin([], allowed)
    check_origin([(b"origin", b"https://app.example")], allowed)
    with pytest.raises(McpRefusal) as refused:
        check_origin([(b"origin", b"https://evil.example")], allowed)
    assert refused.value.status == 403


def test_method_labels_stay_bounded() -> None:
    def label(body: bytes) -> str:
        return method_label(decide(b"POST", b"/mcp", [], body, TOKENS), b"POST")

    assert label(INIT) == "initialize"
    assert label(b'{"jsonrpc":"2.0","method":"notifications/initialized"}') == "notification"
    assert label(b'{"jsonrpc":"2.0","id":1,"method":"x/made-up-by-a-client"}') == "other"
    assert label(b'{"jsonrpc":"2.0","id":1,"result":{}}') == "response"
    assert method_label(McpDecision(Era.STATEFUL, None, None), b"GET") == "stream"
    # Without a JSON-RPC body the HTTP method is the label, folded like any other.
    assert method_label(McpDecision(Era.STATEFUL, None, None), b"DELETE") == "DELETE"
    assert method_label(McpDecision(Era.STATEFUL, None, None), b"FOO1") == "other"
    made_up = (f"FOO{i}".encode() for i in range(1000))
    assert {method_label(McpDecision(Era.STATEFUL, None, None), m) for m in made_up} == {"other"}


def test_endpoint_block_rewrite_touches_only_endpoint_events() -> None:
    def upper(value: bytes) -> bytes:
        return value.upper()

    assert rewrite_endpoint_block(b"event: endpoint\ndata: /m?x\n\n", upper) == (
        b"event: endpoint\ndata: /M?X\n\n"
    )
    assert rewrite_endpoint_block(b"event: endpoint\r\ndata:/m\r\n\r\n", upper) == (
        b"event: endpoint\r\ndata: /M\r\n\r\n"
    )
    other = b"event: message\ndata: /m\n\n"
    assert rewrite_endpoint_block(other, upper) == other


def test_passive_ejection_and_return() -> None:
    health = BackendHealth(eject_after=2, eject_seconds=5.0)
    assert health.usable(0.0)
    assert not health.record(False, 1.0)
    assert health.record(True, 1.5) is False  # a success resets the count
    assert not health.record(False, 2.0)
    assert health.record(False, 2.1)  # second consecutive failure: ejected
    assert not health.usable(3.0)
    assert health.usable(7.2)


def test_active_probes_rise_and_fall() -> None:
    health = BackendHealth(rise=2, fall=2)
    assert not health.probe(False)
    assert health.usable(0.0)
    assert health.probe(False)  # second failure: down
    assert not health.usable(0.0)
    assert not health.probe(True)
    assert health.probe(True)  # second pass: up again
    assert health.usable(0.0)


def test_power_of_two_choices_prefers_the_less_loaded() -> None:
    backends = [Backend.from_url(f"http://127.0.0.1:{9000 + i}") for i in range(2)]
    load = {backends[0]: 10, backends[1]: 0}
    rng = random.Random(1)
    picks = {pick_least_loaded(backends, load.__getitem__, rng) for _ in range(20)}
    assert picks == {backends[1]}
    assert pick_least_loaded(backends[:1], load.__getitem__, rng) is backends[0]


def test_replica_ids_are_stable_and_opaque() -> None:
    url = "http://10.1.2.3:8000"
    assert replica_id(url) == replica_id(url)
    assert replica_id(url) != replica_id("http://10.1.2.3:8001")
    assert "10.1.2.3" not in replica_id(url)
    assert len(replica_id(url)) == 12


def test_origin_defaults_to_same_origin_and_loopback() -> None:
    none: frozenset[bytes] = frozenset()
    check_origin([(b"origin", b"http://proxy.example:8080")], none, b"proxy.example:8080")
    check_origin([(b"origin", b"http://localhost:5173")], none, b"proxy.example:8080")
    check_origin([(b"origin", b"http://127.0.0.1")], none, b"proxy.example:8080")
    check_origin([(b"origin", b"http://[::1]:3000")], none, b"proxy.example:8080")
    for foreign in (
        b"https://evil.example",
        b"http://localhost.evil.example",
        b"http://proxy.example:9999",
    ):
        with pytest.raises(McpRefusal):
            check_origin([(b"origin", foreign)], none, b"proxy.example:8080")


def test_origin_port_wildcards() -> None:
    allowed = frozenset({b"http://localhost:*"})
    check_origin([(b"origin", b"http://localhost:3000")], allowed)
    check_origin([(b"origin", b"http://localhost")], allowed)
    for refused in (b"http://localhost:3000x", b"http://localhost.evil:1", b"https://localhost:1"):
        with pytest.raises(McpRefusal):
            check_origin([(b"origin", refused)], allowed)


def test_event_payloads_and_response_ids() -> None:
    from proxy.mcp_routing import event_payloads
    from proxy.protocol.jsonrpc import response_id

    blocks = (
        b'event: message\r\nid: 1\r\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}'
        b'\r\n\r\nevent: message\r\ndata: {"jsonrpc":"2.0","id":7,"result":{}}\r\n\r\n'
        b': comment\n\ndata: {"jsonrpc":"2.0","id":"a",\n'
        b'data: "error":{"code":1,"message":"x"}}\n\n'
    )
    payloads = event_payloads(blocks)
    assert [response_id(p) for p in payloads] == [None, 7, "a"]
    assert response_id(b"not json") is None
    assert response_id(b'{"jsonrpc":"2.0","id":3,"method":"ping"}') is None
