"""ADMISSION: authentication, connection caps and rate limits, whose checks may wait for
Redis. The machine asks through ``Transport.admit`` and is answered by ``admitted``
with a rate ``Decision``, a cap ``Lease`` or the ``CapDecision`` that refused one."""

from __future__ import annotations

import json

import pytest

from proxy.auth import Identity
from proxy.protocol.exchange import Check
from proxy.ratelimit import RATE_LIMITED, Decision
from tests.support.machine import World, cap_refusal, lease
from tests.support.machine_traffic import call_2026, mcp_post, ok, routes_config
from tests.support.wire import backend_request, client_answer

pytestmark = pytest.mark.usefixtures("both_ways")

GET = b"GET /x HTTP/1.1\r\nHost: a.example\r\n\r\n"
PRIVATE = b"GET /private HTTP/1.1\r\nHost: a.example\r\nAuthorization: Bearer %s\r\n\r\n"
ALICE = Identity("key", "alice", tenant="acme")
ALLOWED = Decision(True, None)
DENIED = Decision(False, None, retry_after_us=2_000_000, status=429)


def world(**knobs: object) -> World:
    w = World(routes_config())
    w.env.identities[b"alice-key"] = ALICE
    w.env.identities[b"bob-key"] = Identity("key", "bob", tenant="globex")
    for name, value in knobs.items():
        setattr(w.env, name, value)
    return w


def kinds(w: World) -> list[tuple[int, object]]:
    return [(check.kind, check.arg) for check in w.t.checks]


def test_a_rate_check_is_asked_and_an_allowed_request_goes_on(bytewise: bool) -> None:
    w = world(rate_limited=True)
    w.feed(GET, byte_at_a_time=bytewise)
    assert w.state == "ADMISSION" and w.t.upstreams == []
    assert kinds(w) == [(Check.RATE, ("192.0.2.7", None, None))]
    w.c.admitted(ALLOWED)
    assert backend_request(w.t.up.sent).target == b"/x"
    w.answer(ok(), byte_at_a_time=bytewise)
    assert client_answer(w.t.take_client()).status == 200
    assert w.state == "IDLE"


def test_a_request_admitted_before_its_body_waits_for_it() -> None:
    w = world(rate_limited=True)
    w.feed(b"POST /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\n")
    w.c.admitted(ALLOWED)
    assert w.state == "BODY" and w.t.upstreams == []
    w.feed(b"hello")
    assert backend_request(w.t.up.sent).body == b"hello"


def test_a_body_that_filled_the_read_ahead_during_admission_is_read_on() -> None:
    w = world(rate_limited=True)
    size = 3 << 20
    w.feed(b"POST /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: %d\r\n\r\n" % size)
    w.feed(b"a" * ((1 << 20) + 10), byte_at_a_time=False)  # a volume, not a framing, test
    assert w.t.client_pauses == [True]  # read-ahead is bounded while the check waits
    w.c.admitted(ALLOWED)
    # What was read ahead went up: reading the client must resume, or the upload stalls.
    assert not w.t.client_paused


def test_a_request_over_its_rate_gets_429_with_retry_after(bytewise: bool) -> None:
    w = world(rate_limited=True)
    w.feed(GET, byte_at_a_time=bytewise)
    w.c.admitted(DENIED)
    answer = client_answer(w.t.take_client())
    assert (answer.status, answer.header(b"retry-after")) == (429, b"2")
    assert w.state == "LINGER" and w.t.upstreams == []
    [x] = w.accounted
    assert (x.status, x.refused, x.error) == (429, True, "rate limit exceeded")


def test_rate_limits_that_cannot_be_enforced_answer_503() -> None:
    w = world(rate_limited=True)
    w.feed(GET)
    w.c.admitted(Decision.unavailable())
    answer = client_answer(w.t.take_client())
    assert (answer.status, answer.header(b"retry-after")) == (503, b"1")
    assert w.accounted[0].error == "rate limits unavailable"


def test_an_ip_cap_lease_is_held_for_the_connection_and_released_at_its_end(
    bytewise: bool,
) -> None:
    w = world(ip_cap=5)
    w.feed(GET, byte_at_a_time=bytewise)
    assert kinds(w) == [(Check.CAP, ("ip:192.0.2.7", 5))]
    held = lease("ip:192.0.2.7")
    w.c.admitted(held)
    w.answer(ok(), byte_at_a_time=bytewise)
    # A kept-alive connection is counted once: the next request asks no new lease.
    w.feed(GET, byte_at_a_time=bytewise)
    assert len(w.t.checks) == 1
    w.answer(ok(), byte_at_a_time=bytewise)
    assert w.t.released == []
    w.advance(w.env.config.limits.keepalive_timeout)
    assert w.state == "CLOSED" and w.t.released == [held]


def test_a_connection_over_its_ip_cap_gets_429() -> None:
    w = world(ip_cap=5)
    w.feed(GET)
    w.c.admitted(cap_refusal("ip:192.0.2.7"))
    answer = client_answer(w.t.take_client())
    assert (answer.status, answer.header(b"retry-after")) == (429, b"1")
    assert w.accounted[0].error == "connection limit reached (ip)"
    assert w.t.upstreams == [] and w.t.released == []


def test_missing_credentials_get_401(bytewise: bool) -> None:
    w = world()
    w.feed(b"GET /private HTTP/1.1\r\nHost: a.example\r\n\r\n", byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client())
    assert answer.status == 401
    assert (answer.header(b"www-authenticate") or b"").startswith(b"Bearer")
    assert w.t.upstreams == [] and w.state == "LINGER"


def test_a_caller_of_another_tenant_gets_403(bytewise: bool) -> None:
    w = world()
    w.feed(PRIVATE % b"bob-key", byte_at_a_time=bytewise)
    assert client_answer(w.t.take_client()).status == 403
    assert w.t.upstreams == []


