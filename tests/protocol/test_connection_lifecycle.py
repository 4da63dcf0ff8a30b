"""How a connection ends: LINGER, CLOSED, drains in every state, the drain deadline
(``abandon``), and the books: one account per exchange, connection-cap leases given back
once, the connection-kind gauge back to balance."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from proxy.protocol.connection_core import LINGER_BYTES, LINGER_SECONDS
from proxy.ratelimit import Decision
from tests.support.machine import World, lease
from tests.support.machine_traffic import SSE_HEAD, call_2026, chunk, ok, routes_config
from tests.support.wire import client_answer, client_answers

pytestmark = pytest.mark.usefixtures("both_ways")

GET = b"GET /one HTTP/1.1\r\nHost: a.example\r\n\r\n"
PARTIAL = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
UPGRADE = (
    b"GET /one/ws HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


def refused() -> World:
    """A connection whose request was refused: its answer sent, our side shut."""
    w = World(routes_config())
    w.feed(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n")
    assert client_answer(w.t.take_client()).status == 505
    assert w.state == "LINGER" and w.t.client_shut and not w.t.client_closed
    return w


# -- LINGER --------------------------------------------------------------------------------


def test_lingering_reads_and_drops_what_the_client_still_sends(bytewise: bool) -> None:
    w = refused()
    w.feed(
        b"POST /more HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc", byte_at_a_time=bytewise
    )
    assert w.state == "LINGER"
    assert w.t.client_out == b"" and w.t.upstreams == [] and len(w.env.accounted) == 1


def test_lingering_ends_at_the_clients_eof() -> None:
    w = refused()
    w.c.client_closed()
    assert w.state == "CLOSED" and w.t.client_closed


def test_lingering_ends_after_its_time() -> None:
    w = refused()
    w.advance(LINGER_SECONDS - 0.01)
    assert w.state == "LINGER"
    w.advance(0.01)
    assert w.state == "CLOSED"


def test_lingering_ends_after_a_mebibyte() -> None:
    w = refused()
    w.feed(b"x" * (LINGER_BYTES - 100))
    assert w.state == "LINGER"
    w.feed(b"x" * 200)
    assert w.state == "CLOSED"


def test_a_clean_close_after_an_answer_lingers_too() -> None:
    w = World(routes_config())
    w.feed(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    w.answer(ok())
    assert w.state == "LINGER"
    w.feed(GET)
    assert len(w.t.upstreams) == 1  # what follows a Connection: close is not served


# -- CLOSED --------------------------------------------------------------------------------


def snapshot(w: World) -> tuple[object, ...]:
    t = w.t
    return (
        bytes(t.client_out),
        t.client_shut,
        t.client_closed,
        t.client_paused,
        [(bytes(up.sent), up.shut, up.paused, up.finished) for up in t.upstreams],
        len(t.checks),
        list(t.released),
        len(w.env.accounted),
        dict(w.env.kinds),
        list(w.env.proxy_refusals),
        w.state,
    )


def closed_by_timeout() -> World:
    w = World(routes_config())
    w.advance(w.env.config.limits.header_timeout)
    return w


def closed_mid_upload() -> World:
    w = World(routes_config())
    w.feed(b"POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 200000\r\n\r\nabc")
    w.c.client_closed(reset=True)
    return w


def closed_mid_stream() -> World:
    w = World(routes_config())
    w.feed(call_2026())
    w.answer(SSE_HEAD + chunk(b"data: 1\n\n"))
    w.c.client_closed()
    return w


def closed_tunnel() -> World:
    w = World(routes_config())
    w.feed(UPGRADE)
    w.answer(SWITCHED)
    w.c.upstream_closed(reset=True)
    return w


@pytest.mark.parametrize(
    "closed", [closed_by_timeout, closed_mid_upload, closed_mid_stream, closed_tunnel]
)
def test_a_closed_connection_ignores_every_event(closed: Callable[[], World]) -> None:
    w = closed()
    assert w.state == "CLOSED"
    before = snapshot(w)
    w.feed(GET)
    w.c.client_closed()
    w.c.client_closed(reset=True)
    w.c.upstream_connected()
    w.c.upstream_data(ok())
    w.c.upstream_closed()
    w.c.upstream_closed(reset=True, before_write=True)
    w.c.client_backlog(True)
    w.c.upstream_backlog(True)
    w.env.clock += 3600
    w.c.timer()
    w.env.draining = True
    w.c.drain()
    w.c.admitted(Decision(True, None))
    w.c.abandon()
    assert snapshot(w) == before
    assert w.c.deadline == float("inf")


# -- drains --------------------------------------------------------------------------------


def drained_answer(w: World) -> None:
    w.answer(ok(b"served"))
    answer = client_answer(w.t.take_client())
    assert (answer.body, answer.header(b"connection")) == (b"served", b"close")
    assert w.state == "LINGER"


def drain(w: World) -> None:
    w.env.draining = True
    w.c.drain()


def test_a_drain_serves_a_request_whose_head_is_arriving(bytewise: bool) -> None:
    w = World(routes_config())
    w.feed(GET[:7], byte_at_a_time=bytewise)
    drain(w)
    w.feed(GET[7:], byte_at_a_time=bytewise)
    drained_answer(w)


def test_a_drain_serves_a_request_waiting_for_admission() -> None:
    w = World(routes_config())
    w.env.rate_limited = True
    w.feed(GET)
    drain(w)
    w.c.admitted(Decision(True, None))
    drained_answer(w)


def test_a_drain_serves_a_request_whose_body_is_arriving(bytewise: bool) -> None:
    w = World(routes_config())
    w.feed(b"POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhe")
    drain(w)
    w.feed(b"llo", byte_at_a_time=bytewise)
    drained_answer(w)


def test_a_drain_serves_a_request_waiting_for_its_answer() -> None:
    w = World(routes_config())
    w.feed(GET)
    drain(w)
    drained_answer(w)


def test_a_drain_mid_response_finishes_it_then_closes_between_requests() -> None:
    w = World(routes_config())
    w.feed(GET)
    w.answer(PARTIAL)
    drain(w)
    w.answer(b"defghij")
    assert client_answer(w.t.take_client()).complete
    assert w.state == "IDLE"
    w.advance(1.0)
    assert w.state == "CLOSED" and w.t.client_out == b""


def test_a_drain_serves_pipelined_requests_that_arrived_then_closes() -> None:
    w = World(routes_config())
    w.feed(GET + GET)
    drain(w)
    w.answer(ok(b"1"))
    w.answer(ok(b"2"))
    answers = client_answers(w.t.take_client(), (b"GET", b"GET"))
    assert [a.body for a in answers] == [b"1", b"2"]
    assert answers[-1].header(b"connection") == b"close"
    assert w.state == "LINGER"


def test_a_drain_is_ignored_by_a_connection_already_ending() -> None:
    w = refused()
    drain(w)
    assert w.state == "LINGER" and w.t.client_out == b""


def test_the_drain_deadline_records_what_was_cut_short() -> None:
    w = World(routes_config())
    w.feed(GET)
    w.c.abandon()
    assert w.state == "CLOSED"
    assert w.t.up.finished == {"reusable": False, "ok": None, "failure": None}
    [x] = w.accounted
    assert (x.status, x.error) == (503, "closed at the drain deadline")
    w = World(routes_config())
    w.feed(GET)
    w.answer(PARTIAL)
    w.c.abandon()
    [x] = w.accounted
    assert (x.status, x.error) == (200, "closed at the drain deadline")
    w = World(routes_config())
    w.c.abandon()
    assert w.state == "CLOSED" and w.env.accounted == []


# -- the books -----------------------------------------------------------------------------


def test_each_exchange_is_accounted_once_and_refusals_before_a_head_say_so() -> None:
    w = World(routes_config())
    w.feed(GET + GET)
    w.answer(ok())
    w.answer(ok())
    w.feed(b"GET /\r\n")
    assert [(x.status, early) for x, early in w.env.accounted] == [
        (200, False),
        (200, False),
        (400, True),
    ]


def refused_then_lingered(w: World) -> None:
    w.feed(b"GET /\r\n")
    w.advance(LINGER_SECONDS)


def test_a_lease_is_given_back_once_however_the_connection_ends() -> None:
    endings: list[Callable[[World], None]] = [
        lambda w: w.c.client_closed(),
        lambda w: w.c.client_closed(reset=True),
        lambda w: w.advance(w.env.config.limits.keepalive_timeout),
        lambda w: w.c.abandon(),
        refused_then_lingered,
    ]
    for end in endings:
        w = World(routes_config())
        w.env.ip_cap = 2
        w.feed(GET)
        held = lease("ip:192.0.2.7")
        w.c.admitted(held)
        w.answer(ok())
        end(w)
        assert w.state == "CLOSED"
        w.c.client_closed()
        assert w.t.released == [held]


def test_the_kind_gauge_follows_the_connection_and_returns_to_balance() -> None:
    w = World(routes_config())
    w.feed(call_2026())
    w.answer(SSE_HEAD + chunk(b"data: 1\n\n"))
    assert w.env.kinds == {"http": -1, "sse": 1, "websocket": 0}
    w.answer(b"0\r\n\r\n")
    assert w.env.kinds == {"http": 0, "sse": 0, "websocket": 0}
    w.feed(UPGRADE)
    w.answer(SWITCHED)
    assert w.env.kinds == {"http": -1, "sse": 0, "websocket": 1}
    w.c.client_closed(reset=True)
    assert w.env.kinds == {"http": 0, "sse": 0, "websocket": 0}


def test_a_client_pipelining_too_much_is_paused_until_its_turn() -> None:
    w = World(routes_config())
    w.feed(GET)
    # A volume, not a framing, test: whole reads (a paused client sends nothing more).
    w.feed(GET * ((1 << 20) // len(GET) + 1), byte_at_a_time=False)
    assert w.t.client_pauses == [True]
    w.answer(ok())
    assert w.t.client_pauses == [True, False]
