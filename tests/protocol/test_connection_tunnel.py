"""TUNNEL: after a WebSocket upgrade answered 101, bytes both ways as they come; a side's
EOF half-closes the other; a drain closes the client with 1001 at a frame boundary."""

from __future__ import annotations

import pytest

from proxy.protocol.ws_frames import GOING_AWAY, close_frame
from tests.support.machine import World
from tests.support.machine_traffic import ok, routes_config
from tests.support.wire import backend_request, client_answer

pytestmark = pytest.mark.usefixtures("both_ways")

UPGRADE = (
    b"GET /one/ws HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
SERVER_TEXT = b"\x81\x05hello"
"""An unmasked text frame, as a server sends it."""
CLIENT_TEXT = b"\x81\x82abcd" + bytes(a ^ b for a, b in zip(b"yo", b"abcd", strict=False))
"""A masked text frame, as a client sends it."""
GOING_AWAY_FRAME = close_frame(GOING_AWAY, "server going away", mask=False)


def tunnel(*, bytewise: bool = False, **sections: dict[str, object]) -> World:
    w = World(routes_config(**sections))
    w.feed(UPGRADE, byte_at_a_time=bytewise)
    sent = backend_request(w.t.up.sent)
    assert (sent.header(b"upgrade"), sent.header(b"sec-websocket-version")) == (b"websocket", b"13")
    w.answer(SWITCHED, byte_at_a_time=bytewise)
    assert w.state == "TUNNEL"
    head, _, rest = w.t.take_client().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    assert rest == b""
    w.t.up.sent.clear()
    return w


def test_a_valid_upgrade_answered_101_carries_bytes_both_ways(bytewise: bool) -> None:
    w = tunnel(bytewise=bytewise)
    assert w.env.kinds["websocket"] == 1
    w.answer(SERVER_TEXT, byte_at_a_time=bytewise)
    assert w.t.take_client() == SERVER_TEXT
    w.feed(CLIENT_TEXT, byte_at_a_time=bytewise)
    assert w.t.up.sent == CLIENT_TEXT
    assert w.c.disposition() == (False, False)


def test_bytes_sent_before_the_101_go_on_once_it_arrives() -> None:
    w = World(routes_config())
    w.feed(UPGRADE + CLIENT_TEXT)
    w.answer(SWITCHED + SERVER_TEXT)
    assert w.t.take_client().endswith(b"\r\n\r\n" + SERVER_TEXT)
    assert w.t.up.sent.endswith(b"\r\n\r\n" + CLIENT_TEXT)


def test_a_client_eof_half_closes_the_backend_which_has_time_to_finish(bytewise: bool) -> None:
    w = tunnel(bytewise=bytewise)
    w.c.client_closed()
    assert w.t.up.shut and w.state == "TUNNEL"
    half_close = w.env.config.upstream.tunnel_half_close_timeout
    w.advance(half_close - 0.01)
    w.answer(SERVER_TEXT, byte_at_a_time=bytewise)
    assert w.t.take_client() == SERVER_TEXT
    w.advance(0.01)
    assert w.state == "CLOSED"
    assert w.t.up.finished == {"reusable": False, "ok": None, "failure": None}
    [x] = w.accounted
    assert (x.status, x.error) == (101, "tunnel ended: half_closed")
    assert w.env.kinds["websocket"] == 0


def test_a_backend_eof_half_closes_the_client_and_both_closing_is_a_clean_end() -> None:
    w = tunnel()
    w.c.upstream_closed()
    assert w.t.client_shut and w.state == "TUNNEL"
    w.feed(CLIENT_TEXT)
    assert w.t.up.sent == CLIENT_TEXT
    w.c.client_closed()
    assert w.state == "CLOSED"
    [x] = w.accounted
    assert (x.status, x.error) == (101, None)


def test_a_reset_on_either_side_ends_both() -> None:
    w = tunnel()
    w.c.upstream_closed(reset=True)
    assert w.state == "CLOSED" and w.t.client_closed
    assert w.accounted[0].error == "tunnel ended: reset"
    w = tunnel()
    w.c.client_closed(reset=True)
    assert w.state == "CLOSED" and w.t.up.finished is not None
    assert w.accounted[0].error == "client reset the connection"
    assert w.env.kinds["websocket"] == 0


def test_a_tunnel_silent_both_ways_ends_at_stream_idle_timeout() -> None:
    w = tunnel(upstream={"stream_idle_timeout": 30})
    w.advance(20.0)
    w.feed(CLIENT_TEXT)  # traffic either way counts
    w.advance(29.0)
    assert w.state == "TUNNEL"
    w.advance(1.0)
    assert w.state == "CLOSED"
    assert w.accounted[0].error == "tunnel ended: idle_timeout"


def test_without_an_idle_limit_a_silent_tunnel_has_nothing_due() -> None:
    w = tunnel()
    assert w.c.deadline == float("inf")


def test_a_drain_closes_the_client_with_1001_at_a_frame_boundary(bytewise: bool) -> None:
    w = tunnel(bytewise=bytewise)
    w.answer(SERVER_TEXT[:4], byte_at_a_time=bytewise)
    w.env.draining = True
    w.c.drain()
    assert w.t.take_client() == SERVER_TEXT[:4]
    w.answer(SERVER_TEXT[4:], byte_at_a_time=bytewise)
    assert w.t.take_client() == SERVER_TEXT[4:] + GOING_AWAY_FRAME
    # The backend only sees the client's answer to that close, as from any client.
    assert w.t.up.sent == b""
    assert w.state == "TUNNEL"
    w.c.client_closed()
    w.c.upstream_closed()
    [x] = w.accounted
    assert x.error == "tunnel closed by drain (1001)"


def test_a_drain_at_a_boundary_closes_at_once_and_only_once() -> None:
    w = tunnel()
    w.env.draining = True
    w.c.drain()
    w.c.drain()
    assert w.t.take_client() == GOING_AWAY_FRAME
    w.answer(SERVER_TEXT)
    assert w.t.take_client() == SERVER_TEXT


def test_a_drain_adds_nothing_once_the_backend_is_closing() -> None:
    w = tunnel()
    backend_close = close_frame(1000, "bye", mask=False)
    w.answer(backend_close)
    w.t.take_client()
    w.env.draining = True
    w.c.drain()
    assert w.t.take_client() == b""


def test_a_tunnel_opened_during_a_drain_is_closed_with_1001_at_once() -> None:
    w = World(routes_config())
    w.feed(UPGRADE)
    w.env.draining = True
    w.c.drain()
    w.answer(SWITCHED)
    assert w.t.take_client().endswith(GOING_AWAY_FRAME)


def test_a_101_nobody_asked_for_gets_502(bytewise: bool) -> None:
    w = World(routes_config())
    w.feed(b"GET /one HTTP/1.1\r\nHost: a.example\r\n\r\n", byte_at_a_time=bytewise)
    w.answer(SWITCHED, byte_at_a_time=bytewise)
    assert client_answer(w.t.take_client()).status == 502
    assert w.t.up.finished == {"reusable": False, "ok": False, "failure": "error"}
    assert w.accounted[0].error == "backend switched protocols unasked"
    assert w.env.kinds == {"http": 0, "sse": 0, "websocket": 0}


def test_a_backend_declining_the_upgrade_answers_as_usual() -> None:
    w = World(routes_config())
    w.feed(UPGRADE)
    w.answer(ok(b"no"))
    assert client_answer(w.t.take_client()).body == b"no"
    assert w.state == "IDLE"


def test_invalid_upgrades_never_reach_a_backend(bytewise: bool) -> None:
    cases = (
        (UPGRADE.replace(b"Version: 13", b"Version: 12"), 426),
        (UPGRADE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"short"), 400),
    )
    for request, status in cases:
        w = World(routes_config())
        w.feed(request, byte_at_a_time=bytewise)
        assert client_answer(w.t.take_client()).status == status
        assert w.t.upstreams == []


def test_backpressure_in_a_tunnel_pauses_the_other_side() -> None:
    w = tunnel()
    w.c.client_backlog(True)
    w.c.client_backlog(False)
    assert w.t.up.pauses == [True, False]
    w.c.upstream_backlog(True)
    w.c.upstream_backlog(False)
    assert w.t.client_pauses == [True, False]
