"""Every event in every state of the connection machine.

``TRANSITIONS`` is the machine's transition table as these tests establish it: for each
state, the events that can take it elsewhere and the states they lead to; an event not
listed leaves the state as it is. One representative connection in each state is given
each event in turn: nothing raises, the state reached is one the table allows, and what
the connection holds fits that state (a closed client, backend connections given back,
the kind gauge balanced, a deadline still ahead). ``test_connection_states`` shows the
rest of the table with behaviour tests and checks it against ``STATE_NAMES``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from proxy.ratelimit import Decision
from tests.protocol.test_connection_head import V1
from tests.protocol.test_connection_tunnel import UPGRADE
from tests.support.machine import Transition, World
from tests.support.machine_traffic import SSE_HEAD, call_2026, chunk, ok, routes_config

pytestmark = pytest.mark.usefixtures("both_ways")

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
    w.feed(V1[:10])
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
    w.feed(UPGRADE)
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
