"""Every state of the connection machine entered and left, every transition shown.

The transition table (``test_connection_matrix.TRANSITIONS``) has two kinds of evidence
behind each entry: the matrix of that module (a representative connection in each state
given each event), and, for what the representatives do not show, the behaviour tests of
tests/protocol listed in ``EXAMPLES``, run here while the test world notes every
(state before, event, state after). The last tests check that every entry is shown, and
that the table enters and leaves every state of ``STATE_NAMES`` (CLOSED is only
entered: the matrix gives it every event and it stays).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest

from proxy.protocol.connection import STATE_NAMES
from tests.protocol import test_connection_admission as admission
from tests.protocol import test_connection_body as body
from tests.protocol import test_connection_head as head
from tests.protocol import test_connection_lifecycle as lifecycle
from tests.protocol import test_connection_response as response
from tests.protocol import test_connection_stream as stream
from tests.protocol import test_connection_tunnel as tunnel
from tests.protocol import test_connection_upstream as upstream
from tests.protocol.test_connection_matrix import OPENED_IN, TRANSITIONS, matrix_transitions
from tests.support.machine import Transition, World, observing

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
        admission.test_a_limited_callers_call_that_names_no_tool_is_answered_in_band, False
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
        admission.test_a_limited_callers_call_that_names_no_tool_is_answered_in_band, True
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
    ("RESPONSE", "upstream_data", "CLOSED"): partial(
        response.test_invalid_bytes_mid_body_cut_the_client_and_record_502, False
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


def test_every_transition_in_the_table_is_shown_and_nothing_else() -> None:
    table = {
        (before, event, after)
        for before, events in TRANSITIONS.items()
        for event, afters in events.items()
        for after in afters
    }
    assert table - (matrix_transitions() | set(EXAMPLES)) == set()
    assert set(EXAMPLES) - table == set()


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
