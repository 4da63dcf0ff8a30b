"""Pure routing (proxy.routing): prefix matching, round-robin, upstream targets."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import RouteConfig
from proxy.routing import Backend, Route, RouteTable

A = Backend.from_url("http://127.0.0.1:9001")
B = Backend.from_url("http://127.0.0.1:9002")
C = Backend.from_url("http://127.0.0.1:9003")


def route(prefix: str, *backends: Backend, strip: bool = False) -> Route:
    return Route(prefix=prefix, backends=backends or (A,), host_mode=None, strip_prefix=strip)


def table(*prefixes: str) -> RouteTable:
    return RouteTable([route(p) for p in prefixes])


def matched(t: RouteTable, path: str) -> str | None:
    found = t.match(path)
    return None if found is None else found.prefix


# -- matching -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "prefix"),
    [
        ("/api/v2/tools", "/api/v2"),
        ("/api/v2", "/api/v2"),
        ("/api/v2x", "/api"),
        ("/api/v", "/api"),
        ("/api", "/api"),
        ("/apix", "/"),
        ("/other", "/"),
        ("/", "/"),
    ],
)
def test_longest_prefix_wins(path: str, prefix: str) -> None:
    assert matched(table("/", "/api", "/api/v2"), path) == prefix


def test_declaration_order_does_not_matter() -> None:
    prefixes = ["/", "/a", "/a/b", "/a/b/c", "/ab", "/b"]
    for seed in range(10):
        shuffled = prefixes[:]
        random.Random(seed).shuffle(shuffled)
        t = table(*shuffled)
        assert matched(t, "/a/b/c/d") == "/a/b/c"
        assert matched(t, "/a/bc") == "/a"
        assert matched(t, "/ab/c") == "/ab"
        assert matched(t, "/c") == "/"
        lengths = [len(r.prefix) for r in t.routes]
        assert lengths == sorted(lengths, reverse=True)
        assert sorted(r.prefix for r in t.routes) == sorted(prefixes)


@pytest.mark.parametrize(
    ("path", "hit"),
    [
        ("/api", True),
        ("/api/", True),
        ("/api/x", True),
        ("/api/x/y", True),
        ("/apix", False),
        ("/api-v2", False),
        ("/ap", False),
        ("/", False),
        ("/x/api", False),
    ],
)
def test_prefix_matches_on_a_segment_boundary(path: str, hit: bool) -> None:
    assert (matched(table("/api"), path) == "/api") is hit


@pytest.mark.parametrize("path", ["/", "/x", "/api/x", "/a/b/c/"])
def test_root_prefix_matches_everything(path: str) -> None:
    assert matched(table("/"), path) == "/"


@pytest.mark.parametrize(
    ("path", "hit"),
    [("/api/", True), ("/api/x", True), ("/api", False), ("/apix", False), ("/api//", True)],
)
def test_prefix_ending_with_slash(path: str, hit: bool) -> None:
    assert (matched(table("/api/"), path) == "/api/") is hit


def test_no_match_is_none() -> None:
    t = table("/api", "/mcp")
    assert t.match("/other") is None
    assert t.match("/") is None
    assert t.match("/mcpx") is None
    assert RouteTable([]).match("/") is None


def test_matching_is_case_sensitive() -> None:
    assert table("/api").match("/API") is None


@given(
    prefix=st.from_regex(r"\A(/[a-z]{1,4}){1,3}\Z"),
    rest=st.from_regex(r"\A[a-z/]{0,8}\Z"),
)
def test_segment_boundary_property(prefix: str, rest: str) -> None:
    path = prefix + rest
    hit = table(prefix).match(path) is not None
    assert hit == (rest == "" or rest.startswith("/"))


# -- round-robin -------------------------------------------------------------------------


def test_round_robin_over_backends() -> None:
    r = route("/", A, B, C)
    assert [r.choose_backend() for _ in range(7)] == [A, B, C, A, B, C, A]


def test_single_backend_is_always_chosen() -> None:
    r = route("/", B)
    assert {r.choose_backend() for _ in range(5)} == {B}


def test_round_robin_is_per_route() -> None:
    one, two = route("/one", A, B), route("/two", A, B)
    assert one.choose_backend() == A
    assert one.choose_backend() == B
    assert two.choose_backend() == A  # not advanced by the other route


# -- upstream targets ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/api/x?q=1", b"/api/x?q=1"),
        (b"/api", b"/api"),
        (b"/api/", b"/api/"),
    ],
)
def test_upstream_target_unchanged_without_strip(target: bytes, expected: bytes) -> None:
    assert route("/api").upstream_target(A, target) == expected


@pytest.mark.parametrize(
    ("prefix", "target", "expected"),
    [
        ("/api", b"/api/x?q=1", b"/x?q=1"),
        ("/api", b"/api/x/y", b"/x/y"),
        ("/api", b"/api", b"/"),
        ("/api", b"/api/", b"/"),
        ("/api", b"/api?q=1", b"/?q=1"),
        ("/api/", b"/api/x", b"/x"),
        ("/api/", b"/api/", b"/"),
        ("/a/b", b"/a/b/c", b"/c"),
        ("/", b"/x?q", b"/x?q"),
    ],
)
def test_upstream_target_with_strip_prefix(prefix: str, target: bytes, expected: bytes) -> None:
    assert route(prefix, strip=True).upstream_target(A, target) == expected


def test_backend_base_path_is_prepended() -> None:
    based = Backend.from_url("http://127.0.0.1:9000/base/")
    assert based.base_path == b"/base"
    assert route("/api").upstream_target(based, b"/api/x?q") == b"/base/api/x?q"
    assert route("/api", strip=True).upstream_target(based, b"/api/x?q") == b"/base/x?q"
    assert route("/", strip=True).upstream_target(based, b"/x") == b"/base/x"


@given(rest=st.from_regex(r"\A(/[a-z0-9._-]{0,6}){0,4}(\?[a-z=&/]{0,6})?\Z"))
def test_strip_prefix_leaves_the_rest_as_origin_form(rest: str) -> None:
    stripped = route("/api", strip=True).upstream_target(A, b"/api" + rest.encode())
    expected = rest if rest.startswith("/") else "/" + rest
    assert stripped == expected.encode()


# -- Backend ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port", "base_path", "authority"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1", 8000, b"", b"127.0.0.1:8000"),
        ("http://127.0.0.1", "127.0.0.1", 80, b"", b"127.0.0.1"),
        ("http://127.0.0.1:80", "127.0.0.1", 80, b"", b"127.0.0.1"),
        (
            "http://backend.internal:8080/mcp/",
            "backend.internal",
            8080,
            b"/mcp",
            b"backend.internal:8080",
        ),
        ("http://[::1]:8000", "::1", 8000, b"", b"[::1]:8000"),
        ("http://[::1]", "::1", 80, b"", b"[::1]"),
        ("http://[2001:db8::5]:80/x", "2001:db8::5", 80, b"/x", b"[2001:db8::5]"),
    ],
)
def test_backend_from_url(
    url: str, host: str, port: int, base_path: bytes, authority: bytes
) -> None:
    backend = Backend.from_url(url)
    assert backend.url == url
    assert backend.host == host
    assert backend.port == port
    assert backend.base_path == base_path
    assert backend.authority == authority


@pytest.mark.parametrize(
    "url", ["https://127.0.0.1:8000", "http://", "http://:8000", "127.0.0.1:8000", "http://h:x"]
)
def test_backend_from_bad_url_raises(url: str) -> None:
    with pytest.raises(ValueError):
        Backend.from_url(url)


def test_backends_are_hashable_values() -> None:
    assert Backend.from_url("http://127.0.0.1:9001") == A
    assert len({A, Backend.from_url("http://127.0.0.1:9001"), B}) == 2


# -- from_config -----------------------------------------------------------------------


def test_route_table_from_config() -> None:
    t = RouteTable.from_config(
        [
            RouteConfig(prefix="/", backends=("http://127.0.0.1:9001",)),
            RouteConfig(
                prefix="/mcp",
                backends=("http://127.0.0.1:9002", "http://127.0.0.1:9003/base"),
                host="rewrite",
                strip_prefix=True,
            ),
        ]
    )
    mcp = t.match("/mcp/x")
    assert mcp is not None
    assert mcp.prefix == "/mcp"
    assert mcp.host_mode == "rewrite"
    assert mcp.strip_prefix
    assert [b.url for b in mcp.backends] == ["http://127.0.0.1:9002", "http://127.0.0.1:9003/base"]
    root = t.match("/x")
    assert root is not None
    assert root.prefix == "/"
    assert root.host_mode is None
    assert not root.strip_prefix
    assert t.backends() == {A, B, Backend.from_url("http://127.0.0.1:9003/base")}
    first, second = mcp.choose_backend(), mcp.choose_backend()
    assert mcp.upstream_target(first, b"/mcp/x") == b"/x"
    assert mcp.upstream_target(second, b"/mcp/x") == b"/base/x"
