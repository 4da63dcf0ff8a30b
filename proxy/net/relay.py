"""The byte relay of a WebSocket tunnel, after the 101.

The proxy has nothing to change in the frames, so bytes are copied both ways without
being parsed; only the backend-to-client direction is followed frame by frame
(``proxy.protocol.ws_frames.FrameTracker``, a few header bytes per frame) so that a
drain can close the client with 1001 (going away) at a frame boundary. The client
answers that close through the tunnel, which the backend sees as a normal client close.

EOF on one side becomes a half-close (FIN) on the other; once one side has closed, the
other has ``half_close_timeout`` to finish. An error on either side ends both. An
optional idle timeout ends a tunnel with no traffic in either direction for that long.

One task relays both directions with non-blocking reads and writes, both sockets sitting
in the worker's park (``proxy.net.park``) for read and write readiness. A direction
whose destination is full keeps the bytes it read and stops reading its source until
the destination drains, while the other direction goes on. An idle tunnel is parked
like an idle SSE stream: no task until a socket is ready or a deadline passes.
"""

from __future__ import annotations

import math
import os
import socket
from typing import TYPE_CHECKING

import trio

from proxy.net.errors import CLOSED, RECV_SIZE, StreamParked, write_now
from proxy.net.park import BACKEND, BACKEND_OUT, CLIENT, CLIENT_OUT, ParkedStream
from proxy.net.upstream import UpstreamConnection
from proxy.protocol.ws_frames import GOING_AWAY, FrameTracker, ProtocolError, close_frame

if TYPE_CHECKING:
    from proxy.net.exchange import Exchange


class _Direction:
    """Bytes flowing one way: read from ``source``, written to ``sink``."""

    __slots__ = ("done", "eof_sent", "pending", "sink", "sink_out", "source_fd", "source_in")

    def __init__(
        self, source: trio.SocketStream, source_in: int, sink: trio.SocketStream, sink_out: int
    ) -> None:
        self.source_fd = source.socket.fileno()
        self.source_in = source_in
        self.sink = sink
        self.sink_out = sink_out
        self.pending = b""
        """Read but not yet written: while there is some, the source is not read."""
        self.done = False
        """The source has closed its side."""
        self.eof_sent = False

    def move(self, member: ParkedStream) -> tuple[bool, bytes | None]:
        """Write what is pending, else read once and write: (bytes moved, what was read
        if anything). Raises OSError or a trio stream error when either side is gone."""
        moved = False
        data: bytes | None = None
        if not self.pending and not self.done and member.ready & self.source_in:
            try:
                data = os.read(self.source_fd, RECV_SIZE)
            except BlockingIOError:
                member.settle(self.source_in)
            else:
                moved = True
                if data:
                    self.pending = data
                else:
                    self.done = True
        if self.pending:
            written = write_now(self.sink, self.pending)
            moved = moved or written > 0
            self.pending = self.pending[written:]
            if self.pending:
                member.settle(self.sink_out)  # wait for the sink to drain
        if self.done and not self.pending and not self.eof_sent:
            self.eof_sent = True
            moved = True
            self.sink.socket.shutdown(socket.SHUT_WR)
        return moved, data


