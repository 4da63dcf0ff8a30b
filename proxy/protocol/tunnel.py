"""The TUNNEL state of the connection machine: bytes both ways after a 101. Sans-IO.

The proxy has nothing to change in the frames, so bytes are copied both ways without
being parsed; only the backend-to-client direction is followed frame by frame
(``proxy.protocol.ws_frames.FrameTracker``, a few header bytes per frame) so that a
drain can close the client with 1001 (going away) at a frame boundary. The client
answers that close through the tunnel, which the backend sees as a normal client close.

EOF on one side becomes a half-close (FIN) on the other; once one side has closed, the
other has ``tunnel_half_close_timeout`` to finish (many clients never close after a
server-initiated close; HAProxy's client-fin / server-fin are the same idea). A reset on
either side ends both. ``stream_idle_timeout`` ends a tunnel with no traffic in either
direction for that long. Backpressure is the machine's: a side whose write buffer is full
stops the other side being read.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from proxy.protocol.ws_frames import GOING_AWAY, FrameTracker, ProtocolError, close_frame

if TYPE_CHECKING:
    from proxy.protocol.upstream_side import UpstreamSide


class Tunnel:
    __slots__ = (
        "_activity",
        "_client_done",
        "_closing_by",
        "_drain_close",
        "_tracker",
        "_upstream_done",
        "c",
        "closed_by_drain",
    )

    def __init__(self, c: UpstreamSide) -> None:
        self.c = c
        self._tracker: FrameTracker | None = FrameTracker()
        self._activity = c.env.now()
        self._closing_by = math.inf
        """Once one side has closed: when the tunnel ends regardless."""
        self._client_done = False
        self._upstream_done = False
        self._drain_close = False
        """A drain asked for a 1001 close not yet sent."""
        self.closed_by_drain = False

    def start(self, trailing: bytes) -> None:
        """The 101 went out; ``trailing``: the backend's first bytes after it. Bytes
        the client sent past its handshake go up now."""
        c = self.c
        if trailing:
            self.upstream_data(trailing)
        if c.buf:
            data, c.buf = c.buf, b""
            self.client_data(data)
        if c.env.draining:
            self.drain()
        self._arm()

    def client_data(self, data: bytes) -> None:
        c = self.c
        if c.up is not None:
            c.t.send_upstream(c.up, data)
        self._activity = c.env.now()
        self._arm()

    def upstream_data(self, data: bytes) -> None:
        c = self.c
        tracker = self._tracker
        if tracker is not None:
            try:
                tracker.feed(data)
            except ProtocolError:
                self._tracker = None  # not frames we understand: never inject
        c.t.send_client(data)
        self._activity = c.env.now()
        if self._drain_close:
            self._close_client_at_boundary()
        self._arm()

    def client_eof(self) -> None:
        c = self.c
        self._client_done = True
        if c.up is not None:
            c.t.shutdown_upstream(c.up)
        self._one_side_closed()

    def upstream_eof(self, *, reset: bool) -> None:
        if reset:
            self._end("reset")
            return
        self._upstream_done = True
        self.c.t.shutdown_client()
        self._one_side_closed()

    def timer(self, now: float) -> None:
        if now >= self._closing_by:
            # One side closed and the other did not follow in time.
            self._end("closed" if self._client_done and self._upstream_done else "half_closed")
            return
        idle = self.c.env.config.upstream.stream_idle_timeout
        if idle and now >= self._activity + idle:
            self._end("idle_timeout")
            return
        self._arm()

    def drain(self) -> None:
        """Close the client with 1001 at the next frame boundary."""
        if not self.closed_by_drain:
            self._drain_close = True
            self._close_client_at_boundary()

    def next_deadline(self, now: float) -> float:
        idle = self.c.env.config.upstream.stream_idle_timeout
        return min(self._closing_by, self._activity + idle if idle else math.inf)

    # -- inside ------------------------------------------------------------------------------

    def _arm(self) -> None:
        c = self.c
        c._phase(self.next_deadline(c.env.now()))

    def _one_side_closed(self) -> None:
        if self._client_done and self._upstream_done:
            self._end("closed")
            return
        c = self.c
        if self._closing_by == math.inf:
            self._closing_by = c.env.now() + c.env.config.upstream.tunnel_half_close_timeout
        self._arm()

    def _close_client_at_boundary(self) -> None:
        tracker = self._tracker
        if tracker is None or tracker.saw_close or self._upstream_done:
            # The backend is closing already, or frames cannot be told apart: the tunnel
            # is left to end by itself or at the drain deadline.
            self._drain_close = False
            return
        if tracker.at_boundary:
            self.c.t.send_client(close_frame(GOING_AWAY, "server going away", mask=False))
            self._drain_close = False
            self.closed_by_drain = True

    def _end(self, outcome: str) -> None:
        c = self.c
        x = c.x
        assert x is not None
        if self.closed_by_drain:
            x.error = "tunnel closed by drain (1001)"
        elif outcome != "closed":
            x.error = f"tunnel ended: {outcome}"
        c._drop_upstream()
        c.env.account(x, c.peer)
        c.x = None
        c._closed()
