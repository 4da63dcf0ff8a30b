"""BODY, and the upload that goes on in UPSTREAM/RESPONSE once a body streams: bodies
are checked before a backend is contacted; small Content-Length bodies and MCP messages
are held whole and go up with their head."""

from __future__ import annotations

import json

import pytest

from tests.support.machine import World
from tests.support.machine_traffic import mcp_post, ok, routes_config
from tests.support.wire import backend_request, backend_requests, client_answer, client_answers

pytestmark = pytest.mark.usefixtures("both_ways")

HEAD = b"POST /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: %d\r\n\r\n"
CHUNKED = b"POST /x HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n"
LARGE = 200_000
"""More than is held before the backend is contacted: such a body streams up."""


def post(body: bytes) -> bytes:
    return HEAD % len(body) + body


def test_a_small_body_goes_up_with_its_head(bytewise: bool) -> None:
    w = World(routes_config())
    w.feed(post(b"hello world"), byte_at_a_time=bytewise)
    sent = backend_request(w.t.up.sent)
    assert (sent.body, sent.complete) == (b"hello world", True)
    w.answer(ok(), byte_at_a_time=bytewise)
    [x] = w.accounted
    assert (x.status, x.bytes_in) == (200, 11)


def test_a_body_arriving_after_its_head_is_held_until_complete() -> None:
    w = World(routes_config())
    w.feed(HEAD % 11 + b"hello")
    assert w.state == "BODY" and w.t.upstreams == []
    w.feed(b" world")
    assert w.state == "UPSTREAM"
    # One write: head and body together, so that a retry could send them again.
    assert backend_request(w.t.up.sent).body == b"hello world"


def test_a_chunked_body_is_reframed_without_extensions_or_trailers(bytewise: bool) -> None:
    w = World(routes_config())
    body = b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
    w.feed(CHUNKED + body, byte_at_a_time=bytewise)
    sent = backend_request(w.t.up.sent)
    assert (sent.body, sent.complete) == (b"hello world", True)
    assert b"name=value" not in w.t.up.sent and b"X-Trailer" not in w.t.up.sent
    w.answer(ok(), byte_at_a_time=bytewise)
    assert w.accounted[0].bytes_in == 11
    assert w.state == "IDLE"


def test_malformed_chunked_framing_gets_400_before_any_backend_is_contacted(
    bytewise: bool,
) -> None:
    for body in (
        b"10000000000000000\r\nx\r\n0\r\n\r\n",  # a size of 2^64
        b"5\nhello\r\n0\r\n\r\n",  # a bare LF
        b"5 junk\r\nhello\r\n0\r\n\r\n",  # not an extension
        b"3\r\nhello\r\n0\r\n\r\n",  # data longer than its size
    ):
        w = World(routes_config())
        w.feed(CHUNKED + body, byte_at_a_time=bytewise)
        assert client_answer(w.t.take_client()).status == 400, body
        assert w.t.upstreams == [], body
        assert w.state == "LINGER"


def test_a_body_not_complete_in_time_gets_408(bytewise: bool) -> None:
    for start in (HEAD % 11 + b"hello", CHUNKED + b"5\r\nhel"):
        w = World(routes_config())
        w.feed(start, byte_at_a_time=bytewise)
        timeout = w.env.config.limits.body_timeout
        w.advance(timeout - 0.01)
        assert w.t.client_out == b""
        w.advance(0.01)
        answer = client_answer(w.t.take_client())
        assert (answer.status, answer.header(b"connection")) == (408, b"close")
        assert w.accounted[0].error == "timed out reading request body"


def test_a_declared_body_over_max_body_bytes_gets_413_at_once(bytewise: bool) -> None:
    w = World(routes_config(limits={"max_body_bytes": 10}))
    w.feed(HEAD % 11, byte_at_a_time=bytewise)
    assert client_answer(w.t.take_client()).status == 413
    assert w.t.upstreams == []


def test_a_chunked_body_growing_over_max_body_bytes_gets_413(bytewise: bool) -> None:
    w = World(routes_config(limits={"max_body_bytes": 10}))
    w.feed(CHUNKED + b"5\r\nhello\r\n6\r\nworld!\r\n0\r\n\r\n", byte_at_a_time=bytewise)
    assert client_answer(w.t.take_client()).status == 413
    assert w.accounted[0].status == 413
    for up in w.t.upstreams:
        assert up.finished is not None and not up.finished["reusable"]


def test_an_mcp_message_is_read_whole_before_it_is_routed(bytewise: bool) -> None:
    filler = b"x" * LARGE
    body = b'{"jsonrpc":"2.0","id":3,"method":"ping","params":{"pad":"%s"}}' % filler
    request = mcp_post(body)
    w = World(routes_config())
    w.feed(request[:-1], byte_at_a_time=bytewise)
    assert w.state == "BODY" and w.t.upstreams == []
    w.feed(request[-1:])
    assert backend_request(w.t.up.sent).body == body


def test_an_mcp_body_that_is_not_json_rpc_is_refused_once_read(bytewise: bool) -> None:
    w = World(routes_config())
    w.feed(mcp_post(b'{"jsonrpc":"2.0","id":'), byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client(), b"POST")
    assert answer.status == 400
    assert json.loads(answer.body)["error"]["code"] == -32700
    assert w.t.upstreams == [] and w.state == "LINGER"