class Tunnel:
    __slots__ = (
        "_activity",
        "_closing_by",
        "_down",
        "_drain_close",
        "_drain_noted",
        "_half_close_timeout",
        "_idle_timeout",
        "_member",
        "_tracker",
        "_up",
        "closed_by_drain",
        "outcome",
        "upstream",
        "x",
    )

    def __init__(
        self,
        x: Exchange,
        upstream: UpstreamConnection,
        *,
        idle_timeout: float = 0.0,
        half_close_timeout: float = 5.0,
    ) -> None:
        self.x = x
        self.upstream = upstream
        self._idle_timeout = idle_timeout
        self._half_close_timeout = half_close_timeout
        self._activity = trio.current_time()
        self._closing_by = math.inf
        """Once one side has closed: when the tunnel ends regardless."""
        self._tracker: FrameTracker | None = FrameTracker()
        self._member: ParkedStream | None = None
        self._up: _Direction | None = None
        self._down: _Direction | None = None
        self._drain_close = False
        """A drain asked for a 1001 close not yet sent."""
        self._drain_noted = False
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

    async def start(self) -> None:
        """Relay until both sides have closed; the exchange records how it ended. Raises
        StreamParked when the idle tunnel was parked: ``resume`` carries it on."""
        client = self.x.client.stream
        backend = self.upstream.stream
        self._member = self.x.client.ctx.park.enter(
            backend.socket.fileno(), client.socket.fileno(), writes=True
        )
        self._up = _Direction(client, CLIENT, backend, BACKEND_OUT)
        self._down = _Direction(backend, BACKEND, client, CLIENT_OUT)
        await self.resume()

    async def resume(self) -> None:
        member = self._member
        assert member is not None
        parked = False
        try:
            await self._relay(member)
        except StreamParked:
            parked = True
            raise
        except (*CLOSED, OSError):
            self.outcome = "reset"
        finally:
            if not parked:
                self.x.client.ctx.park.leave(member)
                await trio.aclose_forcefully(self.x.client.stream)
                await trio.aclose_forcefully(self.upstream.stream)
                self._record()

    def _record(self) -> None:
        x = self.x
        if self.closed_by_drain:
            x.error = "tunnel closed by drain (1001)"
        elif self.outcome != "closed":
            x.error = f"tunnel ended: {self.outcome}"
        x.response_complete = True

    async def _relay(self, member: ParkedStream) -> None:
        up, down = self._up, self._down
        assert up is not None and down is not None
        ctx = self.x.client.ctx
        while True:
            if ctx.draining and not self._drain_noted:
                self._drain_noted = True
                self._drain_close = True
            if self._drain_close:
                # Before the moves: a close frame queued here is written at once.
                self._close_client_at_boundary(down)
            moved_up, read_up = up.move(member)
            moved_down, read_down = down.move(member)
            if read_up is not None or read_down is not None:
                self._activity = trio.current_time()
            if read_down:
                self.observe_backend_bytes(read_down)  # not frames we understand: never inject
            if (read_up == b"" or read_down == b"") and self._closing_by == math.inf:
                # One side is done sending. Many clients never close their side after a
                # server-initiated close, so the other direction gets a bounded time to
                # finish (like HAProxy's client-fin / server-fin).
                self._closing_by = trio.current_time() + self._half_close_timeout
            if up.eof_sent and down.eof_sent:
                return
            now = trio.current_time()
            if now >= self._closing_by:
                return  # one side closed and the other did not follow in time
            idle_by = math.inf
            if self._idle_timeout > 0:
                idle_by = self._activity + self._idle_timeout
                if now >= idle_by:
                    self.outcome = "idle_timeout"
                    return
            if moved_up or moved_down:
                await trio.lowlevel.checkpoint()
                continue
            await self._wait(member, min(idle_by, self._closing_by))

    def _close_client_at_boundary(self, down: _Direction) -> None:
        """Send the client a 1001 close at the next frame boundary (drain)."""
        tracker = self._tracker
        if tracker is None or tracker.saw_close:
            # The backend is closing already, or frames cannot be told apart: the tunnel
            # is left to end by itself or at the drain deadline.
            self._drain_close = False
            return
        if tracker.at_boundary and not down.pending:
            down.pending = close_frame(GOING_AWAY, "server going away", mask=False)
            self._drain_close = False
            self.closed_by_drain = True

    async def _wait(self, member: ParkedStream, deadline: float) -> None:
        """Until a socket is ready for what the tunnel needs, or ``deadline``: parked
        where it can be, else in this task (a drain interrupts that wait)."""
        member.interest = self._interest()
        await self.x.client.ctx.idle_wait(member, deadline, self._wake, parkable=self.x.parkable)

    def _interest(self) -> int:
        """The readiness that would let the tunnel move."""
        bits = 0
        for d in (self._up, self._down):
            assert d is not None
            if d.pending:
                bits |= d.sink_out
            elif not d.done:
                bits |= d.source_in
        return bits

    async def _wake(self) -> None:
        await self.x.client.resume_stream(self.x, self)
