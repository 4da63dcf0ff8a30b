"""STREAM: a text/event-stream answer relayed event by event; what the proxy adds (a
keep-alive comment, a drain's ``retry:`` hint) goes only between two events."""

from __future__ import annotations

import pytest

from tests.support.machine import World, make_config
from tests.support.machine_traffic import SSE_HEAD, call_2025, call_2026, chunk, routes_config
from tests.support.wire import client_answer

pytestmark = pytest.mark.usefixtures("both_ways")

GET_STREAM = b"GET /one HTTP/1.1\r\nHost: a.example\r\nAccept: text/event-stream\r\n\r\n"
LEGACY_OPEN = b"GET /mcp/sse HTTP/1.1\r\nHost: proxy.example\r\nAccept: text/event-stream\r\n\r\n"
RESULT_7 = b'data: {"jsonrpc":"2.0","id":7,"result":{}}\n\n'
KEEPALIVE = b": keep-alive\n\n"


def streaming(request: bytes, *, bytewise: bool = False, **sections: dict[str, object]) -> World:
    w = World(routes_config(**sections))
    w.feed(request, byte_at_a_time=bytewise)
    w.answer(SSE_HEAD, byte_at_a_time=bytewise)
    assert w.state == "STREAM"
    return w


def received(w: World) -> bytes:
    """The event stream as the client has read it so far (its framing undone)."""
    return client_answer(bytes(w.t.client_out), b"POST").body


def token(w: World) -> str:
    route = w.env.routes.match("/mcp")
    assert route is not None
    return w.env.tokens.issue(route.backends[0].replica, "backend-session-1")


def test_events_are_relayed_as_they_come_and_the_end_ends_the_exchange(bytewise: bool) -> None:
    w = streaming(GET_STREAM, bytewise=bytewise)
    assert w.env.kinds["sse"] == 1
    w.answer(chunk(b"data: 1\n\n"), byte_at_a_time=bytewise)
    assert received(w) == b"data: 1\n\n"
    w.answer(chunk(b"data: 2\n\n") + b"0\r\n\r\n", byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client())
    assert (answer.body, answer.complete) == (b"data: 1\n\ndata: 2\n\n", True)
    assert answer.header(b"content-type") == b"text/event-stream"
    assert w.state == "IDLE" and w.env.kinds["sse"] == 0
    [x] = w.accounted
    assert (x.status, x.error, x.streamed) == (200, None, True)


def test_mcp_streams_get_keepalive_comments_after_the_routes_interval(bytewise: bool) -> None:
    config = make_config(
        [
            {
                "prefix": "/mcp",
                "kind": "mcp",
                "backends": ["http://10.0.1.1:80"],
                "keepalive_interval": 4,
            }
        ]
    )
    w = World(config)
    w.feed(call_2026(), byte_at_a_time=bytewise)
    w.answer(SSE_HEAD + chunk(b"data: 1\n\n"), byte_at_a_time=bytewise)
    assert client_answer(bytes(w.t.client_out), b"POST").header(b"x-accel-buffering") == b"no"
    w.advance(3.99)
    assert received(w) == b"data: 1\n\n"
    w.advance(0.01)
    assert received(w) == b"data: 1\n\n" + KEEPALIVE
    w.advance(4.0)
    assert received(w) == b"data: 1\n\n" + KEEPALIVE * 2


def test_plain_http_streams_get_no_keepalive_comments() -> None:
    w = streaming(GET_STREAM)
    w.answer(chunk(b"data: 1\n\n"))
    w.advance(3600.0)
    assert received(w) == b"data: 1\n\n"


def test_a_keepalive_waits_for_an_event_boundary(bytewise: bool) -> None:
    w = streaming(call_2026(), bytewise=bytewise)
    w.answer(chunk(b"data: par"), byte_at_a_time=bytewise)
    w.advance(15.0)
    w.advance(15.0)
    assert received(w) == b"data: par"
    w.answer(chunk(b"tial\n\n"), byte_at_a_time=bytewise)
    w.advance(15.0)
    assert received(w) == b"data: partial\n\n" + KEEPALIVE


def test_a_keepalive_due_mid_event_leaves_no_deadline_already_passed() -> None:
    # The worker calls timer() whenever the deadline has passed: one left in the past
    # would have it called again at once, for ever, and nothing else would run.
    w = streaming(call_2026())
    w.answer(chunk(b"data: par"))
    w.env.clock += 15.0
    w.c.timer()
    assert w.state == "STREAM"
    assert w.c.deadline > w.env.clock


