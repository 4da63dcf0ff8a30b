"""A raw byte relay between two streams, used after a protocol switch (WebSocket).

After the 101 the proxy has nothing to interpret, so frames are not parsed: bytes are
copied both ways. EOF on one side becomes a half-close (FIN) on the other; an error on
either side ends both directions. An optional idle timeout ends a tunnel with no traffic
in either direction for that long; once one side has closed, the other has
``half_close_timeout`` to finish.
"""

from __future__ import annotations

import contextlib

import trio

RECV_SIZE = 65536


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, activity: list[float]) -> None:
    while True:
        data = await source.receive_some(RECV_SIZE)
        if not data:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await sink.send_eof()
            return
        activity[0] = trio.current_time()
        await sink.send_all(data)


async def _watch_idle(idle_timeout: float, activity: list[float], scope: trio.CancelScope) -> None:
    while True:
        deadline = activity[0] + idle_timeout
        if trio.current_time() >= deadline:
            scope.cancel()
            return
        await trio.sleep_until(deadline)


async def relay(
    a: trio.SocketStream,
    b: trio.SocketStream,
    *,
    idle_timeout: float = 0.0,
    half_close_timeout: float = 5.0,
) -> str:
    """Copy bytes both ways until both sides have closed; returns how it ended."""
    activity = [trio.current_time()]
    outcome = "closed"
    try:
        async with trio.open_nursery() as nursery:
            if idle_timeout > 0:
                nursery.start_soon(_watch_idle, idle_timeout, activity, nursery.cancel_scope)

            async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                nonlocal outcome
                try:
                    await _pump(src, dst, activity)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    outcome = "reset"
                    nursery.cancel_scope.cancel()
                    return
                # One side is done sending. Many clients never close their side after a
                # server-initiated WebSocket close, so the other direction gets a
                # bounded time to finish (like HAProxy's client-fin / server-fin).
                limit = trio.current_time() + half_close_timeout
                if limit < nursery.cancel_scope.deadline:
                    nursery.cancel_scope.deadline = limit

            async def both() -> None:
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(pump, a, b)
                    pumps.start_soon(pump, b, a)
                nursery.cancel_scope.cancel()

            nursery.start_soon(both)
        idle_for = trio.current_time() - activity[0]
        if outcome == "closed" and idle_timeout > 0 and idle_for >= idle_timeout:
            outcome = "idle_timeout"
    finally:
        await trio.aclose_forcefully(a)
        await trio.aclose_forcefully(b)
    return outcome
