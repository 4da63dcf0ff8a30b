"""UPSTREAM: the request is on its way to a backend and the machine waits for the
response head: connecting, the response timeout, a backend that fails before answering
(retried once where the request cannot run twice), and a client leaving meanwhile."""

from __future__ import annotations

import json

import pytest

from proxy.protocol.exchange import Exchange
from tests.support.machine import World
from tests.support.machine_traffic import call_2025, call_2026, mcp_post, ok, routes_config
from tests.support.wire import backend_request, client_answer

pytestmark = pytest.mark.usefixtures("both_ways")

GET = b"GET /x HTTP/1.1\r\nHost: a.example\r\n\r\n"
ONE = b"GET /one HTTP/1.1\r\nHost: a.example\r\n\r\n"
JSON_RESULT = ok(b'{"jsonrpc":"2.0","id":7,"result":{}}', b"Content-Type: application/json")


def outcome(x: Exchange) -> tuple[int, str | None]:
    return x.status, x.error


def session_token(w: World) -> str:
    route = w.env.routes.match("/mcp")
    assert route is not None
    return w.env.tokens.issue(route.backends[0].replica, "backend-session-1")


def kept_alive(w: World, request: bytes) -> None:
    """Serve one request on /one so that its backend connection is pooled, and send
    ``request`` on it."""
    w.feed(ONE)
    w.answer(ok())
    w.t.take_client()
    w.t.repool(w.t.up)
    w.feed(request)
    assert w.t.up.reused


def test_a_pending_connect_has_connect_timeout_then_response_timeout(bytewise: bool) -> None:
    w = World(routes_config())
    w.t.connect_now = False
    w.feed(GET, byte_at_a_time=bytewise)
    upstream = w.env.config.upstream
    assert (w.state, w.c.deadline) == ("UPSTREAM", w.env.clock + upstream.connect_timeout)
    w.advance(1.0)
    w.c.upstream_connected()
    assert w.c.deadline == w.env.clock + upstream.response_timeout
    w.answer(ok(), byte_at_a_time=bytewise)
    assert client_answer(w.t.take_client()).status == 200


def test_a_connect_that_does_not_complete_in_time_gets_502(bytewise: bool) -> None:
    w = World(routes_config())
    w.t.connect_now = False
    w.feed(GET, byte_at_a_time=bytewise)
    w.advance(w.env.config.upstream.connect_timeout)
    assert client_answer(w.t.take_client()).status == 502
    assert w.t.up.finished == {"reusable": False, "ok": False, "failure": "connect"}
    assert outcome(w.accounted[0]) == (502, "timed out connecting to backend")
    assert w.state == "LINGER"


def test_waiting_for_a_backend_slot_past_connect_timeout_gets_503_and_no_verdict(
    bytewise: bool,
) -> None:
    # max_connections_per_backend is the proxy's own limit: the backend did not fail.
    w = World(routes_config())
    w.t.connect_now = False
    w.t.queue_next = True
    w.feed(GET, byte_at_a_time=bytewise)
    w.advance(w.env.config.upstream.connect_timeout)
    answer = client_answer(w.t.take_client())
    assert answer.status == 503 and answer.header(b"retry-after") is not None
    assert w.t.up.finished == {"reusable": False, "ok": None, "failure": None}
    assert w.accounted[0].status == 503


def test_the_proxys_own_errors_on_an_mcp_route_are_json_rpc(bytewise: bool) -> None:
    w = World(routes_config())
    w.feed(call_2026(request_id=41), byte_at_a_time=bytewise)
    route = w.env.routes.match("/mcp")
    assert route is not None
    w.advance(route.response_timeout)
    answer = client_answer(w.t.take_client())
    assert answer.status == 504
    assert answer.header(b"content-type") == b"application/json"
    assert json.loads(answer.body) == {
        "jsonrpc": "2.0",
        "id": 41,
        "error": {"code": -32603, "message": "backend response timeout"},
    }


def test_the_response_timeout_is_the_routes_own_and_ends_in_504(bytewise: bool) -> None:
    w = World(routes_config())
    w.feed(GET.replace(b"/x", b"/slow"), byte_at_a_time=bytewise)
    assert w.c.deadline == w.env.clock + 7
    w.advance(6.99)
    assert w.t.client_out == b""
    w.advance(0.01)
    assert client_answer(w.t.take_client()).status == 504
    assert w.t.up.finished == {"reusable": False, "ok": False, "failure": "timeout"}
    assert outcome(w.accounted[0]) == (504, "backend response timeout")


def test_mcp_routes_wait_longer_for_a_response_head_by_default(bytewise: bool) -> None:
    w = World(routes_config())
    w.feed(call_2026(), byte_at_a_time=bytewise)
    mcp_timeout = w.env.config.upstream.mcp_response_timeout
    assert mcp_timeout >= 300
    w.advance(w.env.config.upstream.response_timeout)
    assert w.state == "UPSTREAM"
    w.advance(mcp_timeout - w.env.config.upstream.response_timeout)
    assert client_answer(w.t.take_client(), b"POST").status == 504


