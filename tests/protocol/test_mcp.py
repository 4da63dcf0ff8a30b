"""MCP transport rules (proxy.protocol.mcp): eras, header/body agreement, legacy endpoint.

The header check is also run differentially against the reference SDK's own classifier
(mcp.shared.inbound.classify_inbound_request), so "exact rules from the SDK" is a test.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mcp.shared.inbound import (
    InboundLadderRejection,
    classify_inbound_request,
    encode_header_value,
    find_duplicated_routing_header,
)

from proxy.protocol.jsonrpc import Envelope, decode_message
from proxy.protocol.mcp import (
    HEADER_MISMATCH,
    NAME_BEARING_METHODS,
    EndpointRewriteError,
    Era,
    EraGuess,
    HeaderMismatch,
    check_header_body_agreement,
    decode_header_value,
    detect_era,
    legacy_session_token,
    parse_endpoint_event,
    restore_message_target,
    rewrite_endpoint_event,
)
from proxy.protocol.mcp import encode_header_value as encode_name

V = "2026-07-28"
META_KEY = "io.modelcontextprotocol/protocolVersion"
Headers = list[tuple[bytes, bytes]]


def body(method: str, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    meta = {META_KEY: V, "io.modelcontextprotocol/clientCapabilities": {}}
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, **kw}
    message["params"] = {**(params or {}), "_meta": meta}
    return message


def envelope(message: dict[str, Any]) -> Envelope:
    return decode_message(json.dumps(message).encode())


def hdrs(**values: str) -> Headers:
    names = {"version": b"mcp-protocol-version", "method": b"mcp-method", "name": b"mcp-name"}
    return [(names[k], v.encode()) for k, v in values.items()]


def check(headers: Headers, message: dict[str, Any]) -> HeaderMismatch | None:
    return check_header_body_agreement(headers, envelope(message))


# --- header/body agreement ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params", "name"),
    [
        ("tools/call", {"name": "get_weather", "arguments": {}}, "get_weather"),
        ("prompts/get", {"name": "greet"}, "greet"),
        ("resources/read", {"uri": "file:///projects/app/config.json"}, None),
    ],
)
def test_name_bearing_methods_agree(method: str, params: dict[str, Any], name: str | None) -> None:
    value = name if name is not None else params["uri"]
    headers = hdrs(version=V, method=method, name=value)
    assert check(headers, body(method, params, id=1)) is None


def test_methods_without_a_name_need_no_mcp_name() -> None:
    for method in ("tools/list", "server/discover", "resources/list", "ping"):
        assert check(hdrs(version=V, method=method), body(method, id=1)) is None


def test_mcp_name_on_other_methods_is_ignored() -> None:
    assert check(hdrs(version=V, method="tools/list", name="x"), body("tools/list", id=1)) is None


def test_header_names_are_case_insensitive() -> None:
    headers = [(b"mcp-protocol-version", V.encode()), (b"mcp-method", b"ping")]
    assert check(headers, body("ping", id=1)) is None


def mismatch(result: HeaderMismatch | None, *words: str) -> None:
    assert result is not None
    assert result.code == HEADER_MISMATCH
    assert result.status == 400
    for word in words:
        assert word in result.message


def test_missing_version_header() -> None:
    mismatch(check(hdrs(method="ping"), body("ping", id=1)), "MCP-Protocol-Version", "missing")


def test_version_header_disagrees_with_meta() -> None:
    result = check(hdrs(version="2025-11-25", method="ping"), body("ping", id=1))
    mismatch(result, "MCP-Protocol-Version")


def test_missing_meta_version_is_invalid_params_like_the_sdk() -> None:
    message = {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {}}
    result = check(hdrs(version=V, method="ping"), message)
    assert result is not None and result.code == -32602 and result.status == 400
    message = {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"_meta": "x"}}
    result = check(hdrs(version=V, method="ping"), message)
    assert result is not None and result.code == -32602


def test_missing_or_wrong_method_header() -> None:
    mismatch(check(hdrs(version=V), body("ping", id=1)), "Mcp-Method", "missing")
    mismatch(check(hdrs(version=V, method="tools/list"), body("ping", id=1)), "Mcp-Method")
    # Values are case-sensitive.
    mismatch(check(hdrs(version=V, method="PING"), body("ping", id=1)), "Mcp-Method")


def test_missing_or_wrong_name_header() -> None:
    message = body("tools/call", {"name": "a"}, id=1)
    mismatch(check(hdrs(version=V, method="tools/call"), message), "Mcp-Name", "missing")
    mismatch(check(hdrs(version=V, method="tools/call", name="b"), message), "Mcp-Name")
    uri_message = body("resources/read", {"uri": "file:///a"}, id=1)
    mismatch(check(hdrs(version=V, method="resources/read", name="file:///b"), uri_message))


def test_name_header_is_compared_to_uri_not_name_for_resources_read() -> None:
    message = body("resources/read", {"uri": "file:///a", "name": "n"}, id=1)
    mismatch(check(hdrs(version=V, method="resources/read", name="n"), message))


def test_name_header_needed_only_when_the_body_has_the_field() -> None:
    # As the SDK: a tools/call without params.name is the backend's -32602 to give.
    assert check(hdrs(version=V, method="tools/call"), body("tools/call", id=1)) is None


def test_non_string_name_in_body_never_matches() -> None:
    message = body("tools/call", {"name": 5}, id=1)
    mismatch(check(hdrs(version=V, method="tools/call", name="5"), message), "not a string")


def test_base64_sentinel_name_is_decoded_before_comparing() -> None:
    name = "Hello, 世界"
    header = "=?base64?SGVsbG8sIOS4lueVjA==?="  # the spec's own example
    message = body("tools/call", {"name": name}, id=1)
    assert check(hdrs(version=V, method="tools/call", name=header), message) is None


def test_malformed_sentinel_never_matches() -> None:
    message = body("tools/call", {"name": "=?base64?!!?="}, id=1)
    mismatch(check(hdrs(version=V, method="tools/call", name="=?base64?!!?="), message))


def test_duplicate_routing_headers_are_rejected() -> None:
    headers = [*hdrs(version=V, method="ping"), (b"mcp-method", b"ping")]
    mismatch(check(headers, body("ping", id=1)), "more than once")


def test_routing_header_with_invalid_characters() -> None:
    headers = [(b"mcp-protocol-version", V.encode()), (b"mcp-method", b"ping\x80")]
    mismatch(check(headers, body("ping", id=1)), "invalid characters")


def test_notifications_reject_only_a_contradicting_method_header() -> None:
    note = body("notifications/initialized")
    assert check([], note) is None
    assert check(hdrs(version=V, method="notifications/initialized"), note) is None
    mismatch(check(hdrs(version=V, method="tools/call"), note), "Mcp-Method")


def test_posted_responses_are_invalid_requests() -> None:
    result = check(hdrs(version=V), {"jsonrpc": "2.0", "id": 1, "result": {}})
    assert result is not None and result.code == -32600 and result.status == 400


def test_mismatch_body_is_a_jsonrpc_error_with_the_request_id() -> None:
    result = check(hdrs(version=V), body("ping", id="req-1"))
    assert result is not None
    decoded = json.loads(result.body("req-1"))
    assert decoded["id"] == "req-1"
    assert decoded["error"]["code"] == -32020


def test_name_bearing_methods_are_the_sdks() -> None:
    from mcp.shared.inbound import NAME_BEARING_METHODS as SDK_NAME_BEARING

    assert dict(NAME_BEARING_METHODS) == dict(SDK_NAME_BEARING)


# --- differential: the SDK's classifier decides the same ----------------------------

names = st.sampled_from(["get_weather", "a b", " padded ", "天気", "=?base64?x?=", "", "x\ty"])
methods = st.sampled_from(["tools/call", "prompts/get", "resources/read", "tools/list", "ping"])


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[Headers, dict[str, Any]]:
    method = draw(methods)
    params: dict[str, Any] = {}
    for key in ("name", "uri"):
        value = draw(st.none() | names | st.integers(0, 3))
        if value is not None:
            params[key] = value
    message = body(method, params, id=1)
    meta_version = draw(st.sampled_from([V, V, "2025-11-25", 7, "drop-key", "drop-meta"]))
    if meta_version == "drop-meta":
        del message["params"]["_meta"]
    elif meta_version == "drop-key":
        del message["params"]["_meta"][META_KEY]
    else:
        message["params"]["_meta"][META_KEY] = meta_version
    headers: Headers = []
    # Weighted towards agreeing headers, so every rung of the ladder gets exercised.
    version = draw(st.sampled_from([V, V, V, "2025-11-25", None]))
    if version is not None:
        headers.append((b"mcp-protocol-version", version.encode()))
    header_method = draw(st.sampled_from([method, method, method, "tools/call", None]))
    if header_method is not None:
        headers.append((b"mcp-method", header_method.encode()))
    body_name = str(params.get("uri" if method == "resources/read" else "name"))
    name_source = draw(st.sampled_from([body_name, body_name, None]) | names)
    if name_source is not None:
        encoded = encode_header_value(name_source) if draw(st.booleans()) else name_source
        if encoded.isprintable() and encoded.isascii():
            headers.append((b"mcp-name", encoded.encode()))
    return headers, message


def sdk_code(headers: Sequence[tuple[bytes, bytes]], message: dict[str, Any]) -> int | None:
    pairs = [(k.decode(), v.decode()) for k, v in headers]
    if find_duplicated_routing_header(pairs) is not None:
        return -32020
    verdict = classify_inbound_request(message, headers=dict(pairs))
    return verdict.code if isinstance(verdict, InboundLadderRejection) else None


@given(exchanges())
def test_agrees_with_the_sdk_classifier(exchange: tuple[Headers, dict[str, Any]]) -> None:
    headers, message = exchange
    ours = check(headers, message)
    expected = sdk_code(headers, message)
    if expected == -32022:  # the body's version is one the SDK does not serve: not ours
        return
    assert (None if ours is None else ours.code) == expected


@given(st.text())
def test_decodes_whatever_the_sdk_encodes(value: str) -> None:
    assert decode_header_value(encode_header_value(value)) == value


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("plain", "plain"),
        ("=?base64?SGVsbG8sIOS4lueVjA==?=", "Hello, 世界"),
        ("=?base64?IHBhZGRlZCA=?=", " padded "),
        ("=?base64?PT9iYXNlNjQ/bGl0ZXJhbD89?=", "=?base64?literal?="),
        ("=?BASE64?SGk=?=", "=?BASE64?SGk=?="),  # markers are case-sensitive: not a sentinel
        ("=?base64?SGk?=", None),  # missing padding
        ("=?base64?SGl=?=", None),  # non-canonical trailing bits
        ("=?base64?/w==?=", None),  # not UTF-8
        ("=?base64?S G k=?=", None),
    ],
)
def test_decode_header_value(header: str, expected: str | None) -> None:
    assert decode_header_value(header) == expected


# --- era detection -------------------------------------------------------------------


def era(
    method: bytes = b"POST",
    headers: Headers | None = None,
    message: dict[str, Any] | None = None,
    target: bytes = b"/mcp",
) -> EraGuess:
    env = None if message is None else envelope(message)
    return detect_era(method, headers or [], env, target)


PLAIN_INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}},
}
PLAIN_CALL = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
SESSION = (b"mcp-session-id", b"abc")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # 2026-07-28: the header says so, whatever else is there.
        ({"headers": hdrs(version=V), "message": body("tools/list", id=1)}, (Era.STATELESS, V)),
        ({"headers": hdrs(version="2099-01-01")}, (Era.STATELESS, "2099-01-01")),
        ({"method": b"GET", "headers": hdrs(version=V)}, (Era.STATELESS, V)),
        ({"method": b"DELETE", "headers": [*hdrs(version=V), SESSION]}, (Era.STATELESS, V)),
        # Modern body without the header: still modern, so the check can say what is missing.
        ({"message": body("tools/list", id=1)}, (Era.STATELESS, V)),
        # 2025 handshake era.
        ({"message": PLAIN_INIT}, (Era.STATEFUL, "2025-06-18")),
        ({"headers": [*hdrs(version="2025-11-25"), SESSION]}, (Era.STATEFUL, "2025-11-25")),
        ({"headers": [SESSION], "message": PLAIN_CALL}, (Era.STATEFUL, "2025-03-26")),
        ({"message": PLAIN_CALL}, (Era.STATEFUL, "2025-03-26")),
        ({"method": b"GET", "headers": [SESSION]}, (Era.STATEFUL, "2025-03-26")),
        ({"method": b"GET", "headers": hdrs(version="2025-11-25")}, (Era.STATEFUL, "2025-11-25")),
        ({"method": b"DELETE", "headers": [SESSION]}, (Era.STATEFUL, "2025-03-26")),
        # Legacy HTTP+SSE: the stream GET and the message POSTs.
        ({"method": b"GET", "target": b"/sse"}, (Era.LEGACY_SSE, None)),
        ({"message": PLAIN_CALL, "target": b"/messages/?session_id=ab12"}, (Era.LEGACY_SSE, None)),
        ({"message": PLAIN_INIT, "target": b"/message?sessionId=x"}, (Era.LEGACY_SSE, None)),
        (
            {"headers": hdrs(version="2025-06-18"), "target": b"/m?sessionId=x"},
            (Era.LEGACY_SSE, "2025-06-18"),
        ),
        ({"target": b"/m?sessionId=1&session_id=2"}, (Era.LEGACY_SSE, None)),
        # A session id header outranks a query that merely looks legacy.
        ({"headers": [SESSION], "target": b"/mcp?sessionId=x"}, (Era.STATEFUL, "2025-03-26")),
    ],
)
def test_era_matrix(kwargs: dict[str, Any], expected: tuple[Era, str | None]) -> None:
    assert era(**kwargs) == EraGuess(*expected)


# --- legacy endpoint rewriting ---------------------------------------------------------

TOKEN = "v1.k1.AAAA.BBBB"


@pytest.mark.parametrize(
    ("data", "kwargs", "expected"),
    [
        # The Python SDK's form: quote(root_path + endpoint) + "?session_id=<hex>".
        (b"/messages/?session_id=0f1e", {}, "/mcp/gh/messages/?session_id=" + TOKEN),
        # The TypeScript SDK's form.
        (b"/message?sessionId=abc-123", {}, "/mcp/gh/message?sessionId=" + TOKEN),
        # Absolute URIs: scheme and authority dropped, the client comes back via the proxy.
        (b"http://10.0.0.5:8000/messages?sessionId=a", {}, "/mcp/gh/messages?sessionId=" + TOKEN),
        (b"https://public.example/m?sessionId=a#frag", {}, "/mcp/gh/m?sessionId=" + TOKEN),
        (b"//other-host/m?sessionId=a", {}, "/mcp/gh/m?sessionId=" + TOKEN),
        # Other parameters keep their place and spelling.
        (
            b"/messages?tenant=a%20b&sessionId=abc&debug",
            {},
            f"/mcp/gh/messages?tenant=a%20b&sessionId={TOKEN}&debug",
        ),
        # Relative references resolve against the backend's SSE path.
        (
            b"messages?sessionId=a",
            {"sse_path": "/api/sse"},
            "/mcp/gh/api/messages?sessionId=" + TOKEN,
        ),
        (b"../m?sessionId=a", {"sse_path": "/a/b/sse"}, "/mcp/gh/a/m?sessionId=" + TOKEN),
        (b"?sessionId=a", {"sse_path": "/sse"}, "/mcp/gh/sse?sessionId=" + TOKEN),
        # The backend's base path is swapped for the proxy prefix.
        (
            b"/base/messages?sessionId=a",
            {"backend_prefix": "/base/"},
            "/mcp/gh/messages?sessionId=" + TOKEN,
        ),
        (b"/base?sessionId=a", {"backend_prefix": "/base"}, "/mcp/gh/?sessionId=" + TOKEN),
        # Surrounding whitespace from the data line is not part of the URI.
        (b" /messages?sessionId=a\r\n", {}, "/mcp/gh/messages?sessionId=" + TOKEN),
    ],
)
def test_rewrite_endpoint_event(data: bytes, kwargs: dict[str, str], expected: str) -> None:
    assert rewrite_endpoint_event(data, "/mcp/gh", TOKEN, **kwargs) == expected.encode()


def test_double_slash_inside_a_prefix_is_harmless() -> None:
    assert rewrite_endpoint_event(b"//h//m?sessionId=a", "/p", TOKEN).startswith(b"/p//m?")


@pytest.mark.parametrize("prefix", ["", "/"])
def test_a_leading_double_slash_is_refused_at_the_root(prefix: str) -> None:
    # "//evil.example/m?..." would send the client, and its token, to another host.
    with pytest.raises(EndpointRewriteError):
        rewrite_endpoint_event(b"http://b//evil.example/m?sessionId=a", prefix, TOKEN)


def test_rewrite_with_root_prefix() -> None:
    assert rewrite_endpoint_event(b"/m?sessionId=a", "/", TOKEN) == f"/m?sessionId={TOKEN}".encode()
    assert rewrite_endpoint_event(b"/m?sessionId=a", "", TOKEN) == f"/m?sessionId={TOKEN}".encode()


@pytest.mark.parametrize(
    ("data", "kwargs"),
    [
        (b"/messages", {}),  # no session parameter
        (b"/messages?other=1", {}),
        (b"/messages?sessionId=", {}),
        (b"/m?sessionId=a&sessionId=b", {}),
        (b"/m?sessionId=a&session_id=b", {}),
        (b"/m?sessionId=a&session%5Fid=b", {}),  # the backend would decode that name
        (b"/other/m?sessionId=a", {"backend_prefix": "/base"}),
        (b"/basement/m?sessionId=a", {"backend_prefix": "/base"}),
        ("/m/\u00e9?sessionId=a".encode(), {}),
        (b"/m sp?sessionId=a", {}),
        (b"/a/%2e%2e/m?sessionId=a", {}),
        (b"/\\evil.example/m?sessionId=a", {}),
        (b"", {}),
    ],
)
def test_unmappable_endpoints_are_refused(data: bytes, kwargs: dict[str, str]) -> None:
    with pytest.raises(EndpointRewriteError):
        rewrite_endpoint_event(data, "/p", TOKEN, **kwargs)


def test_parse_endpoint_event_reports_the_backend_session() -> None:
    endpoint = parse_endpoint_event(b"http://b/x/messages?a=1&session_id=ab%2Fc")
    assert endpoint.path == "/x/messages"
    assert endpoint.session_param == "session_id"
    assert endpoint.session_id == "ab%2Fc"  # as sent: it goes back verbatim


def test_python_sdk_endpoint_round_trip() -> None:
    backend_data = f"{quote('/root/messages/')}?session_id=9f86d081884c7d65".encode()
    endpoint = parse_endpoint_event(backend_data)
    client_target = rewrite_endpoint_event(backend_data, "/mcp/gh", TOKEN, backend_prefix="/root")
    assert legacy_session_token(client_target) == TOKEN
    restored = restore_message_target(client_target, endpoint.session_id)
    assert restored == b"/mcp/gh/messages/?session_id=9f86d081884c7d65"


def test_legacy_session_token() -> None:
    assert legacy_session_token(b"/m?sessionId=tok") == "tok"
    assert legacy_session_token(b"/m?x=1&session_id=tok&y=2") == "tok"
    assert legacy_session_token(b"/m") is None
    assert legacy_session_token(b"/m?x=1") is None
    with pytest.raises(EndpointRewriteError):
        legacy_session_token(b"/m?sessionId=a&session%5fid=b")


def test_restore_keeps_other_parameters() -> None:
    target = b"/p/m?a=1&sessionId=" + TOKEN.encode() + b"&b=2"
    assert restore_message_target(target, "backend-sess") == b"/p/m?a=1&sessionId=backend-sess&b=2"
    with pytest.raises(EndpointRewriteError):
        restore_message_target(b"/p/m?a=1", "x")


@pytest.mark.parametrize("name", ["naïve", " padded", "=?base64?eA==?=", "tab\tname"])
def test_a_name_that_is_no_plain_header_value_goes_in_the_base64_sentinel(name: str) -> None:
    encoded = encode_name(name)
    assert encoded == encode_header_value(name)  # as the reference SDK writes it
    assert encoded.startswith("=?base64?")
    assert decode_header_value(encoded) == name


def test_a_plain_name_goes_as_it_is() -> None:
    assert (
        encode_name("test://replica") == encode_header_value("test://replica") == "test://replica"
    )