def test_a_large_body_streams_up_as_it_comes(bytewise: bool) -> None:
    body = bytes(range(256)) * (LARGE // 256)
    w = World(routes_config())
    w.feed(HEAD % len(body) + body[:1000])
    assert w.state == "UPSTREAM" and w.t.upstreams
    w.feed(body[1000:2000], byte_at_a_time=bytewise)
    w.feed(body[2000:])
    assert backend_request(w.t.up.sent).body == body
    w.answer(ok(), byte_at_a_time=bytewise)
    assert (w.accounted[0].status, w.accounted[0].bytes_in) == (200, len(body))
    assert w.state == "IDLE"


def test_a_stalled_upload_gets_408_and_the_backend_connection_is_dropped() -> None:
    w = World(routes_config())
    w.feed(HEAD % LARGE + b"a" * 1000)
    w.advance(w.env.config.limits.body_timeout)
    assert client_answer(w.t.take_client()).status == 408
    assert w.t.up.finished is not None and not w.t.up.finished["reusable"]


def test_an_upload_slower_than_response_timeout_but_never_stalled_is_not_cut() -> None:
    # The backend cannot answer before it has the request: the wait for its response
    # head starts when the upload ends, as long as the client keeps sending.
    w = World(routes_config())
    w.feed(HEAD % LARGE + b"a" * 1000)
    sent = 1000
    while sent < LARGE:
        w.advance(10.0)
        w.feed(b"a" * 1000)
        sent += 1000
    w.answer(ok())
    assert client_answer(w.t.take_client()).status == 200


def test_upstream_backpressure_pauses_reading_the_client_while_uploading() -> None:
    w = World(routes_config())
    w.feed(HEAD % LARGE + b"a" * 1000)
    w.c.upstream_backlog(True)
    w.c.upstream_backlog(False)
    assert w.t.client_pauses == [True, False]


def test_a_backend_answering_before_the_upload_ends_ends_both_connections(
    bytewise: bool,
) -> None:
    w = World(routes_config())
    w.feed(HEAD % LARGE + b"a" * 1000)
    w.answer(ok(b"too big", status=b"413 Payload Too Large"), byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client())
    assert (answer.status, answer.body) == (413, b"too big")
    # The rest of the body is not read: the connections cannot be used again.
    assert w.state == "LINGER"
    assert w.t.up.finished == {"reusable": False, "ok": True, "failure": None}


def test_an_upload_stalling_after_the_answer_began_is_cut_and_recorded() -> None:
    w = World(routes_config())
    w.feed(HEAD % LARGE + b"a" * 1000)
    w.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
    w.advance(w.env.config.limits.body_timeout)
    assert w.state == "CLOSED"
    [x] = w.accounted
    assert (x.status, x.error) == (200, "timed out reading request body")


def test_a_client_closing_inside_its_body_is_recorded_as_400() -> None:
    for start in (HEAD % 11 + b"hello", HEAD % LARGE + b"a" * 1000):
        w = World(routes_config())
        w.feed(start)
        w.c.client_closed()
        assert w.state == "CLOSED" and w.t.client_out == b""
        [x] = w.accounted
        assert (x.status, x.error) == (400, "client closed the connection inside the request body")
        for up in w.t.upstreams:
            assert up.finished is not None and not up.finished["reusable"]


def test_expect_100_continue_on_an_http_route_waits_for_the_backend(bytewise: bool) -> None:
    w = World(routes_config())
    head = (
        b"POST /x HTTP/1.1\r\nHost: a.example\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    )
    w.feed(head, byte_at_a_time=bytewise)
    # The head goes alone: the backend decides whether it wants the body.
    sent = backend_request(w.t.up.sent)
    assert (sent.header(b"expect"), sent.body, sent.complete) == (b"100-continue", b"", False)
    assert w.t.client_out == b""
    w.answer(b"HTTP/1.1 100 Continue\r\n\r\n", byte_at_a_time=bytewise)
    assert w.t.client_out == b"HTTP/1.1 100 Continue\r\n\r\n"
    w.feed(b"hello", byte_at_a_time=bytewise)
    assert backend_request(w.t.up.sent).body == b"hello"
    w.answer(ok(b"done"), byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client(), b"POST")
    assert (answer.informational, answer.status, answer.body) == ([100], 200, b"done")
    assert w.state == "IDLE"


def test_expect_100_continue_on_an_mcp_route_is_answered_by_the_proxy(bytewise: bool) -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
    request = mcp_post(body, b"Expect: 100-continue")
    head, _, _ = request.partition(b"\r\n\r\n")
    w = World(routes_config())
    w.feed(head + b"\r\n\r\n", byte_at_a_time=bytewise)
    # The proxy routes an MCP message on its content, so it asks for the body itself.
    assert w.t.take_client() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert w.state == "BODY" and w.t.upstreams == []
    w.feed(body, byte_at_a_time=bytewise)
    sent = backend_request(w.t.up.sent)
    assert sent.body == body
    w.answer(ok(b'{"jsonrpc":"2.0","id":1,"result":{}}', b"Content-Type: application/json"))
    assert json.loads(client_answer(w.t.take_client(), b"POST").body)["id"] == 1


def test_a_request_pipelined_after_a_body_is_served_next(bytewise: bool) -> None:
    second = b"GET /next HTTP/1.1\r\nHost: a.example\r\n\r\n"
    for first in (post(b"hello"), CHUNKED + b"5\r\nhello\r\n0\r\n\r\n"):
        w = World(routes_config())
        w.feed(first + second, byte_at_a_time=bytewise)
        assert backend_request(w.t.up.sent).body == b"hello"
        w.answer(ok(b"1"), byte_at_a_time=bytewise)
        assert [r.target for r in backend_requests(w.t.up.sent)] == [b"/next"]
        w.answer(ok(b"2"), byte_at_a_time=bytewise)
        answers = client_answers(w.t.take_client(), (b"POST", b"GET"))
        assert [a.body for a in answers] == [b"1", b"2"]