def test_a_refused_connect_is_retried_once_on_another_replica(bytewise: bool) -> None:
    w = World(routes_config())
    w.feed(GET, byte_at_a_time=bytewise)
    first = w.t.up
    w.c.upstream_closed(reset=True, before_write=True)
    assert first.finished == {"reusable": False, "ok": False, "failure": "connect"}
    second = w.t.up
    assert second is not first and second.backend != first.backend
    assert backend_request(second.sent).target == b"/x"
    w.answer(ok(), byte_at_a_time=bytewise)
    assert client_answer(w.t.take_client()).status == 200
    assert [x.status for x in w.accounted] == [200]


def test_a_refused_connect_is_retried_elsewhere_for_a_streamed_body_too() -> None:
    # No byte reached the refusing backend, however large the body.
    w = World(routes_config())
    w.t.connect_now = False
    w.feed(b"POST /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 200000\r\n\r\n" + b"a" * 1000)
    w.c.upstream_closed(reset=True, before_write=True)
    assert len(w.t.upstreams) == 2 and w.state == "UPSTREAM"
    assert w.t.up.sent.endswith(b"a" * 1000)


def test_a_second_refusal_is_not_retried_again() -> None:
    w = World(routes_config())
    w.feed(GET)
    w.c.upstream_closed(reset=True, before_write=True)
    w.c.upstream_closed(reset=True, before_write=True)
    assert len(w.t.upstreams) == 2
    assert client_answer(w.t.take_client()).status == 502
    assert outcome(w.accounted[0]) == (502, "cannot connect to backend")


def test_a_refusal_with_no_other_replica_gets_502() -> None:
    w = World(routes_config())
    w.feed(ONE)
    w.c.upstream_closed(reset=True, before_write=True)
    assert len(w.t.upstreams) == 1
    assert client_answer(w.t.take_client()).status == 502


def test_a_request_bound_to_its_sessions_replica_is_not_sent_elsewhere() -> None:
    w = World(routes_config())
    w.feed(call_2025(session_token(w)))
    w.c.upstream_closed(reset=True, before_write=True)
    assert len(w.t.upstreams) == 1
    assert client_answer(w.t.take_client(), b"POST").status == 502


def test_a_backend_failing_after_the_request_reached_it_is_not_retried() -> None:
    # It may have started on the request: sending it again could run it twice.
    for reset, reason in ((True, "reset"), (False, "closed")):
        w = World(routes_config())
        w.feed(GET)
        w.c.upstream_closed(reset=reset)
        assert len(w.t.upstreams) == 1
        assert client_answer(w.t.take_client()).status == 502
        assert w.t.up.finished == {"reusable": False, "ok": False, "failure": "error"}
        assert outcome(w.accounted[0]) == (502, f"backend {reason} the connection")


def test_a_pooled_connection_found_closed_is_retried_once_on_a_fresh_one(bytewise: bool) -> None:
    w = World(routes_config())
    kept_alive(w, ONE)
    pooled = w.t.up
    w.c.upstream_closed()
    # The backend closed an idle connection: no fault of its, no verdict on its health.
    assert pooled.finished == {"reusable": False, "ok": None, "failure": "error"}
    fresh = w.t.up
    assert fresh is not pooled and not fresh.reused
    assert backend_request(fresh.sent).target == b"/one"
    w.answer(ok(b"again"), byte_at_a_time=bytewise)
    assert client_answer(w.t.take_client()).body == b"again"
    # Once only: a fresh connection closing too is the backend's answer.
    kept_alive(w, ONE)
    w.c.upstream_closed()
    w.c.upstream_closed()
    assert client_answer(w.t.take_client()).status == 502


def test_a_post_whose_pooled_connection_closed_after_it_was_written_is_not_sent_again() -> None:
    # RFC 9110 §9.2.2: the backend may have run it (an MCP tools/call) before closing.
    w = World(routes_config())
    kept_alive(w, b"POST /one HTTP/1.1\r\nHost: a.example\r\nContent-Length: 2\r\n\r\nhi")
    pooled = w.t.up
    w.c.upstream_closed()
    assert client_answer(w.t.take_client()).status == 502
    assert w.t.up is pooled and pooled.sent.count(b"POST /one") == 1


def test_a_pooled_connection_reset_before_answering_is_retried_on_a_fresh_one() -> None:
    w = World(routes_config())
    kept_alive(w, ONE)
    w.c.upstream_closed(reset=True)
    assert w.state == "UPSTREAM" and not w.t.up.reused
    w.answer(ok())
    assert client_answer(w.t.take_client()).status == 200


def test_an_early_timer_call_changes_nothing() -> None:
    w = World(routes_config())
    w.feed(GET)
    before = (w.state, w.c.deadline)
    w.c.timer()
    assert (w.state, w.c.deadline) == before
    assert w.t.client_out == b"" and w.t.up.finished is None


