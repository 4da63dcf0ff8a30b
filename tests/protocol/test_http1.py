"""The proxy's HTTP/1.1 rules (proxy.protocol.http1): pure functions, no sockets, no loop."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import h11
import pytest
from h11._headers import normalize_and_validate
from hypothesis import given, reject
from hypothesis import strategies as st

from proxy.protocol.http1 import (
    HOP_BY_HOP,
    ForwardingPolicy,
    Headers,
    RequestInfo,
    RequestRejected,
    check_request_line,
    downstream_response_headers,
    error_response,
    inspect_request,
    is_event_stream,
    protocol_error_status,
    raw_error_response,
    reason_phrase,
    upstream_request_headers,
)

PRESERVE = ForwardingPolicy(host_mode="preserve", xff_mode="append", via=b"switchboard")
REWRITE = ForwardingPolicy(host_mode="rewrite", xff_mode="append", via=b"switchboard")
REPLACE_XFF = ForwardingPolicy(host_mode="preserve", xff_mode="replace", via=b"switchboard")
CLIENT_IP = "10.0.0.7"
BACKEND = b"10.1.1.1:8000"
# RFC 9110 §7.6.1 plus the de-facto ones; spelled out here so the tests do not trust
# the module's own list.
EXPECTED_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
ALL_HOP_BY_HOP = HOP_BY_HOP | EXPECTED_HOP_BY_HOP

HeaderInput = Sequence[tuple[str, str]]


def request(
    target: str | bytes = "/",
    headers: HeaderInput = (("Host", "example.com"),),
    *,
    method: str = "GET",
    http_version: str = "1.1",
) -> h11.Request:
    return h11.Request(
        method=method, target=target, headers=list(headers), http_version=http_version
    )


def rejected(req: h11.Request) -> RequestRejected:
    with pytest.raises(RequestRejected) as info:
        inspect_request(req)
    return info.value


def names(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    return [name for name, _ in headers]


def values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def forward(
    req: h11.Request,
    policy: ForwardingPolicy = PRESERVE,
    *,
    client_ip: str = CLIENT_IP,
    backend_authority: bytes = BACKEND,
) -> Headers:
    info = inspect_request(req)
    return upstream_request_headers(
        req, info, policy, client_ip=client_ip, backend_authority=backend_authority
    )


# -- inspect_request: targets -----------------------------------------------------------


def test_origin_form_target() -> None:
    info = inspect_request(request("/mcp/tools?x=1&y=/a/../b"))
    assert info.path == "/mcp/tools"
    assert info.target == b"/mcp/tools?x=1&y=/a/../b"  # the query is not path-checked
    assert info.host == b"example.com"
    assert info.chunked is False
    assert info.content_length is None
    assert info.upgrade is None
    assert info.connection_tokens == frozenset()


@pytest.mark.parametrize(
    ("target", "origin", "path"),
    [
        ("http://example.com/mcp?x=1", b"/mcp?x=1", "/mcp"),
        ("HTTP://Example.COM/mcp", b"/mcp", "/mcp"),
        ("https://example.com/a/b", b"/a/b", "/a/b"),
        ("http://example.com", b"/", "/"),
        ("http://example.com?x=1", b"/?x=1", "/"),
        ("http://example.com?x=/y", b"/?x=/y", "/"),
    ],
)
def test_absolute_form_with_matching_host(target: str, origin: bytes, path: str) -> None:
    info = inspect_request(request(target, [("Host", "example.com")]))
    assert info.target == origin
    assert info.path == path
    assert info.host == b"example.com"


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("http://evil.example/mcp", "example.com"),
        ("http://example.com:8080/mcp", "example.com"),
        ("http://example.com/mcp", "example.com:8080"),
        ("http://user@example.com/mcp", "example.com"),
    ],
)
def test_absolute_form_disagreeing_with_host_is_rejected(target: str, host: str) -> None:
    assert rejected(request(target, [("Host", host)])).status == 400


def test_absolute_form_host_comparison_ignores_case() -> None:
    info = inspect_request(request("http://EXAMPLE.com/x", [("Host", "example.COM")]))
    assert info.target == b"/x"


@pytest.mark.parametrize("target", ["*", "example.com:443", "ftp://example.com/x", "mcp"])
def test_other_target_forms_are_rejected(target: str) -> None:
    assert rejected(request(target, method="OPTIONS")).status == 400


# -- inspect_request: Host ----------------------------------------------------------------


def _without_host_as_http11(target: str) -> h11.Request:
    # h11 refuses to build an HTTP/1.1 Request without Host, so build it as 1.0 and
    # relabel it: inspect_request must not rely on h11 having checked.
    req = request(target, [("X", "1")], http_version="1.0")
    object.__setattr__(req, "http_version", b"1.1")
    assert req.http_version == b"1.1"
    return req


def test_h11_itself_rejects_http11_without_host() -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nX: 1\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.error_status_hint == 400


def test_missing_host_on_http11_is_rejected() -> None:
    rejection = rejected(_without_host_as_http11("/"))
    assert rejection.status == 400
    assert "Host" in rejection.reason


def test_missing_host_on_http11_absolute_form_is_rejected() -> None:
    assert rejected(_without_host_as_http11("http://example.com/x")).status == 400


def test_http10_without_host_is_accepted() -> None:
    info = inspect_request(request("/mcp", [], http_version="1.0"))
    assert info.path == "/mcp"
    assert info.host == b""


def test_http10_absolute_form_without_host_takes_the_authority() -> None:
    info = inspect_request(request("http://example.com:81/x", [], http_version="1.0"))
    assert info.host == b"example.com:81"
    assert info.target == b"/x"


def _with_headers(req: h11.Request, headers: HeaderInput) -> h11.Request:
    # h11 refuses to build a Request with two Host headers (and its parser rejects one),
    # so swap the header list in afterwards: inspect_request must check by itself.
    object.__setattr__(req, "headers", normalize_and_validate(list(headers)))
    return req


def test_h11_itself_rejects_duplicate_host() -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.error_status_hint == 400


def test_duplicate_host_is_rejected() -> None:
    req = _with_headers(request("/"), [("Host", "a.example"), ("Host", "b.example")])
    assert [n for n, _ in req.headers] == [b"host", b"host"]
    rejection = rejected(req)
    assert rejection.status == 400
    assert "Host" in rejection.reason


def test_duplicate_identical_host_is_rejected_too() -> None:
    req = _with_headers(request("/"), [("Host", "a"), ("X", "1"), ("host", "a")])
    assert rejected(req).status == 400


# -- inspect_request: paths ---------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/public/../admin",
        "/public/./admin",
        "/..",
        "/.",
        "/public/..",
        "/a/%2e%2e/admin",
        "/a/%2E%2E/admin",
        "/a/%2e%2E/admin",
        "/a/.%2e/admin",
        "/a/%2e./admin",
        "/a/%2e/admin",
        "/a/%2E/admin",
        "/a/..?q=1",
        "http://example.com/a/../b",
    ],
)
def test_dot_segments_raw_or_encoded_are_rejected(target: str) -> None:
    rejection = rejected(request(target))
    assert rejection.status == 400
    assert "dot-segment" in rejection.reason


@pytest.mark.parametrize(
    "target", ["/a/...", "/a/..b", "/a/b..", "/a/.well-known/x", "/a/%2e%2e%2e", "/a?x=..", "/a//b"]
)
def test_paths_that_only_look_like_dot_segments_pass(target: str) -> None:
    assert inspect_request(request(target)).target == target.encode()


@pytest.mark.parametrize("target", ["/a\\b", "/public\\..\\admin", "/\\"])
def test_backslash_in_path_is_rejected(target: str) -> None:
    rejection = rejected(request(target))
    assert rejection.status == 400
    assert "backslash" in rejection.reason


# -- inspect_request: framing and upgrade -------------------------------------------------


def test_content_length_and_chunked_are_reported() -> None:
    info = inspect_request(request("/", [("Host", "a"), ("Content-Length", "42")], method="POST"))
    assert info.content_length == 42
    assert not info.chunked
    info = inspect_request(
        request("/", [("Host", "a"), ("Transfer-Encoding", "chunked")], method="POST")
    )
    assert info.chunked
    assert info.content_length is None


def test_content_length_with_transfer_encoding_is_rejected() -> None:
    req = request(
        "/",
        [("Host", "a"), ("Content-Length", "3"), ("Transfer-Encoding", "chunked")],
        method="POST",
    )
    rejection = rejected(req)
    assert rejection.status == 400
    assert "Transfer-Encoding" in rejection.reason


@pytest.mark.parametrize(
    "connection", ["upgrade", "Upgrade", "keep-alive, Upgrade", "keep-alive,upgrade ,  x"]
)
def test_upgrade_is_detected_with_connection_upgrade(connection: str) -> None:
    req = request(
        "/ws", [("Host", "a"), ("Connection", connection), ("Upgrade", "websocket"), *WS_HANDSHAKE]
    )
    info = inspect_request(req)
    assert info.upgrade == b"websocket"
    assert b"upgrade" in info.connection_tokens


WS_HANDSHAKE = [("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ([("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")], 426),  # no version
        ([("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "12")], 426),
        ([("Sec-WebSocket-Version", "13")], 400),  # no key
        ([("Sec-WebSocket-Key", "abc"), ("Sec-WebSocket-Version", "13")], 400),
        # base64 of 15 and of 17 bytes
        ([("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAA"), ("Sec-WebSocket-Version", "13")], 400),
        (
            [("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAAAAA="), ("Sec-WebSocket-Version", "13")],
            400,
        ),
        ([("Sec-WebSocket-Key", "!!!!!!!!!!!!!!!!!!!!!!=="), ("Sec-WebSocket-Version", "13")], 400),
    ],
)
def test_malformed_websocket_handshakes_are_refused(
    extra: list[tuple[str, str]], status: int
) -> None:
    """RFC 6455 §4.2.1: a handshake a backend would refuse never reaches one; a version
    other than 13 gets 426 naming 13 (§4.4)."""
    req = request(
        "/ws", [("Host", "a"), ("Connection", "Upgrade"), ("Upgrade", "websocket"), *extra]
    )
    rejection = rejected(req)
    assert rejection.status == status
    if status == 426:
        assert rejection.headers == ((b"sec-websocket-version", b"13"),)


def test_websocket_handshake_must_be_a_get() -> None:
    req = request(
        "/ws",
        [("Host", "a"), ("Connection", "Upgrade"), ("Upgrade", "websocket"), *WS_HANDSHAKE],
        method="POST",
    )
    assert rejected(req).status == 400


@pytest.mark.parametrize("version", [b"1.2", b"2.0", b"0.9"])
def test_versions_other_than_1_0_and_1_1_get_505(version: bytes) -> None:
    req = h11.Request(method="GET", target="/", headers=[("Host", "a")], http_version=version)
    assert rejected(req).status == 505


def test_chunked_http_1_0_request_is_refused() -> None:
    req = h11.Request(
        method="POST",
        target="/",
        headers=[("Transfer-Encoding", "chunked")],
        http_version="1.0",
    )
    assert rejected(req).status == 400


@pytest.mark.parametrize("byte", [*range(0x01, 0x09), *range(0x0E, 0x20), 0x7F])
def test_control_bytes_in_header_values_are_refused(byte: int) -> None:
    req = request("/", [("Host", "a"), ("X", "a" + chr(byte) + "b")])
    rejection = rejected(req)
    assert rejection.status == 400
    assert "\\x" not in rejection.reason and "b'" not in rejection.reason


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"GET / HTTP/1.1", None),
        (b"GET /a?b=c HTTP/1.0", None),
        (b"GET /", 400),
        (b"GET", 400),
        (b"GET / HTTP/1.2", 505),
        (b"GET / HTTP/2.0", 505),
        (b"GET / HTTP/0.9", 505),
        (b"GET  / HTTP/1.1", 400),
        (b"GET / HTTP/1.1 ", 400),
        (b"GET / http/1.1", 400),
    ],
)
def test_request_lines_are_judged_as_soon_as_complete(line: bytes, status: int | None) -> None:
    if status is None:
        check_request_line(line)
        return
    with pytest.raises(RequestRejected) as caught:
        check_request_line(line)
    assert caught.value.status == status


@pytest.mark.parametrize("connection", [None, "keep-alive", "close", "upgraded"])
def test_upgrade_header_without_connection_upgrade_is_no_upgrade(connection: str | None) -> None:
    headers: list[tuple[str, str]] = [("Host", "a"), ("Upgrade", "websocket")]
    if connection is not None:
        headers.append(("Connection", connection))
    assert inspect_request(request("/ws", headers)).upgrade is None


def test_connection_tokens_are_lowercased_and_merged_across_lines() -> None:
    req = request(
        "/", [("Host", "a"), ("Connection", "Keep-Alive, X-Foo"), ("Connection", "x-bar ,,")]
    )
    assert inspect_request(req).connection_tokens == {b"keep-alive", b"x-foo", b"x-bar"}


# -- upstream_request_headers ---------------------------------------------------------------


def test_hop_by_hop_and_nominated_headers_are_removed() -> None:
    req = request(
        "/",
        [
            ("Host", "example.com"),
            ("Connection", "keep-alive, X-Hop, Host, Content-Length, Content-Type, Authorization"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("Proxy-Authenticate", "Basic"),
            ("X-Hop", "dropped"),
            ("Content-Length", "2"),
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer t"),
            ("X-Keep", "kept"),
        ],
        method="POST",
    )
    out = forward(req)
    for name in EXPECTED_HOP_BY_HOP:
        assert name not in names(out), name
    assert b"x-hop" not in names(out)
    # Never nominatable: framing, routing and credentials survive a Connection option.
    assert values(out, b"host") == [b"example.com"]
    assert values(out, b"content-length") == [b"2"]
    assert values(out, b"content-type") == [b"application/json"]
    assert values(out, b"authorization") == [b"Bearer t"]
    assert values(out, b"x-keep") == [b"kept"]


def test_end_to_end_headers_keep_their_order_and_repeats() -> None:
    req = request(
        "/",
        [
            ("Host", "example.com"),
            ("Accept", "application/json"),
            ("Cookie", "a=1"),
            ("Mcp-Session-Id", "abc"),
            ("Cookie", "b=2"),
        ],
    )
    out = forward(req)
    kept = [(n, v) for n, v in out if not n.startswith(b"x-forwarded-") and n != b"via"]
    assert kept == [
        (b"host", b"example.com"),
        (b"accept", b"application/json"),
        (b"cookie", b"a=1"),
        (b"mcp-session-id", b"abc"),
        (b"cookie", b"b=2"),
    ]


def test_x_forwarded_for_is_appended_to_in_append_mode() -> None:
    req = request(
        "/",
        [("Host", "a"), ("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2, 3.3.3.3")],
    )
    out = forward(req, PRESERVE)
    assert values(out, b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.7"]


def test_x_forwarded_for_is_replaced_in_replace_mode() -> None:
    req = request("/", [("Host", "a"), ("X-Forwarded-For", "1.1.1.1")])
    assert values(forward(req, REPLACE_XFF), b"x-forwarded-for") == [b"10.0.0.7"]


@pytest.mark.parametrize("policy", [PRESERVE, REPLACE_XFF])
def test_x_forwarded_for_without_incoming_is_the_client(policy: ForwardingPolicy) -> None:
    out = forward(request("/"), policy, client_ip="2001:db8::1")
    assert values(out, b"x-forwarded-for") == [b"2001:db8::1"]


def test_client_supplied_x_forwarded_proto_and_host_are_replaced() -> None:
    req = request(
        "/",
        [
            ("Host", "example.com"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Forwarded-Proto", "gopher"),
        ],
    )
    out = forward(req)
    assert values(out, b"x-forwarded-proto") == [b"http"]
    assert values(out, b"x-forwarded-host") == [b"example.com"]


def test_x_forwarded_proto_follows_the_policy() -> None:
    policy = ForwardingPolicy(host_mode="preserve", xff_mode="append", via=b"sb", proto=b"https")
    assert values(forward(request("/"), policy), b"x-forwarded-proto") == [b"https"]


def test_via_is_appended_with_the_request_version() -> None:
    req = request("/", [("Host", "a"), ("Via", "1.0 fred"), ("Via", "1.1 p.example (x)")])
    assert values(forward(req), b"via") == [b"1.0 fred, 1.1 p.example (x), 1.1 switchboard"]
    req10 = request("/", [("Host", "a")], http_version="1.0")
    assert values(forward(req10), b"via") == [b"1.0 switchboard"]


def test_host_is_preserved_or_rewritten() -> None:
    req = request("/", [("Host", "public.example")])
    assert values(forward(req, PRESERVE), b"host") == [b"public.example"]
    assert values(forward(req, REWRITE), b"host") == [BACKEND]
    # X-Forwarded-Host always carries what the client asked for.
    assert values(forward(req, REWRITE), b"x-forwarded-host") == [b"public.example"]


@pytest.mark.parametrize("policy", [PRESERVE, REWRITE], ids=["preserve", "rewrite"])
def test_http10_request_without_host_still_gets_exactly_one_host_upstream(
    policy: ForwardingPolicy,
) -> None:
    # inspect_request admits HTTP/1.0 without Host, and the proxy forwards with an
    # HTTP/1.1 h11.Request, which requires Host: the header list must supply one.
    req = request("/mcp", [("Accept", "*/*")], http_version="1.0")
    out = forward(req, policy)
    hosts = values(out, b"host")
    assert len(hosts) == 1
    assert hosts[0] != b""
    if policy.host_mode == "rewrite":
        assert hosts == [BACKEND]
    h11.Request(method="GET", target="/mcp", headers=out)  # what proxy.net builds


def test_chunked_body_is_redeclared_once_and_no_content_length_is_sent() -> None:
    req = request("/", [("Host", "a"), ("Transfer-Encoding", "chunked")], method="POST")
    out = forward(req)
    assert values(out, b"transfer-encoding") == [b"chunked"]
    assert b"content-length" not in names(out)


def test_upgrade_headers_are_kept_when_upgrading() -> None:
    req = request(
        "/ws",
        [
            ("Host", "a"),
            ("Connection", "keep-alive, Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
    )
    out = forward(req)
    assert values(out, b"connection") == [b"upgrade"]
    assert values(out, b"upgrade") == [b"websocket"]
    assert values(out, b"sec-websocket-key") == [b"dGhlIHNhbXBsZSBub25jZQ=="]
    assert values(out, b"sec-websocket-version") == [b"13"]
    assert b"keep-alive" not in names(out)


def test_upgrade_header_without_connection_upgrade_is_dropped() -> None:
    out = forward(request("/ws", [("Host", "a"), ("Upgrade", "websocket")]))
    assert b"upgrade" not in names(out)
    assert b"connection" not in names(out)


def test_forwarded_headers_build_a_valid_h11_request() -> None:
    req = request(
        "/x",
        [("Host", "a"), ("Transfer-Encoding", "chunked"), ("X-Forwarded-For", "1.2.3.4")],
        method="POST",
    )
    out = forward(req, REWRITE)
    built = h11.Request(method="POST", target="/x", headers=out)
    assert built.headers


# -- upstream_request_headers: property -------------------------------------------------------

_HOP_NAMES = sorted(ALL_HOP_BY_HOP - {b"transfer-encoding"})
_OTHER_NAMES = [
    b"accept",
    b"content-type",
    b"authorization",
    b"cookie",
    b"mcp-session-id",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"via",
    b"x-custom",
    b"x-other",
]
_TOKENS = [n.decode() for n in (*_HOP_NAMES, *_OTHER_NAMES, b"host", b"content-length")]


def _case_variant(name: bytes, draw: st.DrawFn) -> bytes:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return bytes(
        c ^ 0x20 if flip and chr(c).isalpha() else c for c, flip in zip(name, flips, strict=True)
    )


_value = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12
).map(str.encode)
_connection_value = st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=4).map(
    lambda tokens: ", ".join(tokens).encode()
)


@st.composite
def _requests(draw: st.DrawFn) -> h11.Request:
    headers: list[tuple[bytes, bytes]] = []
    for _ in range(draw(st.integers(0, 10))):
        name = draw(st.sampled_from([*_HOP_NAMES, *_OTHER_NAMES]))
        value = draw(_connection_value if name == b"connection" else _value)
        headers.append((_case_variant(name, draw), value))
    body = draw(st.sampled_from(["none", "length", "chunked"]))
    if body == "length":
        headers.append((b"Content-Length", b"5"))
    elif body == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
    host_at = draw(st.integers(0, len(headers)))
    headers.insert(host_at, (b"Host", draw(_value)))
    return h11.Request(method="POST", target="/mcp", headers=headers)


@given(
    req=_requests(),
    host_mode=st.sampled_from(["preserve", "rewrite"]),
    xff_mode=st.sampled_from(["append", "replace"]),
)
def test_upstream_headers_never_leak_hop_by_hop(
    req: h11.Request, host_mode: str, xff_mode: str
) -> None:
    try:
        info = inspect_request(req)
    except RequestRejected:
        reject()
    policy = ForwardingPolicy(
        host_mode="rewrite" if host_mode == "rewrite" else "preserve",
        xff_mode="replace" if xff_mode == "replace" else "append",
        via=b"switchboard",
    )
    out = upstream_request_headers(
        req, info, policy, client_ip=CLIENT_IP, backend_authority=BACKEND
    )
    out_names = names(out)

    allowed_hop: list[tuple[bytes, bytes]] = []
    if info.chunked:
        allowed_hop.append((b"transfer-encoding", b"chunked"))
    if info.upgrade is not None:
        allowed_hop += [(b"connection", b"upgrade"), (b"upgrade", info.upgrade)]
    assert [(n, v) for n, v in out if n in ALL_HOP_BY_HOP] == allowed_hop

    for name in (b"x-forwarded-for", b"via", b"x-forwarded-proto", b"x-forwarded-host", b"host"):
        assert out_names.count(name) == 1, name
    assert values(out, b"x-forwarded-for")[0].endswith(CLIENT_IP.encode())
    assert values(out, b"via")[0].endswith(b"1.1 switchboard")

    # Nominated headers are gone, apart from the protected ones and the proxy's own.
    protected = {b"host", b"content-length", b"content-type", b"authorization"}
    own = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via"}
    for token in info.connection_tokens - protected - own - ALL_HOP_BY_HOP:
        assert token not in out_names, token

    # Everything end-to-end is passed through untouched and in order.
    special = protected | own | ALL_HOP_BY_HOP | info.connection_tokens
    passed = [(n, v) for n, v in req.headers if n not in special]
    assert [(n, v) for n, v in out if n not in special] == passed
    assert values(out, b"content-length") == values(req.headers, b"content-length")

    h11.Request(method="POST", target="/mcp", headers=out)  # valid for the upstream side


# -- downstream_response_headers ----------------------------------------------------------------


def test_response_hop_by_hop_and_nominated_headers_are_stripped() -> None:
    backend = [
        (b"content-type", b"application/json"),
        (b"connection", b"keep-alive, X-Backend-Hop"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"trailer", b"x-sum"),
        (b"proxy-authenticate", b"Basic"),
        (b"upgrade", b"h2c"),
        (b"x-backend-hop", b"1"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"mcp-session-id", b"s1"),
    ]
    out = downstream_response_headers(backend, b"1.1", PRESERVE)
    assert out == [
        (b"content-type", b"application/json"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"mcp-session-id", b"s1"),
        (b"via", b"1.1 switchboard"),
    ]


def test_hop_by_hop_list_covers_rfc_9110() -> None:
    assert EXPECTED_HOP_BY_HOP <= HOP_BY_HOP
    assert b"content-length" not in HOP_BY_HOP  # end-to-end: passed on, h11 enforces it


@pytest.mark.parametrize("name", sorted(EXPECTED_HOP_BY_HOP - {b"connection"}))
def test_each_hop_by_hop_response_header_is_stripped(name: bytes) -> None:
    out = downstream_response_headers([(name, b"x"), (b"x-end", b"1")], b"1.1", PRESERVE)
    assert names(out) == [b"x-end", b"via"]


def test_response_content_length_is_kept() -> None:
    out = downstream_response_headers([(b"content-length", b"12")], b"1.1", PRESERVE)
    assert values(out, b"content-length") == [b"12"]


def test_response_with_transfer_encoding_and_content_length_drops_both() -> None:
    # RFC 9112 §6.3 (3): Transfer-Encoding overrides Content-Length and an intermediary
    # MUST remove the received Content-Length before forwarding. h11 accepts such a
    # response from the backend and decodes it as chunked; keeping Content-Length here
    # makes h11 re-frame the de-chunked body with the backend's (wrong) length.
    backend = [(b"transfer-encoding", b"chunked"), (b"content-length", b"3")]
    out = downstream_response_headers(backend, b"1.1", PRESERVE)
    assert b"transfer-encoding" not in names(out)
    assert b"content-length" not in names(out)


def test_response_via_is_appended() -> None:
    out = downstream_response_headers([(b"via", b"1.1 backend")], b"1.1", PRESERVE)
    assert values(out, b"via") == [b"1.1 backend, 1.1 switchboard"]
    out10 = downstream_response_headers([], b"1.0", PRESERVE)
    assert values(out10, b"via") == [b"1.0 switchboard"]


def test_response_upgrade_is_kept_only_when_upgrading() -> None:
    backend = [
        (b"connection", b"Upgrade"),
        (b"upgrade", b"websocket"),
        (b"sec-websocket-accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
    ]
    upgraded = downstream_response_headers(backend, b"1.1", PRESERVE, upgrade=True)
    assert values(upgraded, b"connection") == [b"upgrade"]
    assert values(upgraded, b"upgrade") == [b"websocket"]
    assert values(upgraded, b"sec-websocket-accept") == [b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="]
    plain = downstream_response_headers(backend, b"1.1", PRESERVE)
    assert b"connection" not in names(plain)
    assert b"upgrade" not in names(plain)


def test_response_connection_close_is_added_only_when_asked() -> None:
    backend = [(b"content-length", b"0"), (b"connection", b"close")]
    closing = downstream_response_headers(backend, b"1.1", PRESERVE, close=True)
    assert values(closing, b"connection") == [b"close"]
    # The backend's own "close" is about the backend hop, not the client's.
    kept_alive = downstream_response_headers(backend, b"1.1", PRESERVE, close=False)
    assert b"connection" not in names(kept_alive)


def test_upgrading_response_says_upgrade_not_close() -> None:
    backend = [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    out = downstream_response_headers(backend, b"1.1", PRESERVE, upgrade=True, close=True)
    assert values(out, b"connection") == [b"upgrade"]
    assert values(out, b"upgrade") == [b"websocket"]


def test_upgrade_requested_but_not_offered_falls_back_to_close() -> None:
    out = downstream_response_headers([], b"1.1", PRESERVE, upgrade=True, close=True)
    assert values(out, b"connection") == [b"close"]
    assert b"upgrade" not in names(out)


def test_response_protected_headers_survive_connection_nomination() -> None:
    backend = [
        (b"connection", b"content-length, content-type"),
        (b"content-length", b"2"),
        (b"content-type", b"text/plain"),
    ]
    out = downstream_response_headers(backend, b"1.1", PRESERVE)
    assert values(out, b"content-length") == [b"2"]
    assert values(out, b"content-type") == [b"text/plain"]


# -- reason_phrase -----------------------------------------------------------------------------


def test_reason_phrase_keeps_the_backends_or_supplies_the_standard_one() -> None:
    assert reason_phrase(200, b"Fine") == b"Fine"
    assert reason_phrase(200) == b"OK"
    assert reason_phrase(404, b"") == b"Not Found"
    assert reason_phrase(599) == b""  # unknown codes get no invented phrase
    h11.Response(status_code=599, headers=[], reason=reason_phrase(599))  # still valid


# -- is_event_stream ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        b"text/event-stream",
        b"text/event-stream; charset=utf-8",
        b"Text/Event-Stream",
        b"text/event-stream ;x=1",
    ],
)
def test_event_stream_content_types(content_type: bytes) -> None:
    assert is_event_stream([(b"cache-control", b"no-cache"), (b"content-type", content_type)])


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"content-type", b"application/json")],
        [(b"content-type", b"text/event-streamx")],
        [(b"content-type", b"text/plain; x=text/event-stream")],
        [(b"x-content-type", b"text/event-stream")],
    ],
)
def test_not_event_streams(headers: list[tuple[bytes, bytes]]) -> None:
    assert not is_event_stream(headers)


# -- error_response / raw_error_response ------------------------------------------------------


def test_error_response_is_a_closing_text_response() -> None:
    response, body = error_response(502, "backend unreachable")
    assert response.status_code == 502
    assert response.reason == b"Bad Gateway"
    assert body == b"502 Bad Gateway: backend unreachable\n"
    assert values(list(response.headers), b"content-type") == [b"text/plain; charset=utf-8"]
    assert values(list(response.headers), b"content-length") == [str(len(body)).encode()]
    assert values(list(response.headers), b"connection") == [b"close"]


def test_error_response_can_keep_the_connection_and_add_headers() -> None:
    response, body = error_response(404, "no route", extra=[(b"x-reason", b"route")], close=False)
    headers = list(response.headers)
    assert b"connection" not in names(headers)
    assert values(headers, b"x-reason") == [b"route"]
    assert values(headers, b"content-length") == [str(len(body)).encode()]


def _parse_response(raw: bytes) -> tuple[h11.Response, bytes, h11.Connection]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    client.receive_data(b"")  # the proxy closes after an error
    response = client.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            body += bytes(event.data)
        else:
            assert isinstance(event, h11.EndOfMessage)
            break
    return response, body, client


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, b"Bad Request"),
        (431, b"Request Header Fields Too Large"),
        (502, b"Bad Gateway"),
        (503, b"Service Unavailable"),
    ],
)
def test_raw_error_response_is_valid_http(status: int, reason: bytes) -> None:
    raw = raw_error_response(status, "refused")
    assert raw.startswith(b"HTTP/1.1 %d " % status)
    assert b"\r\n\r\n" in raw
    response, body, client = _parse_response(raw)
    assert response.status_code == status
    assert response.reason == reason
    assert body == b"%d %s: refused\n" % (status, reason)
    assert values(list(response.headers), b"content-length") == [str(len(body)).encode()]
    assert values(list(response.headers), b"connection") == [b"close"]
    assert b"retry-after" not in names(list(response.headers))
    assert client.their_state is h11.MUST_CLOSE  # "connection: close" was understood
    assert isinstance(client.next_event(), h11.ConnectionClosed)


def test_raw_error_response_carries_retry_after() -> None:
    raw = raw_error_response(503, "worker full", extra=[(b"Retry-After", b"1")])
    response, body, _ = _parse_response(raw)
    assert response.status_code == 503
    assert values(list(response.headers), b"retry-after") == [b"1"]
    assert body == b"503 Service Unavailable: worker full\n"


def test_raw_error_response_content_length_counts_bytes_not_characters() -> None:
    raw = raw_error_response(400, "caf\u00e9 \u2603")
    response, body, _ = _parse_response(raw)
    assert body.decode("utf-8").endswith("caf\u00e9 \u2603\n")
    assert values(list(response.headers), b"content-length") == [str(len(body)).encode()]


# -- protocol_error_status ------------------------------------------------------------------


def test_protocol_error_status_passes_the_hint_through() -> None:
    assert protocol_error_status(h11.RemoteProtocolError("bad line", error_status_hint=400)) == (
        400,
        "bad line",
    )
    assert protocol_error_status(h11.RemoteProtocolError("te", error_status_hint=501)) == (
        501,
        "te",
    )
    assert protocol_error_status(h11.RemoteProtocolError("", error_status_hint=400)) == (
        400,
        "malformed request",
    )


def test_protocol_error_status_maps_oversized_heads_to_431() -> None:
    exc = h11.RemoteProtocolError("Receive buffer too long", error_status_hint=431)
    assert protocol_error_status(exc)[0] == 431


def test_request_info_is_what_inspect_request_returns() -> None:
    assert isinstance(inspect_request(request("/")), RequestInfo)
