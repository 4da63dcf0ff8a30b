"""RESPONSE: relaying a response body in the framing the client can read, and ending
the exchange honestly: an answer cut short is never made to look complete."""

from __future__ import annotations

import pytest

from tests.support.machine import World
from tests.support.machine_traffic import ok, routes_config
from tests.support.wire import client_answer, client_answers

pytestmark = pytest.mark.usefixtures("both_ways")

GET = b"GET /one HTTP/1.1\r\nHost: a.example\r\n\r\n"
GET_10 = b"GET /one HTTP/1.0\r\nHost: a.example\r\n\r\n"
PARTIAL = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"


def world(request: bytes = GET, *, bytewise: bool = False) -> World:
    w = World(routes_config())
    w.feed(request, byte_at_a_time=bytewise)
    assert w.state == "UPSTREAM"
    return w


def test_a_content_length_body_is_relayed_as_it_comes(bytewise: bool) -> None:
    w = world(bytewise=bytewise)
    w.answer(PARTIAL, byte_at_a_time=bytewise)
    assert w.state == "RESPONSE"
    w.answer(b"defghij", byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client())
    assert (answer.status, answer.body, answer.complete) == (200, b"abcdefghij", True)
    assert w.state == "IDLE"
    assert w.t.up.finished == {"reusable": True, "ok": True, "failure": None}
    [x] = w.accounted
    assert (x.status, x.bytes_out, x.error) == (200, 10, None)


def test_a_chunked_body_is_relayed_and_ended(bytewise: bool) -> None:
    w = world(bytewise=bytewise)
    w.answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        byte_at_a_time=bytewise,
    )
    assert w.state == "RESPONSE"
    w.answer(b"2;x=y\r\nde\r\n0\r\nX-T: 1\r\n\r\n", byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client())
    assert (answer.body, answer.complete) == (b"abcde", True)
    assert w.state == "IDLE" and w.t.up.finished is not None and w.t.up.finished["reusable"]


def test_a_close_delimited_body_is_rechunked_for_an_http_11_client(bytewise: bool) -> None:
    w = world(bytewise=bytewise)
    w.answer(b"HTTP/1.1 200 OK\r\n\r\nabc", byte_at_a_time=bytewise)
    w.answer(b"def", byte_at_a_time=bytewise)
    w.c.upstream_closed()
    answer = client_answer(w.t.take_client())
    assert (answer.header(b"transfer-encoding"), answer.body) == (b"chunked", b"abcdef")
    assert answer.complete
    # The client connection goes on; the backend's cannot.
    assert w.state == "IDLE"
    assert w.t.up.finished == {"reusable": False, "ok": True, "failure": None}


def test_a_close_delimited_body_is_passed_until_close_to_an_http_10_client(
    bytewise: bool,
) -> None:
    w = world(GET_10, bytewise=bytewise)
    w.answer(b"HTTP/1.1 200 OK\r\n\r\nabc", byte_at_a_time=bytewise)
    w.c.upstream_closed()
    data = w.t.take_client()
    assert data.endswith(b"\r\n\r\nabc")
    answer = client_answer(data, eof=True)
    assert (answer.body, answer.header(b"connection"), answer.complete) == (b"abc", b"close", True)
    assert answer.header(b"transfer-encoding") is None
    assert w.state == "LINGER" and w.t.client_shut