def test_a_pooled_connection_broken_before_the_request_was_written_is_retried_fresh() -> None:
    # The usual stale keep-alive connection: the write fails because the backend
    # closed it while it sat in the pool. That says nothing about the backend's health
    # and a fresh connection to the same backend is the way on, whatever the replicas.
    w = World(routes_config())
    kept_alive(w, ONE)
    pooled = w.t.up
    w.c.upstream_closed(reset=True, before_write=True)
    assert pooled.finished is not None and pooled.finished["failure"] != "connect"
    assert w.state == "UPSTREAM" and not w.t.up.reused
    w.answer(ok())
    assert client_answer(w.t.take_client()).status == 200


def test_an_invalid_response_head_gets_502(bytewise: bool) -> None:
    w = World(routes_config())
    w.feed(GET)
    w.answer(b"HTTP/1.1 abc\r\n\r\n", byte_at_a_time=bytewise)
    assert client_answer(w.t.take_client()).status == 502
    assert w.t.up.finished == {"reusable": False, "ok": False, "failure": "error"}


def test_a_2026_client_closing_while_waiting_cancels_the_request_upstream(
    bytewise: bool,
) -> None:
    w = World(routes_config())
    w.feed(call_2026(), byte_at_a_time=bytewise)
    w.c.client_closed()
    # Closing the backend connection is how the cancellation reaches the backend.
    assert w.t.up.finished == {"reusable": False, "ok": None, "failure": None}
    assert w.state == "CLOSED" and w.t.client_out == b""
    assert outcome(w.accounted[0]) == (
        499,
        "client closed the connection (cancels the request upstream)",
    )


def test_a_half_closing_client_still_gets_its_answer_then_the_connection_ends(
    bytewise: bool,
) -> None:
    # 2025-11-25 and plain HTTP: a FIN may only be a half-close, and no cancellation.
    token = session_token(World(routes_config()))
    for request in (call_2025(token), GET):
        w = World(routes_config())
        w.feed(request, byte_at_a_time=bytewise)
        w.c.client_closed()
        assert w.state == "UPSTREAM" and not w.t.up.finished
        w.answer(JSON_RESULT, byte_at_a_time=bytewise)
        answer = client_answer(w.t.take_client())
        assert (answer.status, answer.header(b"connection")) == (200, b"close")
        assert w.state == "CLOSED"
        assert w.t.up.finished == {"reusable": True, "ok": True, "failure": None}
        assert outcome(w.accounted[0]) == (200, None)


def test_a_client_resetting_while_waiting_ends_the_exchange_as_499() -> None:
    w = World(routes_config())
    w.feed(GET)
    w.c.client_closed(reset=True)
    assert w.state == "CLOSED"
    assert w.t.up.finished == {"reusable": False, "ok": None, "failure": None}
    assert outcome(w.accounted[0]) == (499, "client reset the connection")


# -- choosing a backend --------------------------------------------------------------------

INITIALIZE = (
    b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25",'
    b'"capabilities":{},"clientInfo":{"name":"t","version":"1"}}}'
)


def test_an_mcp_session_becomes_a_token_that_leads_back_to_its_replica() -> None:
    w = World(routes_config())
    w.feed(mcp_post(INITIALIZE))
    replica = w.t.up.backend
    w.answer(ok(b'{"jsonrpc":"2.0","id":1,"result":{}}', b"Mcp-Session-Id: backend-sid-9"))
    token = client_answer(w.t.take_client(), b"POST").header(b"mcp-session-id")
    assert token is not None and b"backend-sid-9" not in token
    claims = w.env.tokens.verify(token.decode())
    assert (claims.replica, claims.backend_session) == (replica.replica, "backend-sid-9")
    # The route round-robins, yet the session's next request goes to its replica, with
    # the backend's own session id restored.
    for _ in range(2):
        w.feed(call_2025(token.decode()))
        assert w.t.up.backend == replica
        assert backend_request(w.t.up.sent).header(b"mcp-session-id") == b"backend-sid-9"
        w.answer(JSON_RESULT)


def test_a_session_whose_replica_is_gone_gets_404() -> None:
    w = World(routes_config())
    token = session_token(w)
    route = w.env.routes.match("/mcp")
    assert route is not None
    w.env.unusable.add(route.backends[0])
    w.feed(call_2025(token))
    answer = client_answer(w.t.take_client(), b"POST")
    assert answer.status == 404 and b"Session not found" in answer.body
    assert w.t.upstreams == []


def test_a_route_with_no_healthy_backend_gets_503_with_retry_after() -> None:
    w = World(routes_config())
    route = w.env.routes.match("/x")
    assert route is not None
    w.env.unusable.update(route.backends)
    w.feed(GET)
    answer = client_answer(w.t.take_client())
    assert (answer.status, answer.header(b"retry-after")) == (503, b"1")
    assert w.t.upstreams == [] and w.accounted[0].error == "no healthy backend for this route"


def test_an_mcp_request_from_a_foreign_origin_is_refused_before_any_backend() -> None:
    w = World(routes_config())
    w.feed(call_2026(3, b"echo", b"Origin: http://evil.example"))
    answer = client_answer(w.t.take_client(), b"POST")
    assert answer.status == 403
    assert json.loads(answer.body)["error"]["message"] == "Origin not allowed"
    assert w.t.upstreams == []