def test_an_authenticated_request_goes_on_without_its_credentials(bytewise: bool) -> None:
    w = world()
    w.feed(PRIVATE % b"alice-key", byte_at_a_time=bytewise)
    sent = backend_request(w.t.up.sent)
    assert sent.target == b"/private" and sent.header(b"authorization") is None
    w.answer(ok(), byte_at_a_time=bytewise)
    [x] = w.accounted
    assert (x.status, x.identity) == (200, ALICE)


def test_caps_then_rate_are_checked_in_order_and_a_tenant_once_per_connection() -> None:
    w = world(ip_cap=3, tenant_cap=4, rate_limited=True)
    w.feed(PRIVATE % b"alice-key")
    assert kinds(w) == [(Check.CAP, ("ip:192.0.2.7", 3))]
    ip_lease, tenant_lease = lease("ip:192.0.2.7"), lease("tenant:acme")
    w.c.admitted(ip_lease)
    assert kinds(w)[1:] == [(Check.CAP, ("tenant:acme", 4))]
    w.c.admitted(tenant_lease)
    assert kinds(w)[2:] == [(Check.RATE, ("192.0.2.7", ALICE, None))]
    w.c.admitted(ALLOWED)
    w.answer(ok())
    w.feed(PRIVATE % b"alice-key")
    assert [kind for kind, _ in kinds(w)[3:]] == [Check.RATE]
    w.c.admitted(ALLOWED)
    w.answer(ok())
    w.c.client_closed()
    assert w.t.released == [ip_lease, tenant_lease]


def test_a_tenant_over_its_cap_gets_429() -> None:
    w = world(tenant_cap=4)
    w.feed(PRIVATE % b"alice-key")
    w.c.admitted(cap_refusal("tenant:acme"))
    assert client_answer(w.t.take_client()).status == 429
    assert w.accounted[0].error == "connection limit reached (tenant)"


def test_failed_credentials_count_against_the_ip_rate_limit() -> None:
    # Guessing keys is rate-limited like anything else: 401 if allowed, 429 if not.
    for decision, status in ((ALLOWED, 401), (DENIED, 429)):
        w = world(rate_limited=True)
        w.feed(PRIVATE % b"wrong-key")
        assert kinds(w) == [(Check.RATE, ("192.0.2.7", None, None))]
        w.c.admitted(decision)
        assert client_answer(w.t.take_client()).status == status
        assert w.t.upstreams == []


def test_mcp_refusals_are_json_rpc_errors(bytewise: bool) -> None:
    w = world(rate_limited=True)
    w.feed(call_2026(41), byte_at_a_time=bytewise)
    # An MCP request is rate-limited per tool, so only once its body has been read.
    assert kinds(w) == [(Check.RATE, ("192.0.2.7", None, "echo"))]
    w.c.admitted(DENIED)
    answer = client_answer(w.t.take_client())
    assert answer.status == 429
    error = json.loads(answer.body)
    assert (error["id"], error["error"]["code"]) == (41, RATE_LIMITED)


def test_mcp_auth_failures_are_json_rpc_errors() -> None:
    w = world()
    w.feed(call_2026(5).replace(b"POST /mcp", b"POST /tools"))
    answer = client_answer(w.t.take_client())
    assert answer.status == 401
    assert json.loads(answer.body)["error"]["message"] == "credentials required"


def test_a_limited_callers_call_that_names_no_tool_is_answered_in_band(bytewise: bool) -> None:
    # A call of a tool outside the caller's list goes to the backend under a stand-in
    # name (tests/protocol/test_connection_tool_lists.py); one that names no tool at all
    # cannot, and is refused by the proxy.
    w = world()
    w.env.identities[b"carol-key"] = Identity("key", "carol", allowed_tools=frozenset({"x"}))
    call = mcp_post(
        b'{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"arguments":{},'
        b'"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}',
        b"MCP-Protocol-Version: 2026-07-28",
        b"Mcp-Method: tools/call",
        b"Authorization: Bearer carol-key",
        target=b"/tools",
    )
    w.feed(call, byte_at_a_time=bytewise)
    answer = client_answer(w.t.take_client())
    assert answer.status == 200 and json.loads(answer.body)["id"] == 9
    assert w.env.denied_tools == 1 and w.t.upstreams == []
    # Not the connection's fault: it stays open for the next request.
    assert w.state == "IDLE"
    [x] = w.accounted
    assert (x.status, x.refused) == (200, True)


def test_a_pending_check_has_no_timeout_of_the_machines() -> None:
    w = world(rate_limited=True)
    w.feed(GET)
    w.advance(w.env.config.limits.header_timeout * 3)
    w.c.timer()
    assert w.state == "ADMISSION" and w.t.client_out == b""
    w.c.admitted(ALLOWED)
    assert w.state == "UPSTREAM"


def test_a_client_leaving_while_a_check_is_pending_releases_a_lease_answered_later() -> None:
    for reset in (False, True):
        w = world(ip_cap=5)
        w.feed(GET)
        w.c.client_closed(reset=reset)
        assert w.state == "CLOSED" and w.t.client_out == b""
        [x] = w.accounted
        assert x.status == 499
        late = lease("ip:192.0.2.7")
        w.c.admitted(late)
        assert w.t.released == [late] and w.t.upstreams == []
        assert w.state == "CLOSED" and len(w.accounted) == 1


def test_a_decision_answered_after_the_client_left_is_dropped() -> None:
    w = world(rate_limited=True)
    w.feed(GET)
    w.c.client_closed()
    w.c.admitted(ALLOWED)
    assert w.t.upstreams == [] and w.t.released == []
    assert len(w.accounted) == 1