def test_answers_without_a_body(bytewise: bool) -> None:
    cases = (
        (GET, b"HTTP/1.1 204 No Content\r\n\r\n", True),
        (GET, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", True),
        # llhttp cannot be told that a HEAD answer has no body: the connection is not
        # given back for reuse.
        (GET.replace(b"GET", b"HEAD"), b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", False),
    )
    for request, response, reusable in cases:
        w = world(request, bytewise=bytewise)
        w.answer(response, byte_at_a_time=bytewise)
        method = request.split(b" ", 1)[0]
        answer = client_answer(w.t.take_client(), method)
        assert (answer.body, answer.complete) == (b"", True)
        assert w.state == "IDLE"
        assert w.t.up.finished == {"reusable": reusable, "ok": True, "failure": None}


def test_informational_answers_before_the_final_one_reach_the_client(bytewise: bool) -> None:
    # RFC 9110 §15.2: a proxy forwards 1xx responses it did not ask for itself.
    w = world(bytewise=bytewise)
    w.answer(
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" + ok(b"ok"),
        byte_at_a_time=bytewise,
    )
    answer = client_answer(w.t.take_client())
    assert (answer.informational, answer.status, answer.body) == ([103], 200, b"ok")
    assert w.state == "IDLE"


def test_no_informational_answer_goes_to_an_http_10_client(bytewise: bool) -> None:
    w = world(GET_10, bytewise=bytewise)
    w.answer(b"HTTP/1.1 103 Early Hints\r\n\r\n" + ok(b"ok"), byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client())
    assert (answer.informational, answer.status) == ([], 200)


def test_hop_by_hop_headers_are_removed_and_via_added(bytewise: bool) -> None:
    w = world(bytewise=bytewise)
    w.answer(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-A: 1\r\n"
        b"Via: 1.0 other\r\nContent-Length: 2\r\n\r\nok",
        byte_at_a_time=bytewise,
    )
    answer = client_answer(w.t.take_client())
    names = [name for name, _ in answer.headers]
    assert b"keep-alive" not in names and b"connection" not in names
    assert answer.header(b"x-a") == b"1"
    assert answer.header(b"via") == b"1.0 other, 1.1 switchboard"


def test_a_complete_answer_followed_by_stray_bytes_still_reaches_the_client(
    bytewise: bool,
) -> None:
    # Whatever the backend sends after its answer ends, the answer itself was whole;
    # only its connection cannot be trusted again.
    w = world()
    w.answer(ok(b"whole") + b"stray", byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client())
    assert (answer.status, answer.body, answer.complete) == (200, b"whole", True)
    assert w.accounted[0].status == 200


def test_a_backend_going_silent_mid_body_cuts_the_client_and_records_504(
    bytewise: bool,
) -> None:
    w = world(bytewise=bytewise)
    w.answer(PARTIAL, byte_at_a_time=bytewise)
    read_timeout = w.env.config.upstream.read_timeout
    w.advance(read_timeout - 0.01)
    assert w.state == "RESPONSE"
    w.advance(0.01)
    # No clean end: the client sees a connection cut inside the body.
    assert w.state == "CLOSED" and w.t.client_closed and not w.t.client_shut
    assert not client_answer(w.t.take_client()).complete
    assert w.t.up.finished == {"reusable": False, "ok": False, "failure": "timeout"}
    [x] = w.accounted
    assert (x.status, x.error) == (504, "backend went silent mid-response")


def test_each_body_read_restarts_the_read_timeout() -> None:
    w = world()
    w.answer(PARTIAL)
    read_timeout = w.env.config.upstream.read_timeout
    w.advance(read_timeout - 1)
    w.answer(b"d")
    w.advance(read_timeout - 1)
    assert w.state == "RESPONSE"


def test_a_backend_closing_or_resetting_mid_body_cuts_the_client_and_records_502(
    bytewise: bool,
) -> None:
    for reset in (False, True):
        for response in (
            PARTIAL,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        ):
            w = world(bytewise=bytewise)
            w.answer(response, byte_at_a_time=bytewise)
            w.c.upstream_closed(reset=reset)
            assert w.state == "CLOSED" and not w.t.client_shut
            assert not client_answer(w.t.take_client()).complete
            assert w.t.up.finished == {"reusable": False, "ok": False, "failure": "error"}
            [x] = w.accounted
            assert x.status == 502 and x.error is not None


def test_invalid_bytes_mid_body_cut_the_client_and_record_502(bytewise: bool) -> None:
    w = world(bytewise=bytewise)
    w.answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        byte_at_a_time=bytewise,
    )
    w.answer(b"zz\r\n", byte_at_a_time=bytewise)
    assert w.state == "CLOSED"
    assert w.accounted[0].status == 502


def test_a_client_resetting_mid_response_keeps_the_status_and_records_why() -> None:
    w = world()
    w.answer(PARTIAL)
    w.c.client_closed(reset=True)
    assert w.state == "CLOSED"
    assert w.t.up.finished == {"reusable": False, "ok": None, "failure": None}
    [x] = w.accounted
    assert (x.status, x.error) == (200, "client reset the connection")


def test_a_client_half_closing_mid_response_still_gets_the_rest() -> None:
    w = world()
    w.answer(PARTIAL)
    w.c.client_closed()
    w.answer(b"defghij")
    assert client_answer(w.t.take_client()).complete
    assert w.state == "CLOSED"
    assert w.accounted[0].error is None


def test_requests_pipelined_during_a_response_are_answered_after_it(bytewise: bool) -> None:
    w = world()
    w.answer(PARTIAL)
    w.feed(GET + GET.replace(b"/one", b"/one/2"), byte_at_a_time=bytewise)
    assert w.state == "RESPONSE" and len(w.t.upstreams) == 1
    w.answer(b"defghij")
    w.answer(ok(b"second"), byte_at_a_time=bytewise)
    w.answer(ok(b"third"), byte_at_a_time=bytewise)
    bodies = [a.body for a in client_answers(w.t.take_client(), (b"GET",) * 3)]
    assert bodies == [b"abcdefghij", b"second", b"third"]
    assert [x.target for x in w.accounted] == [b"/one", b"/one", b"/one/2"]
    assert w.state == "IDLE"


def test_a_client_asking_to_close_is_answered_then_closed_with_linger(bytewise: bool) -> None:
    for request in (GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"), GET_10):
        w = world(request, bytewise=bytewise)
        w.answer(ok(b"bye"), byte_at_a_time=bytewise)
        answer = client_answer(w.t.take_client())
        assert (answer.body, answer.header(b"connection")) == (b"bye", b"close")
        assert w.state == "LINGER" and w.t.client_shut and not w.t.client_closed
        # The backend connection is not the client's to end.
        assert w.t.up.finished == {"reusable": True, "ok": True, "failure": None}


def test_a_backend_asking_to_close_leaves_the_client_connection_open(bytewise: bool) -> None:
    w = world(bytewise=bytewise)
    w.answer(ok(b"x", b"Connection: close"), byte_at_a_time=bytewise)
    assert client_answer(w.t.take_client()).header(b"connection") is None
    assert w.state == "IDLE"
    assert w.t.up.finished == {"reusable": False, "ok": True, "failure": None}


def test_a_client_not_reading_pauses_the_backend_then_is_cut_at_send_timeout() -> None:
    w = world()
    w.answer(PARTIAL)
    w.c.client_backlog(True)
    send_timeout = w.env.config.limits.send_timeout
    assert w.c.deadline == w.env.clock + send_timeout
    w.c.client_backlog(False)
    w.c.client_backlog(True)
    assert w.t.up.pauses == [True, False, True]
    w.advance(send_timeout)
    assert w.state == "CLOSED"
    [x] = w.accounted
    assert (x.status, x.error) == (200, "client stopped reading (send_timeout)")


def test_a_client_still_not_reading_holds_back_the_next_pipelined_answer() -> None:
    w = world(GET + GET)
    w.answer(PARTIAL)
    w.c.client_backlog(True)
    w.answer(b"defghij")  # the last read of the first answer, already on its way
    assert w.state == "UPSTREAM"
    w.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    # The client's buffer is still full: the next backend is not read meanwhile.
    assert w.t.up.paused


def test_disposition_says_whether_both_connections_go_on() -> None:
    w = world()
    w.answer(PARTIAL)
    # Mid-response: the backend's answer is not over, so its connection cannot be reused.
    assert w.c.disposition() == (False, True)
    w = world(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    w.answer(PARTIAL)
    assert w.c.disposition() == (False, False)
    w = World(routes_config())
    w.feed(b"POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 200000\r\n\r\nabc")
    w.answer(PARTIAL)
    # The request was not read whole: neither connection is in a known state.
    assert w.c.disposition() == (False, False)
