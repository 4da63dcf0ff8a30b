"""Every state of the connection machine entered and left, and every event in every state.

``TRANSITIONS`` is the machine's transition table as these tests establish it: for each
state, the events that can take it elsewhere and the states they lead to (an event not
listed leaves the state as it is). Two kinds of evidence stand behind every entry:

- the matrix: one representative connection in each state is given each event in
  turn: nothing raises, the state reached is one the table allows, and what the
  connection holds fits that state (a closed client, backend connections given back,
  the kind gauge balanced, a deadline still ahead);
- examples: a transition the representatives do not show is shown by a behaviour test
  of tests/protocol, run here while the test world notes every transition.

The last tests check that every entry is shown by one or the other, and that the table
enters and leaves every state of ``STATE_NAMES`` (CLOSED is only entered).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest

from proxy.protocol.connection import STATE_NAMES
from proxy.ratelimit import Decision
from tests.protocol import (
    test_connection_admission as admission,
)
from tests.protocol import (
    test_connection_body as body,
)
from tests.protocol import (
    test_connection_head as head,
)
from tests.protocol import (
    test_connection_lifecycle as lifecycle,
)
from tests.protocol import (
    test_connection_response as response,
)
from tests.protocol import (
    test_connection_stream as stream,
)
from tests.protocol import (
    test_connection_tunnel as tunnel,
)
from tests.protocol import (
    test_connection_upstream as upstream,
)
from tests.support.machine import (
    SSE_HEAD,
    Transition,
    World,
    call_2026,
    chunk,
    observing,
    ok,
    routes_config,
)

ANY_REQUEST_PROGRESS = {"IDLE", "HEAD", "ADMISSION", "BODY", "UPSTREAM", "LINGER"}
TRANSITIONS: dict[str, dict[str, set[str]]] = {
    "PROXY": {
        "client_data": {"PROXY", "IDLE", "HEAD", "UPSTREAM", "CLOSED"},
        "client_closed": {"CLOSED"},
        "client_closed(reset)": {"CLOSED"},
        "timer": {"CLOSED"},
        "abandon": {"CLOSED"},
    },
    "IDLE": {
        "client_data": ANY_REQUEST_PROGRESS,  # IDLE: a request answered in band at once
        "client_closed": {"CLOSED"},
        "client_closed(reset)": {"CLOSED"},
        "timer": {"CLOSED"},
        "abandon": {"CLOSED"},
        "refuse_new": {"LINGER"},
    },
    "HEAD": {
        "client_data": {"HEAD", "ADMISSION", "BODY", "UPSTREAM", "LINGER"},
        "client_closed": {"CLOSED"},
        "client_closed(reset)": {"CLOSED"},
        "timer": {"LINGER"},
        "abandon": {"CLOSED"},
    },
    "ADMISSION": {
        "admitted": {"ADMISSION", "BODY", "UPSTREAM", "LINGER"},
        "client_closed": {"CLOSED"},
        "client_closed(reset)": {"CLOSED"},
        "abandon": {"CLOSED"},
    },
    "BODY": {
        "client_data": {"BODY", "ADMISSION", "UPSTREAM", "IDLE", "LINGER"},
        "client_closed": {"CLOSED"},
        "client_closed(reset)": {"CLOSED"},
        "timer": {"LINGER"},
        "abandon": {"CLOSED"},
    },
    "UPSTREAM": {
        "client_data": {"UPSTREAM", "LINGER"},
        "client_closed": {"UPSTREAM", "CLOSED"},
        "client_closed(reset)": {"CLOSED"},
        "upstream_data": {"UPSTREAM", "RESPONSE", "STREAM", "TUNNEL", "IDLE", "LINGER", "CLOSED"},
        "upstream_closed": {"UPSTREAM", "LINGER"},
        "upstream_closed(reset)": {"UPSTREAM", "LINGER"},
        "upstream_closed(reset)(before_write)": {"UPSTREAM", "LINGER"},
        "timer": {"UPSTREAM", "LINGER"},
        "abandon": {"CLOSED"},
    },
    "RESPONSE": {
        "client_closed(reset)": {"CLOSED"},
        "upstream_data": {"RESPONSE", "UPSTREAM", "IDLE", "LINGER", "CLOSED"},
        "upstream_closed": {"IDLE", "LINGER", "CLOSED"},
        "upstream_closed(reset)": {"CLOSED"},
        "upstream_closed(reset)(before_write)": {"CLOSED"},
        "timer": {"CLOSED"},
        "abandon": {"CLOSED"},
    },
    "STREAM": {
        "client_closed": {"STREAM", "CLOSED"},
        "client_closed(reset)": {"CLOSED"},
        "upstream_data": {"STREAM", "IDLE", "LINGER", "CLOSED"},
        "upstream_closed": {"CLOSED"},
        "upstream_closed(reset)": {"CLOSED"},
        "upstream_closed(reset)(before_write)": {"CLOSED"},
        "timer": {"STREAM", "CLOSED"},
        "drain": {"STREAM", "LINGER"},
        "abandon": {"CLOSED"},
    },
    "TUNNEL": {
        "client_closed": {"TUNNEL", "CLOSED"},
        "client_closed(reset)": {"CLOSED"},
        "upstream_closed": {"TUNNEL", "CLOSED"},
        "upstream_closed(reset)": {"CLOSED"},
        "upstream_closed(reset)(before_write)": {"CLOSED"},
        "timer": {"TUNNEL", "CLOSED"},
        "abandon": {"CLOSED"},
    },
    "LINGER": {
        "client_data": {"LINGER", "CLOSED"},
        "client_closed": {"CLOSED"},
        "client_closed(reset)": {"CLOSED"},
        "timer": {"CLOSED"},
        "abandon": {"CLOSED"},
    },
    "CLOSED": {},
}
OPENED_IN = {"PROXY", "IDLE"}
"""The states a new connection starts in (with and without a PROXY header)."""

# -- the representatives -------------------------------------------------------------------

GET = b"GET /one HTTP/1.1\r\nHost: a.example\r\n\r\n"
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


def in_proxy() -> World:
    w = World(routes_config(), proxy_header=True, trusted=True)
    w.feed(head.V1[:10])
    return w


def in_idle() -> World:
    w = World(routes_config())
    w.feed(GET)
    w.answer(ok())
    return w


def in_head() -> World:
    w = in_idle()
    w.feed(GET[:7])
    return w


def in_admission() -> World:
    w = World(routes_config())
    w.env.rate_limited = True
    w.feed(GET)
    return w


def in_body() -> World:
    w = World(routes_config())
    w.feed(b"POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello")
    return w


def in_upstream() -> World:
    w = World(routes_config())
    w.feed(GET.replace(b"/one", b"/x"))  # a route with two replicas
    return w


def in_response() -> World:
    w = World(routes_config())
    w.feed(GET)
    w.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    return w


def in_stream() -> World:
    w = World(routes_config())
    w.feed(call_2026())
    w.answer(SSE_HEAD + chunk(b"data: 1\n\n"))
    return w


def in_tunnel() -> World:
    w = World(routes_config())
    w.feed(tunnel.UPGRADE)
    w.answer(SWITCHED)
    return w


def in_linger() -> World:
    w = World(routes_config())
    w.feed(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n")
    return w


def in_closed() -> World:
    w = World(routes_config())
    w.c.client_closed()
    return w


REPRESENTATIVES: dict[str, Callable[[], World]] = {
    "PROXY": in_proxy,
    "IDLE": in_idle,
    "HEAD": in_head,
    "ADMISSION": in_admission,
    "BODY": in_body,
    "UPSTREAM": in_upstream,
    "RESPONSE": in_response,
    "STREAM": in_stream,
    "TUNNEL": in_tunnel,
    "LINGER": in_linger,
    "CLOSED": in_closed,
}


def fire_timer(w: World) -> None:
    if w.c.deadline != float("inf"):
        w.env.clock = w.c.deadline
    w.c.timer()


def fire_drain(w: World) -> None:
    w.env.draining = True
    w.c.drain()


EVENTS: dict[str, Callable[[World], None]] = {
    "client_data": lambda w: w.c.client_data(GET),
    "client_closed": lambda w: w.c.client_closed(),
    "client_closed(reset)": lambda w: w.c.client_closed(reset=True),
    "upstream_connected": lambda w: w.c.upstream_connected(),
    "upstream_data": lambda w: w.c.upstream_data(ok(b"x")),
    "upstream_closed": lambda w: w.c.upstream_closed(),
    "upstream_closed(reset)": lambda w: w.c.upstream_closed(reset=True),
    "upstream_closed(reset)(before_write)": lambda w: w.c.upstream_closed(
        reset=True, before_write=True
    ),
    "client_backlog(True)": lambda w: w.c.client_backlog(True),
    "client_backlog(False)": lambda w: w.c.client_backlog(False),
    "upstream_backlog(True)": lambda w: w.c.upstream_backlog(True),
    "upstream_backlog(False)": lambda w: w.c.upstream_backlog(False),
    "timer": fire_timer,
    "drain": fire_drain,
    "admitted": lambda w: w.c.admitted(Decision(True, None)),
    "abandon": lambda w: w.c.abandon(),
}


def allowed(before: str, event: str) -> set[str]:
    return TRANSITIONS[before].get(event, {before})


def fits(w: World) -> None:
    """What the connection holds fits the state it is in."""
    balanced = {"http": 0, "sse": 0, "websocket": 0}
    given_back = all(up.finished is not None for up in w.t.upstreams)
    if w.state == "CLOSED":
        assert w.t.client_closed and given_back and w.env.kinds == balanced
        assert w.c.deadline == float("inf")
        return
    assert not w.t.client_closed
    assert w.c.deadline > w.env.clock, "a deadline already passed would fire for ever"
    if w.state in ("LINGER", "IDLE", "HEAD"):
        assert given_back and w.env.kinds == balanced
    if w.state == "LINGER":
        assert w.t.client_shut


@pytest.mark.parametrize("event", list(EVENTS))
@pytest.mark.parametrize("state", list(REPRESENTATIVES))
def test_every_event_in_every_state(state: str, event: str) -> None:
    w = REPRESENTATIVES[state]()
    assert w.state == state
    EVENTS[event](w)
    assert w.state in allowed(state, event)
    fits(w)


def matrix_transitions() -> set[Transition]:
    seen: set[Transition] = set()
    for make in REPRESENTATIVES.values():
        for fire in EVENTS.values():
            w = make()
            fire(w)
            seen.update(w.c.transitions)
    return seen


# -- the examples --------------------------------------------------------------------------

EXAMPLES: dict[Transition, Callable[[], None]] = {
    ("PROXY", "client_data", "IDLE"): head.test_after_the_header_the_request_head_has_its_own_time,
    ("PROXY", "client_data", "HEAD"): head.test_after_the_header_the_request_head_has_its_own_time,
    ("PROXY", "client_data", "UPSTREAM"): partial(
        head.test_a_trusted_peer_opens_with_a_v1_header_that_replaces_its_address, False
    ),
    ("PROXY", "client_closed", "CLOSED"): (
        head.test_a_client_closing_before_its_header_leaves_nothing_behind
    ),
    ("IDLE", "client_data", "HEAD"): partial(
        head.test_a_partial_head_gets_408_at_header_timeout, False
    ),
    ("IDLE", "client_data", "ADMISSION"): partial(
        admission.test_a_rate_check_is_asked_and_an_allowed_request_goes_on, False
    ),
    (
        "IDLE",
        "client_data",
        "BODY",
    ): body.test_a_body_arriving_after_its_head_is_held_until_complete,
    ("IDLE", "client_data", "LINGER"): partial(
        head.test_a_request_line_that_cannot_start_a_head_is_refused_at_once, False
    ),
    ("IDLE", "client_data", "IDLE"): partial(
        admission.test_a_tool_the_caller_may_not_use_is_answered_in_band, False
    ),
    (
        "IDLE",
        "refuse_new",
        "LINGER",
    ): head.test_a_worker_that_takes_no_more_work_answers_503_at_once,
    ("HEAD", "client_data", "ADMISSION"): partial(
        admission.test_a_rate_check_is_asked_and_an_allowed_request_goes_on, True
    ),
    ("HEAD", "client_data", "BODY"): partial(
        body.test_expect_100_continue_on_an_mcp_route_is_answered_by_the_proxy, True
    ),
    ("HEAD", "client_data", "UPSTREAM"): partial(
        head.test_the_usual_request_skips_admission_when_nothing_is_checked, True
    ),
    ("ADMISSION", "admitted", "ADMISSION"): (
        admission.test_caps_then_rate_are_checked_in_order_and_a_tenant_once_per_connection
    ),
    (
        "ADMISSION",
        "admitted",
        "BODY",
    ): admission.test_a_request_admitted_before_its_body_waits_for_it,
    ("ADMISSION", "admitted", "LINGER"): partial(
        admission.test_a_request_over_its_rate_gets_429_with_retry_after, False
    ),
    ("BODY", "client_data", "ADMISSION"): partial(
        admission.test_mcp_refusals_are_json_rpc_errors, True
    ),
    ("BODY", "client_data", "IDLE"): partial(
        admission.test_a_tool_the_caller_may_not_use_is_answered_in_band, True
    ),
    ("BODY", "client_data", "LINGER"): partial(
        body.test_an_mcp_body_that_is_not_json_rpc_is_refused_once_read, True
    ),
    ("UPSTREAM", "client_data", "LINGER"): partial(
        body.test_a_chunked_body_growing_over_max_body_bytes_gets_413, True
    ),
    ("UPSTREAM", "upstream_data", "UPSTREAM"): partial(
        body.test_expect_100_continue_on_an_http_route_waits_for_the_backend, False
    ),
    ("UPSTREAM", "upstream_data", "STREAM"): partial(
        stream.test_events_are_relayed_as_they_come_and_the_end_ends_the_exchange, False
    ),
    ("UPSTREAM", "upstream_data", "TUNNEL"): partial(
        tunnel.test_a_valid_upgrade_answered_101_carries_bytes_both_ways, False
    ),
    ("UPSTREAM", "upstream_data", "LINGER"): (
        lifecycle.test_a_drain_serves_a_request_waiting_for_its_answer
    ),
    ("UPSTREAM", "upstream_data", "CLOSED"): partial(
        upstream.test_a_half_closing_client_still_gets_its_answer_then_the_connection_ends, False
    ),
    ("UPSTREAM", "upstream_closed", "UPSTREAM"): partial(
        upstream.test_a_pooled_connection_found_closed_is_retried_once_on_a_fresh_one, False
    ),
    ("UPSTREAM", "upstream_closed(reset)", "UPSTREAM"): (
        upstream.test_a_pooled_connection_reset_before_answering_is_retried_on_a_fresh_one
    ),
    ("UPSTREAM", "upstream_closed(reset)(before_write)", "LINGER"): (
        upstream.test_a_second_refusal_is_not_retried_again
    ),
    ("UPSTREAM", "client_closed", "CLOSED"): partial(
        upstream.test_a_2026_client_closing_while_waiting_cancels_the_request_upstream, False
    ),
    ("UPSTREAM", "timer", "UPSTREAM"): upstream.test_an_early_timer_call_changes_nothing,
    ("RESPONSE", "upstream_data", "RESPONSE"): partial(
        response.test_a_content_length_body_is_relayed_as_it_comes, True
    ),
    ("RESPONSE", "upstream_data", "UPSTREAM"): partial(
        response.test_requests_pipelined_during_a_response_are_answered_after_it, False
    ),
    ("RESPONSE", "upstream_data", "IDLE"): partial(
        response.test_a_content_length_body_is_relayed_as_it_comes, False
    ),
    ("RESPONSE", "upstream_data", "LINGER"): partial(
        response.test_a_client_asking_to_close_is_answered_then_closed_with_linger, True
    ),
    ("RESPONSE", "upstream_closed", "IDLE"): partial(
        response.test_a_close_delimited_body_is_rechunked_for_an_http_11_client, False
    ),
    ("RESPONSE", "upstream_closed", "LINGER"): partial(
        response.test_a_close_delimited_body_is_passed_until_close_to_an_http_10_client, False
    ),
    ("STREAM", "upstream_data", "IDLE"): partial(
        stream.test_events_are_relayed_as_they_come_and_the_end_ends_the_exchange, False
    ),
    ("STREAM", "upstream_data", "LINGER"): partial(
        stream.test_a_drain_ends_the_stream_with_a_retry_hint_at_an_event_boundary, False
    ),
    ("STREAM", "upstream_data", "CLOSED"): partial(
        stream.test_a_client_leaving_after_its_response_went_by_is_no_error, False
    ),
    ("STREAM", "client_closed", "STREAM"): partial(
        stream.test_a_2025_client_leaving_a_post_stream_lets_the_request_finish_upstream, False
    ),
    (
        "STREAM",
        "timer",
        "CLOSED",
    ): stream.test_a_request_left_to_finish_upstream_gets_the_response_timeout,
    ("TUNNEL", "client_closed", "CLOSED"): (
        tunnel.test_a_backend_eof_half_closes_the_client_and_both_closing_is_a_clean_end
    ),
    ("TUNNEL", "upstream_closed", "CLOSED"): partial(
        tunnel.test_a_drain_closes_the_client_with_1001_at_a_frame_boundary, False
    ),
    (
        "TUNNEL",
        "timer",
        "CLOSED",
    ): tunnel.test_a_tunnel_silent_both_ways_ends_at_stream_idle_timeout,
    ("HEAD", "client_data", "HEAD"): partial(
        head.test_a_partial_head_gets_408_at_header_timeout, True
    ),
    ("BODY", "client_data", "BODY"): partial(
        body.test_an_mcp_message_is_read_whole_before_it_is_routed, True
    ),
    ("STREAM", "upstream_data", "STREAM"): partial(
        stream.test_events_are_relayed_as_they_come_and_the_end_ends_the_exchange, True
    ),
    ("STREAM", "drain", "STREAM"): partial(
        stream.test_a_drain_ends_the_stream_with_a_retry_hint_at_an_event_boundary, False
    ),
    ("LINGER", "client_data", "CLOSED"): lifecycle.test_lingering_ends_after_a_mebibyte,
}
"""Transitions the representatives do not show, each with a behaviour test showing it."""


@pytest.mark.parametrize("transition", list(EXAMPLES), ids=" ".join)
def test_the_example_shows_its_transition(transition: Transition) -> None:
    with observing() as seen:
        EXAMPLES[transition]()
    assert transition in seen


def test_every_transition_in_the_table_is_shown() -> None:
    shown = matrix_transitions() | set(EXAMPLES)
    table = {
        (before, event, after)
        for before, events in TRANSITIONS.items()
        for event, afters in events.items()
        for after in afters
    }
    assert table - shown == set()


def test_the_table_enters_and_leaves_every_state() -> None:
    assert set(TRANSITIONS) == set(STATE_NAMES)
    moves = {
        (before, after)
        for before, events in TRANSITIONS.items()
        for afters in events.values()
        for after in afters
        if after != before
    }
    entered = {after for _, after in moves} | OPENED_IN
    left = {before for before, _ in moves}
    assert entered == set(STATE_NAMES)
    assert left == set(STATE_NAMES) - {"CLOSED"}
    # CLOSED is left by nothing: the matrix gives it every event.
    assert TRANSITIONS["CLOSED"] == {}


def test_new_connections_open_in_proxy_or_idle() -> None:
    assert World(proxy_header=True).c.transitions == [("-", "open", "PROXY")]
    assert World().c.transitions == [("-", "open", "IDLE")]