@pytest.mark.parametrize("request_bytes", [GET_STREAM, call_2026()], ids=["http", "mcp"])
def test_a_stream_silent_for_stream_idle_timeout_is_cut_and_recorded_504(
    request_bytes: bytes,
) -> None:
    w = streaming(request_bytes, upstream={"stream_idle_timeout": 30})
    w.answer(chunk(b"data: 1\n\n"))
    # Keep-alive comments (mcp) are the proxy's, not the backend's: silence is silence.
    w.advance(29.0)
    assert w.state == "STREAM"
    w.advance(1.0)
    assert w.state == "CLOSED" and not w.t.client_shut
    assert not client_answer(w.t.take_client(), b"POST").complete
    [x] = w.accounted
    assert (x.status, x.error) == (504, "event stream idle longer than stream_idle_timeout")
    assert w.env.kinds["sse"] == 0


def test_a_drain_ends_the_stream_with_a_retry_hint_at_an_event_boundary(bytewise: bool) -> None:
    w = streaming(call_2026(), bytewise=bytewise)
    w.answer(chunk(b"data: 1\n"), byte_at_a_time=bytewise)
    w.env.draining = True
    w.c.drain()
    assert w.state == "STREAM" and received(w) == b"data: 1\n"
    w.answer(chunk(b"\n"), byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client(), b"POST")
    assert (answer.body, answer.complete) == (b"data: 1\n\nretry: 1000\n\n", True)
    assert answer.header(b"connection") is None  # the stream's head went out before
    assert w.state == "LINGER"
    assert w.t.up.finished == {"reusable": False, "ok": None, "failure": None}
    [x] = w.accounted
    assert (x.status, x.error) == (200, "stream ended by drain")


def test_a_stream_the_proxy_cannot_add_to_waits_for_the_drain_deadline() -> None:
    # An HTTP/1.0 client reads the stream until the connection closes: nothing can be
    # appended after the end of an event, so the stream runs until the drain deadline.
    w = streaming(GET_STREAM.replace(b"HTTP/1.1", b"HTTP/1.0"))
    w.answer(chunk(b"data: 1\n\n"))
    w.env.draining = True
    w.c.drain()
    w.answer(chunk(b"data: 2\n\n"))
    assert w.state == "STREAM"
    w.c.abandon()
    assert w.state == "CLOSED"
    [x] = w.accounted
    assert (x.status, x.error) == (200, "closed at the drain deadline")
    assert w.env.kinds == {"http": 0, "sse": 0, "websocket": 0}


def test_a_2026_client_leaving_its_stream_cancels_the_request_upstream(bytewise: bool) -> None:
    w = streaming(call_2026(), bytewise=bytewise)
    w.answer(chunk(b"data: progress\n\n"), byte_at_a_time=bytewise)
    w.c.client_closed()
    assert w.state == "CLOSED"
    assert w.t.up.finished == {"reusable": False, "ok": None, "failure": None}
    [x] = w.accounted
    assert (x.status, x.error) == (200, "client closed the stream (cancels the request upstream)")


def test_a_2025_client_leaving_a_post_stream_lets_the_request_finish_upstream(
    bytewise: bool,
) -> None:
    w = World(routes_config())
    w.feed(call_2025(token(w)), byte_at_a_time=bytewise)
    w.answer(SSE_HEAD + chunk(b"data: progress\n\n"), byte_at_a_time=bytewise)
    w.c.client_closed()
    sent = bytes(w.t.client_out)
    assert w.state == "STREAM" and not w.t.up.finished
    w.answer(chunk(RESULT_7) + b"0\r\n\r\n", byte_at_a_time=bytewise)
    # Read and dropped: nothing more goes to the client that left.
    assert w.t.client_out == sent
    assert w.state == "CLOSED"
    assert w.t.up.finished == {"reusable": True, "ok": True, "failure": None}
    [x] = w.accounted
    assert x.error == "client closed the stream (request left to finish upstream)"


