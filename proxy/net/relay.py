"""The byte relay of a WebSocket tunnel, after the 101.

The proxy has nothing to change in the frames, so bytes are copied both ways without
being parsed; only the backend-to-client direction is followed frame by frame
(``proxy.protocol.ws_frames.FrameTracker``, a few header bytes per frame) so that a
drain can close the client with 1001 (going away) at a frame boundary. The client
answers that close through the tunnel, which the backend sees as a normal client close.

EOF on one side becomes a half-close (FIN) on the other; once one side has closed, the
other has ``half_close_timeout`` to finish. An error on either side ends both. An
optional idle timeout ends a tunnel with no traffic in either direction for that long.
"""

from __future__ import annotations

import trio

from proxy.net.errors import RECV_SIZE
from proxy.protocol.ws_frames import GOING_AWAY, FrameTracker, ProtocolError, close_frame

_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Tunnel:
    __slots__ = (
        "_activity",
        "_backend",
        "_client",
        "_lock",
        "_tracker",
        "closed_by_drain",
        "outcome",
    )

    def __init__(self, client: trio.SocketStream, backend: trio.SocketStream) -> None:
        self._client = client
        self._backend = backend
        self._activity = trio.current_time()
        self._lock = trio.Lock()  # writes towards the client: relayed and injected bytes
        self._tracker: FrameTracker | None = FrameTracker()
        self.closed_by_drain = False
        self.outcome = "closed"

    def observe_backend_bytes(self, data: bytes) -> None:
        """Account for backend bytes sent to the client before the relay started (those
        h11 had buffered past the 101)."""
        if self._tracker is not None:
            try:
                self._tracker.feed(data)
            except ProtocolError:
                self._tracker = None

    async def _to_backend(self) -> None:
        while True:
            data = await self._client.receive_some(RECV_SIZE)
            if not data:
                await self._backend.send_eof()
                return
            self._activity = trio.current_time()
            await self._backend.send_all(data)

    async def _to_client(self) -> None:
        while True:
            data = await self._backend.receive_some(RECV_SIZE)
            if not data:
                async with self._lock:
                    await self._client.send_eof()
                return
            self._activity = trio.current_time()
            self.observe_backend_bytes(data)  # not frames we understand: never inject
            async with self._lock:
                await self._client.send_all(data)

    async def close_client(self) -> None:
        """Send the client a 1001 close at the next frame boundary (drain)."""
        while not self.closed_by_drain:
            tracker = self._tracker
            if tracker is None or tracker.saw_close:
                return  # the backend is closing already, or we cannot tell frames apart
            async with self._lock:
                if tracker.at_boundary:
                    await self._client.send_all(
                        close_frame(GOING_AWAY, "server going away", mask=False)
                    )
                    self.closed_by_drain = True
                    return
            await trio.sleep(0.01)  # mid-frame: the rest of it is on its way

    async def run(
        self,
        *,
        idle_timeout: float = 0.0,
        half_close_timeout: float = 5.0,
        drain: trio.Event | None = None,
    ) -> str:
        """Relay until both sides have closed; returns how it ended."""
        try:
            async with trio.open_nursery() as nursery:
                scope = nursery.cancel_scope

                async def pump(direction: str) -> None:
                    try:
                        await (self._to_backend() if direction == "up" else self._to_client())
                    except _ERRORS:
                        self.outcome = "reset"
                        scope.cancel()
                        return
                    # One side is done sending. Many clients never close their side after
                    # a server-initiated close, so the other direction gets a bounded time
                    # to finish (like HAProxy's client-fin / server-fin).
                    scope.deadline = min(scope.deadline, trio.current_time() + half_close_timeout)

                async def both() -> None:
                    async with trio.open_nursery() as pumps:
                        pumps.start_soon(pump, "up")
                        pumps.start_soon(pump, "down")
                    scope.cancel()

                async def watch_drain(event: trio.Event) -> None:
                    await event.wait()
                    try:
                        await self.close_client()
                    except _ERRORS:
                        scope.cancel()

                async def watch_idle() -> None:
                    while True:
                        deadline = self._activity + idle_timeout
                        if trio.current_time() >= deadline:
                            self.outcome = "idle_timeout"
                            scope.cancel()
                            return
                        await trio.sleep_until(deadline)

                nursery.start_soon(both)
                if drain is not None:
                    nursery.start_soon(watch_drain, drain)
                if idle_timeout > 0:
                    nursery.start_soon(watch_idle)
        finally:
            await trio.aclose_forcefully(self._client)
            await trio.aclose_forcefully(self._backend)
        return self.outcome
