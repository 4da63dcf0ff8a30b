"""The connection machine before a request is known: the PROXY protocol header (PROXY),
waiting for a request (IDLE) and reading its head (HEAD). Driven through its events
only, every input fed whole and one byte per event."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from proxy.protocol.proxy_header import V2_SIGNATURE
from tests.support.machine import World, make_config
from tests.support.machine_traffic import ok, routes_config
from tests.support.wire import backend_request, client_answer

pytestmark = pytest.mark.usefixtures("both_ways")

GET = b"GET /x HTTP/1.1\r\nHost: a.example\r\n\r\n"
V1 = b"PROXY TCP4 203.0.113.9 10.0.0.1 51000 80\r\n"


def v2_tcp4(source: str, port: int) -> bytes:
    block = ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address("10.0.0.1").packed
    block += struct.pack("!HH", port, 80)
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, len(block)) + block


def served(w: World, *, bytewise: bool = False) -> None:
    """Answer the request on its way upstream and check that the client got it."""
    assert w.state == "UPSTREAM"
    w.answer(ok(b"hello"), byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client())
    assert (answer.status, answer.body, answer.complete) == (200, b"hello", True)


# -- PROXY ---------------------------------------------------------------------------------


def test_a_trusted_peer_opens_with_a_v1_header_that_replaces_its_address(bytewise: bool) -> None:
    w = World(proxy_header=True, trusted=True)
    assert w.state == "PROXY"
    w.feed(V1 + GET, byte_at_a_time=bytewise)
    sent = backend_request(w.t.up.sent)
    assert sent.header(b"x-forwarded-for") == b"203.0.113.9"
    served(w, bytewise=bytewise)
    assert w.env.proxy_refusals == []


def test_a_trusted_peer_may_send_a_v2_header(bytewise: bool) -> None:
    w = World(proxy_header=True, trusted=True)
    w.feed(v2_tcp4("198.51.100.4", 41000) + GET, byte_at_a_time=bytewise)
    assert backend_request(w.t.up.sent).header(b"x-forwarded-for") == b"198.51.100.4"
    served(w, bytewise=bytewise)


def test_a_v2_local_header_keeps_the_real_address(bytewise: bool) -> None:
    # What a load balancer's own health checks send: no addresses to take.
    w = World(proxy_header=True, trusted=True)
    w.feed(V2_SIGNATURE + b"\x20\x00\x00\x00" + GET, byte_at_a_time=bytewise)
    assert backend_request(w.t.up.sent).header(b"x-forwarded-for") == b"192.0.2.7"


def test_a_trusted_peer_without_a_header_is_refused_without_an_answer(bytewise: bool) -> None:
    w = World(proxy_header=True, trusted=True)
    w.feed(GET, byte_at_a_time=bytewise)
    assert w.state == "CLOSED"
    assert w.t.client_closed and w.t.client_out == b""
    assert w.t.upstreams == [] and w.env.accounted == []
    assert len(w.env.proxy_refusals) == 1


def test_an_untrusted_peer_sending_a_header_is_refused(bytewise: bool) -> None:
    for header in (V1, v2_tcp4("198.51.100.4", 41000)):
        w = World(proxy_header=True, trusted=False)
        w.feed(header + GET, byte_at_a_time=bytewise)
        assert w.state == "CLOSED"
        assert w.t.upstreams == [] and w.t.client_out == b""
        assert w.env.proxy_refusals == ["PROXY header from an untrusted source"]


def test_an_untrusted_peer_keeps_its_address_and_may_start_like_proxy(bytewise: bool) -> None:
    # PROPFIND shares "PRO" with "PROXY": the machine must wait to tell them apart,
    # then treat the bytes as the request they are.
    w = World(proxy_header=True, trusted=False)
    w.feed(b"PROPFIND /x HTTP/1.1\r\nHost: a.example\r\n\r\n", byte_at_a_time=bytewise)
    sent = backend_request(w.t.up.sent)
    assert (sent.method, sent.header(b"x-forwarded-for")) == (b"PROPFIND", b"192.0.2.7")
    assert w.env.proxy_refusals == []


def test_an_untrusted_peer_stalling_after_p_is_timed_like_any_head() -> None:
    # "P" may start "POST" as well as "PROXY": an untrusted client that sends it and
    # stalls has sent part of a request head, not a PROXY header.
    w = World(proxy_header=True, trusted=False)
    w.feed(b"P")
    w.advance(w.env.config.proxy_protocol.timeout)
    assert w.env.proxy_refusals == []
    w.advance(w.env.config.limits.header_timeout)
    assert client_answer(w.t.take_client()).status == 408


def test_a_malformed_header_from_a_trusted_peer_is_refused(bytewise: bool) -> None:
    w = World(proxy_header=True, trusted=True)
    w.feed(b"PROXY TCP4 203.0.113.999 10.0.0.1 1 2\r\n" + GET, byte_at_a_time=bytewise)
    assert w.state == "CLOSED"
    assert w.env.proxy_refusals[0].startswith("malformed PROXY header")
    assert w.t.upstreams == []


def test_a_header_not_complete_in_time_closes_the_connection(bytewise: bool) -> None:
    w = World(proxy_header=True, trusted=True)
    w.feed(V1[:20], byte_at_a_time=bytewise)
    assert w.state == "PROXY"
    timeout = w.env.config.proxy_protocol.timeout
    w.advance(timeout - 0.01)
    assert w.state == "PROXY"
    w.advance(0.01)
    assert w.state == "CLOSED"
    assert w.env.proxy_refusals == ["timed out reading the PROXY header"]
    assert w.t.client_out == b"" and w.env.accounted == []


def test_after_the_header_the_request_head_has_its_own_time() -> None:
    for rest, state in ((b"", "IDLE"), (GET[:5], "HEAD")):
        w = World(proxy_header=True, trusted=True)
        w.advance(2.0)
        w.feed(V1 + rest)
        assert w.state == state
        timeout = w.env.config.limits.header_timeout
        assert w.c.deadline == w.env.clock + timeout
        w.advance(timeout)
        assert w.state == "CLOSED" if state == "IDLE" else "LINGER"


def test_a_client_closing_before_its_header_leaves_nothing_behind() -> None:
    w = World(proxy_header=True, trusted=True)
    w.c.client_closed()
    assert w.state == "CLOSED"
    assert w.env.accounted == [] and w.env.proxy_refusals == []


# -- IDLE ----------------------------------------------------------------------------------


def test_a_first_request_has_header_timeout_from_the_accept() -> None:
    w = World()
    timeout = w.env.config.limits.header_timeout
    assert (w.state, w.c.deadline) == ("IDLE", w.env.clock + timeout)
    w.advance(timeout - 0.01)
    assert w.state == "IDLE"
    w.advance(0.01)
    # Nothing was asked, so nothing is answered or accounted.
    assert w.state == "CLOSED"
    assert w.t.client_closed and w.t.client_out == b"" and w.env.accounted == []


def test_a_kept_alive_connection_waits_keepalive_timeout_for_the_next_request(
    bytewise: bool,
) -> None:
    w = World()
    w.feed(GET, byte_at_a_time=bytewise)
    served(w, bytewise=bytewise)
    assert w.state == "IDLE"
    keepalive = w.env.config.limits.keepalive_timeout
    assert w.c.deadline == w.env.clock + keepalive
    w.advance(keepalive - 0.01)
    assert w.state == "IDLE"
    w.advance(0.01)
    assert w.state == "CLOSED"
    assert w.t.client_out == b"" and len(w.env.accounted) == 1


def test_the_next_request_on_a_kept_alive_connection_reuses_the_backend_connection(
    bytewise: bool,
) -> None:
    w = World()
    w.feed(GET, byte_at_a_time=bytewise)
    served(w, bytewise=bytewise)
    first = w.t.up
    assert first.finished == {"reusable": True, "ok": True, "failure": None}
    w.t.repool(first)
    w.feed(GET, byte_at_a_time=bytewise)
    assert w.t.up is first
    served(w, bytewise=bytewise)
    assert [x.status for x in w.accounted] == [200, 200]


def test_a_client_closing_an_idle_connection_ends_it_quietly() -> None:
    for reset in (False, True):
        w = World()
        w.feed(GET)
        served(w)
        w.c.client_closed(reset=reset)
        assert w.state == "CLOSED"
        assert w.t.client_closed and w.t.client_out == b""
        assert len(w.env.accounted) == 1


def test_drain_gives_an_idle_kept_alive_connection_a_short_grace() -> None:
    w = World()
    w.feed(GET)
    served(w)
    w.env.draining = True
    w.c.drain()
    assert w.state == "IDLE"
    assert w.c.deadline <= w.env.clock + 1.0
    w.advance(1.0)
    assert w.state == "CLOSED"
    assert w.t.client_out == b"" and len(w.env.accounted) == 1


def test_a_request_arriving_in_the_drain_grace_is_served_with_connection_close(
    bytewise: bool,
) -> None:
    w = World()
    w.feed(GET)
    served(w)
    w.env.draining = True
    w.c.drain()
    w.advance(0.5)
    w.feed(GET, byte_at_a_time=bytewise)
    w.answer(ok(b"late"), byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client())
    assert (answer.status, answer.body, answer.header(b"connection")) == (200, b"late", b"close")
    assert w.state == "LINGER" and w.t.client_shut


def test_drain_leaves_a_fresh_connection_its_first_request(bytewise: bool) -> None:
    # A client that connected just before the drain has a request on its way.
    w = World()
    w.env.draining = True
    w.c.drain()
    assert w.c.deadline == w.env.clock + w.env.config.limits.header_timeout
    w.feed(GET, byte_at_a_time=bytewise)
    w.answer(ok(b"first"), byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client())
    assert (answer.status, answer.header(b"connection")) == (200, b"close")
    assert w.state == "LINGER"


def test_a_worker_that_takes_no_more_work_answers_503_at_once() -> None:
    for shutting_down, reason in ((True, "shutting down"), (False, "max_connections_per_worker")):
        w = World()
        w.c.refuse_new(shutting_down)
        answer = client_answer(w.t.take_client())
        assert (answer.status, answer.header(b"connection")) == (503, b"close")
        assert answer.header(b"retry-after") == b"1"
        assert reason.encode() in answer.body
        assert w.state == "LINGER"
        assert [refused_early for _, refused_early in w.env.accounted] == [True]


# -- HEAD ----------------------------------------------------------------------------------


def test_a_partial_head_gets_408_at_header_timeout(bytewise: bool) -> None:
    w = World()
    w.feed(GET[:20], byte_at_a_time=bytewise)
    assert w.state == "HEAD"
    w.advance(w.env.config.limits.header_timeout)
    answer = client_answer(w.t.take_client())
    assert (answer.status, answer.header(b"connection")) == (408, b"close")
    assert w.state == "LINGER" and w.t.upstreams == []
    [(x, refused_early)] = w.env.accounted
    assert (x.status, refused_early) == (408, True)


def test_a_kept_alive_connection_times_its_next_head_from_its_first_byte() -> None:
    w = World()
    w.feed(GET)
    served(w)
    w.advance(30.0)
    w.feed(b"GE")
    assert w.state == "HEAD"
    timeout = w.env.config.limits.header_timeout
    assert w.c.deadline == w.env.clock + timeout
    w.advance(timeout - 0.01)
    assert w.state == "HEAD"
    w.advance(0.01)
    assert client_answer(w.t.take_client()).status == 408


def test_a_request_line_that_cannot_start_a_head_is_refused_at_once(bytewise: bool) -> None:
    # HTTP/0.9's "GET /" has no version: nothing after it can make it valid.
    w = World()
    w.feed(b"GET /\r\n", byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client())
    assert answer.status == 400
    assert w.state == "LINGER" and w.t.upstreams == []
    assert [refused_early for _, refused_early in w.env.accounted] == [True]


def test_unsupported_versions_and_bad_heads_are_refused(bytewise: bool) -> None:
    cases = (
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-a: b\x01c\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    )
    for head, status in cases:
        w = World()
        w.feed(head, byte_at_a_time=bytewise)
        assert client_answer(w.t.take_client()).status == status, head
        assert w.t.upstreams == [] and w.state == "LINGER"


def test_an_oversized_head_gets_431(bytewise: bool) -> None:
    w = World(make_config(limits={"max_header_bytes": 1024}))
    w.feed(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 1100 + b"\r\n\r\n", byte_at_a_time=bytewise
    )
    assert client_answer(w.t.take_client()).status == 431
    assert w.state == "LINGER" and w.t.upstreams == []


def test_a_client_closing_inside_a_head_is_recorded_not_answered(bytewise: bool) -> None:
    w = World()
    w.feed(GET[:10], byte_at_a_time=bytewise)
    w.c.client_closed()
    assert w.state == "CLOSED"
    assert w.t.client_out == b"" and w.t.upstreams == []
    [(x, refused_early)] = w.env.accounted
    assert (x.status, refused_early) == (400, True)


def test_a_client_resetting_inside_a_head_ends_the_connection() -> None:
    w = World()
    w.feed(GET[:10])
    w.c.client_closed(reset=True)
    assert w.state == "CLOSED" and w.t.client_out == b""


def test_a_path_no_route_matches_gets_404(bytewise: bool) -> None:
    w = World(make_config([{"prefix": "/api", "backends": ["http://10.0.0.1:80"]}]))
    w.feed(GET, byte_at_a_time=bytewise)
    assert client_answer(w.t.take_client()).status == 404
    [(x, refused_early)] = w.env.accounted
    assert (x.status, x.refused, refused_early) == (404, True, False)


def test_the_usual_request_skips_admission_when_nothing_is_checked(bytewise: bool) -> None:
    w = World(routes_config())
    w.env.checking = False
    w.feed(GET, byte_at_a_time=bytewise)
    assert w.t.checks == []
    served(w, bytewise=bytewise)
    assert w.state == "IDLE"


def test_pipelined_requests_are_answered_in_order(bytewise: bool) -> None:
    w = World()
    w.feed(GET.replace(b"/x", b"/a") + GET.replace(b"/x", b"/b"), byte_at_a_time=bytewise)
    assert backend_request(w.t.up.sent).target == b"/a"
    w.answer(ok(b"A"), byte_at_a_time=bytewise)
    # The second head was held while the first was served; it goes up now.
    assert backend_request(w.t.up.sent).target == b"/b"
    w.answer(ok(b"B"), byte_at_a_time=bytewise)
    data = w.t.take_client()
    assert data.index(b"A") < data.index(b"B")
    assert [x.target for x in w.accounted] == [b"/a", b"/b"]
    assert w.state == "IDLE"