def test_a_2025_post_stream_finishes_upstream_however_its_client_left() -> None:
    # A client that closes with unread bytes in its buffer resets instead of closing:
    # its leaving is no cancellation either, and the backend must not see a disconnect.
    w = World(routes_config())
    w.feed(call_2025(token(w)))
    w.answer(SSE_HEAD + chunk(b"data: progress\n\n"))
    w.c.client_closed(reset=True)
    assert w.t.up.finished is None
    w.answer(chunk(RESULT_7) + b"0\r\n\r\n")
    assert w.state == "CLOSED"
    assert w.t.up.finished == {"reusable": True, "ok": True, "failure": None}


def test_a_request_left_to_finish_upstream_gets_the_response_timeout() -> None:
    w = World(routes_config())
    w.feed(call_2025(token(w)))
    w.answer(SSE_HEAD)
    w.c.client_closed()
    timeout = w.env.config.upstream.mcp_response_timeout
    w.advance(timeout - 0.01)
    assert w.state == "STREAM"
    w.advance(0.01)
    assert w.state == "CLOSED"
    assert w.t.up.finished == {"reusable": False, "ok": None, "failure": None}
    assert len(w.accounted) == 1


def test_a_client_leaving_after_its_response_went_by_is_no_error(bytewise: bool) -> None:
    w = streaming(call_2026(7), bytewise=bytewise)
    w.answer(chunk(b"data: progress\n\n" + RESULT_7), byte_at_a_time=bytewise)
    w.c.client_closed()
    w.answer(b"0\r\n\r\n", byte_at_a_time=bytewise)
    assert w.state == "CLOSED"
    assert w.t.up.finished == {"reusable": True, "ok": True, "failure": None}
    [x] = w.accounted
    assert (x.status, x.error) == (200, None)


def test_the_backend_gets_a_short_grace_to_end_a_stream_whose_client_is_done() -> None:
    w = streaming(call_2026(7))
    w.answer(chunk(RESULT_7))
    w.c.client_closed()
    w.advance(5.0)
    assert w.state == "CLOSED"
    [x] = w.accounted
    assert (x.status, x.error) == (200, None)


def test_a_client_leaving_a_plain_stream_ends_it() -> None:
    for reset in (False, True):
        w = streaming(GET_STREAM)
        w.c.client_closed(reset=reset)
        assert w.state == "CLOSED"
        assert w.t.up.finished == {"reusable": False, "ok": None, "failure": None}
        assert w.accounted[0].status == 200 and w.accounted[0].error is not None
        assert w.env.kinds["sse"] == 0


def test_a_backend_cutting_a_stream_short_cuts_the_client() -> None:
    for reset in (False, True):
        w = streaming(GET_STREAM)
        w.answer(chunk(b"data: 1\n\n"))
        w.c.upstream_closed(reset=reset)
        assert w.state == "CLOSED" and not w.t.client_shut
        assert not client_answer(w.t.take_client()).complete
        assert w.accounted[0].status == 502


def test_a_legacy_endpoint_event_is_rewritten_with_a_session_token(bytewise: bool) -> None:
    w = World(routes_config())
    w.feed(LEGACY_OPEN, byte_at_a_time=bytewise)
    w.answer(SSE_HEAD, byte_at_a_time=bytewise)
    event = b"event: endpoint\ndata: /mcp/messages?sessionId=backend-abc\n\n"
    w.answer(chunk(event), byte_at_a_time=bytewise)
    body = received(w)
    assert body.startswith(b"event: endpoint\ndata: /mcp/messages?sessionId=v1.")
    assert b"backend-abc" not in body
    issued = body.split(b"sessionId=", 1)[1].split(b"\n", 1)[0].decode()
    claims = w.env.tokens.verify(issued)
    assert claims.backend_session == "backend-abc"
    w.answer(chunk(b"event: message\ndata: x\n\n"), byte_at_a_time=bytewise)
    assert received(w).endswith(b"event: message\ndata: x\n\n")


def test_a_client_not_reading_a_stream_pauses_the_backend() -> None:
    w = streaming(call_2026())
    w.c.client_backlog(True)
    w.c.client_backlog(False)
    w.c.client_backlog(True)
    assert w.t.up.pauses == [True, False, True]
    w.advance(w.env.config.limits.send_timeout)
    assert w.state == "CLOSED"
    assert w.accounted[0].error == "client stopped reading (send_timeout)"


def test_a_silent_plain_stream_has_nothing_due() -> None:
    # Parked: no keep-alive, no idle limit configured, so no timer either.
    w = streaming(GET_STREAM)
    w.answer(chunk(b"data: 1\n\n"))
    assert w.c.deadline == float("inf")
