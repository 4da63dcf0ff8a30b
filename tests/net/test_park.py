"""The stream park: one edge-triggered readiness set for the sockets of every stream."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator

import pytest
import trio

from proxy.net.park import BACKEND, CLIENT, ParkedStream, StreamPark
from tests.support.raw_backend import eventually


@pytest.fixture
def pairs() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    """(backend side in the proxy, the backend), (client side in the proxy, the client)."""
    backend_here, backend = socket.socketpair()
    client_here, client = socket.socketpair()
    for sock in (backend_here, client_here):
        sock.setblocking(False)
    yield backend_here, backend, client_here, client
    for sock in (backend_here, backend, client_here, client):
        sock.close()


def _quiet_member(
    backend_here: socket.socket, client_here: socket.socket
) -> tuple[StreamPark, ParkedStream]:
    """A park with one stream in it whose sides have both been read empty."""
    park = StreamPark()
    member = park.enter(backend_here.fileno(), client_here.fileno())
    member.settle(BACKEND | CLIENT)
    return park, member


def _drain(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = os.read(sock.fileno(), 65536)
        except BlockingIOError:
            return out
        if not data:
            return out
        out += data


async def test_a_new_member_reads_both_sides_first_then_waits_for_an_arrival(
    pairs: tuple[socket.socket, ...],
) -> None:
    backend_here, backend, client_here, _ = pairs
    park = StreamPark()
    member = park.enter(backend_here.fileno(), client_here.fileno())
    # Bytes may have arrived before the stream entered: both sides are to be read.
    assert member.ready == BACKEND | CLIENT
    member.settle(BACKEND)
    member.settle(CLIENT)
    with trio.move_on_after(0.2) as idle:
        await park.wait(member)
    assert idle.cancelled_caught, "nothing arrived, yet the wait ended"

    async def send_later() -> None:
        await trio.sleep(0.05)
        backend.send(b"data: 1\n\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_later)
        with trio.fail_after(5):
            await park.wait(member)
    assert member.ready == BACKEND
    assert _drain(backend_here) == b"data: 1\n\n"
    park.leave(member)


async def test_a_side_stays_ready_until_a_read_of_it_comes_back_empty(
    pairs: tuple[socket.socket, ...],
) -> None:
    backend_here, backend, client_here, client = pairs
    park, member = _quiet_member(backend_here, client_here)
    client.send(b"GET /next HTTP/1.1\r\n")
    with trio.fail_after(5):
        await park.wait(member)
    assert member.ready == CLIENT
    # Not settled: the next wait returns at once (edge-triggered: no second report), with
    # nothing new sent (the guard is only against a hang).
    with trio.fail_after(5):
        await park.wait(member)
    assert _drain(client_here) == b"GET /next HTTP/1.1\r\n"
    member.settle(CLIENT)
    client.close()  # the client leaving is an arrival too
    with trio.fail_after(5):
        await park.wait(member)
    assert member.ready & (BACKEND | CLIENT) == CLIENT  # (a hang-up also reports room)
    assert _drain(client_here) == b""
    park.leave(member)
    backend.send(b"after leaving")
    await trio.sleep(0.05)
    assert member.ready & (BACKEND | CLIENT) == CLIENT, "a member that left is not watched"


async def test_streams_are_woken_alone_and_a_cancelled_wait_leaves_no_trace(
    pairs: tuple[socket.socket, ...],
) -> None:
    backend_here, backend, client_here, _ = pairs
    other_backend_here, other_backend = socket.socketpair()
    other_client_here, other_client = socket.socketpair()
    park = StreamPark()
    first = park.enter(backend_here.fileno(), client_here.fileno())
    second = park.enter(other_backend_here.fileno(), other_client_here.fileno())
    first.settle(BACKEND | CLIENT)
    second.settle(BACKEND | CLIENT)
    woken: list[str] = []
    someone_woke = trio.Event()

    async def waiter(name: str, member: ParkedStream) -> None:
        await park.wait(member)
        woken.append(name)
        someone_woke.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, "first", first)
            nursery.start_soon(waiter, "second", second)
            await trio.sleep(0.05)
            other_backend.send(b"x")
            with trio.fail_after(5):
                await someone_woke.wait()
            await trio.sleep(0.05)
            assert woken == ["second"]
            nursery.cancel_scope.cancel()
        assert woken == ["second"], "the cancelled waiter must not be woken"
        # A cancelled wait can be followed by a normal one.
        backend.send(b"y")
        with trio.fail_after(5):
            await park.wait(first)
        assert first.ready == BACKEND
    finally:
        park.leave(first)
        park.leave(second)
        for sock in (other_backend_here, other_backend, other_client_here, other_client):
            sock.close()


def test_each_trio_run_gets_its_own_watcher() -> None:
    park = StreamPark()

    async def one_run() -> None:
        backend_here, backend = socket.socketpair()
        client_here, client = socket.socketpair()
        try:
            member = park.enter(backend_here.fileno(), client_here.fileno())
            member.settle(BACKEND | CLIENT)
            backend.send(b"z")
            with trio.fail_after(5):
                await park.wait(member)
            assert member.ready == BACKEND
            park.leave(member)
        finally:
            for sock in (backend_here, backend, client_here, client):
                sock.close()

    trio.run(one_run)
    trio.run(one_run)


async def test_a_parked_stream_is_woken_in_a_new_task_by_bytes_or_its_deadline(
    pairs: tuple[socket.socket, ...],
) -> None:
    backend_here, backend, client_here, _ = pairs
    park, member = _quiet_member(backend_here, client_here)
    woken: list[float] = []
    each_wake = trio.Event()

    async def wake() -> None:
        nonlocal each_wake
        woken.append(trio.current_time())
        each_wake.set()
        each_wake = trio.Event()

    async with trio.open_nursery() as nursery:
        park.nursery = nursery
        # Bytes: woken at once, whatever the deadline.
        park.park(member, trio.current_time() + 60, wake)
        assert member in park._parked
        backend.send(b"data: 1\n\n")
        with trio.fail_after(5):
            await each_wake.wait()
        assert not member.parked and member.ready == BACKEND
        assert _drain(backend_here) == b"data: 1\n\n"
        member.settle(BACKEND)
        # A deadline: woken when it passes, not before.
        parked_at = trio.current_time()
        park.park(member, parked_at + 0.2, wake)
        with trio.fail_after(5):
            await each_wake.wait()
        assert woken[-1] - parked_at >= 0.2
        # Parked again with a later deadline while the first timer is still pending: the
        # stream keeps one timer entry, which moves on to the later deadline.
        parked_at = trio.current_time()
        park.park(member, parked_at + 0.1, wake)
        backend.send(b"x")
        with trio.fail_after(5):
            await each_wake.wait()
        _drain(backend_here)
        member.settle(BACKEND)
        park.park(member, parked_at + 0.4, wake)
        with trio.fail_after(5):
            await each_wake.wait()
        assert woken[-1] - parked_at >= 0.4
        assert len(park._timers) <= 1
        # A drain wakes every parked stream.
        park.park(member, math.inf, wake)
        park.wake_all()
        with trio.fail_after(5):
            await each_wake.wait()
        assert len(woken) == 5
        park.leave(member)
        park.nursery = None


async def test_a_stream_woken_with_no_nursery_left_is_dropped(
    pairs: tuple[socket.socket, ...],
) -> None:
    backend_here, backend, client_here, _ = pairs
    park, member = _quiet_member(backend_here, client_here)

    async def wake() -> None:
        raise AssertionError("no task can be started")

    park.park(member, math.inf, wake)
    backend.send(b"late")
    await eventually(lambda: not member.parked)  # woken by the bytes, then dropped
    assert backend_here.fileno() not in park._members


async def test_timers_of_streams_that_left_do_not_pile_up() -> None:
    """Many short streams parked with far deadlines: the heap keeps only live entries."""
    park = StreamPark()
    here, there = socket.socketpair()
    other_here, other_there = socket.socketpair()

    async def never() -> None:
        raise AssertionError("not woken in this test")

    try:
        async with trio.open_nursery() as nursery:
            park.nursery = nursery
            far = trio.current_time() + 3600
            for _ in range(5000):
                member = park.enter(here.fileno(), other_here.fileno())
                member.settle(BACKEND | CLIENT)
                park.park(member, far, never)
                park.leave(member)
            assert len(park._timers) <= 2100
            survivor = park.enter(here.fileno(), other_here.fileno())
            survivor.settle(BACKEND | CLIENT)
            woken = trio.Event()

            async def wake() -> None:
                woken.set()

            park.park(survivor, trio.current_time() + 0.1, wake)
            with trio.fail_after(5):
                await woken.wait()
            park.leave(survivor)
            park.nursery = None
    finally:
        for sock in (here, there, other_here, other_there):
            sock.close()
