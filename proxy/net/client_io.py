"""A client connection's socket, and the transport its connection machine acts through.

``ClientIO`` carries out what the machine (``proxy.protocol.connection``) asks: it
writes at once where the socket takes the bytes and keeps the rest for when it can
(telling the machine its client is backlogged), opens and gives back backend
connections through the pools, and turns what happens on the sockets into the
machine's events. What happens during one of the machine's calls (a write that fails, a
buffer that fills) is noted and delivered once that call has returned (``settle``): the
machine is never re-entered.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from proxy.net.upstream import RECV_SIZE, UpstreamIO
from proxy.protocol.connection import Connection
from proxy.protocol.exchange import Check, Upstream
from proxy.routing import Backend

if TYPE_CHECKING:
    from proxy.net.reactor import Reactor

_IN = 0x001  # select.EPOLLIN
_OUT = 0x004  # select.EPOLLOUT
_INF = float("inf")

# Notes: what happened during a machine call, delivered after it.
CLIENT_BROKEN = 1
CLIENT_BLOCKED = 2
CLIENT_DRAINED = 4
UPSTREAM_BROKEN = 8
UPSTREAM_BLOCKED = 16
UPSTREAM_DRAINED = 32
UPSTREAM_CONNECTED = 64
UPSTREAM_PROGRESS = 128


class ClientIO:
    __slots__ = (
        "close_when_flushed",
        "closed",
        "eof",
        "fd",
        "m",
        "mask",
        "notes",
        "out",
        "r",
        "shut_pending",
        "sock",
        "timer_at",
        "up",
        "up_error",
    )

    def __init__(self, reactor: Reactor, sock: socket.socket) -> None:
        self.r = reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.m: Connection = None  # type: ignore[assignment]  # set right after
        self.out: list[bytes] = []
        """Bytes the socket did not take yet."""
        self.mask = _IN
        self.notes = 0
        self.timer_at = _INF
        """The deadline of this connection's live entry in the reactor's timer heap."""
        self.up: UpstreamIO | None = None
        self.up_error = 0
        self.eof = False
        self.closed = False
        self.shut_pending = False
        self.close_when_flushed = False

    # -- events from the reactor ---------------------------------------------------------------

    def on_event(self, events: int) -> None:
        if events & _OUT and self.out:
            self._flush()
        if events & ~_OUT and not self.eof and not self.closed:
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                self.eof = True
                self._set_mask(self.mask & ~_IN)
                self.m.client_closed(reset=True)
                data = None
            if data:
                self.m.client_data(data)
            elif data is not None:
                self.eof = True
                self._set_mask(self.mask & ~_IN)
                self.m.client_closed()
        if self.notes:
            self._deliver()
        if self.m.deadline < self.timer_at and not self.closed:
            self.r.schedule(self, self.m.deadline)

    def on_upstream_event(self, up: UpstreamIO, events: int) -> None:
        if up is not self.up:
            return
        if events == _IN and up.connected:
            # The usual case: the backend's answer (or the rest of it).
            try:
                data = up.sock.recv(RECV_SIZE)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.up_error = exc.errno or errno.ECONNRESET
                self.notes |= UPSTREAM_BROKEN
                data = None
            else:
                if data:
                    self.m.upstream_data(data)
                else:
                    self.r.set_mask(up, up.mask & ~_IN)
                    self.m.upstream_closed()
        else:
            self._upstream_event(up, events)
        if self.notes:
            self._deliver()
        if self.m.deadline < self.timer_at and not self.closed:
            self.r.schedule(self, self.m.deadline)

    def _upstream_event(self, up: UpstreamIO, events: int) -> None:
        """Connecting, writing a backlog, or reading while either happens."""
        if not up.connected:
            if not events & (_OUT | 0x018):  # OUT, ERR, HUP
                return
            code = up.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if up.sock else 0
            if code:
                up.connect_failed(self.r, code)
                return
            up.connected = True
            self.notes |= UPSTREAM_CONNECTED
        if events & _OUT and up.out:
            self._flush_upstream(up)
        elif up.mask & _OUT and not up.out:
            self.r.set_mask(up, up.mask & ~_OUT)
        if events & ~_OUT and not up.paused and up.sock is not None:
            try:
                data = up.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as exc:
                self.up_error = exc.errno or errno.ECONNRESET
                self.notes |= UPSTREAM_BROKEN
                data = None
            if data:
                self.m.upstream_data(data)
            elif data is not None:
                self.r.set_mask(up, up.mask & ~_IN)
                self.m.upstream_closed()

    def upstream_failed(self, up: UpstreamIO, code: int) -> None:
        """The connection could not be made (or broke before it carried a byte)."""
        if up is self.up:
            self.up_error = code
            self.notes |= UPSTREAM_BROKEN

    def settle(self) -> None:
        """Deliver what was noted during the machine's calls, then bring the timer up to
        date."""
        if self.notes:
            self._deliver()
        if self.m.deadline < self.timer_at and not self.closed:
            self.r.schedule(self, self.m.deadline)

    def _deliver(self) -> None:
        m = self.m
        while self.notes:
            notes = self.notes
            self.notes = 0
            if notes & CLIENT_BROKEN:
                m.client_closed(reset=True)
                continue
            up = self.up
            if notes & UPSTREAM_BROKEN and up is not None:
                before_write = up.written == 0
                m.upstream_closed(reset=True, before_write=before_write)
                continue
            if notes & UPSTREAM_CONNECTED:
                m.upstream_connected()
            if notes & UPSTREAM_BLOCKED:
                m.upstream_backlog(True)
            if notes & UPSTREAM_DRAINED:
                m.upstream_backlog(False)
            if notes & CLIENT_BLOCKED:
                m.client_backlog(True)
            if notes & CLIENT_DRAINED:
                m.client_backlog(False)

    # -- the transport the machine acts through ----------------------------------------------

    def send_client(self, data: bytes) -> None:
        if self.closed:
            return
        if self.out:
            self.out.append(data)
            return
        try:
            written = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError:
            self.notes |= CLIENT_BROKEN
            return
        if written < len(data):
            self.out.append(data[written:])
            self._set_mask(self.mask | _OUT)
            self.notes |= CLIENT_BLOCKED

    def shutdown_client(self) -> None:
        if self.out:
            self.shut_pending = True
            return
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close_client(self) -> None:
        if self.closed:
            return
        if self.out and not self.eof:
            # What the answer still has buffered goes out first (send_timeout bounds it).
            self.close_when_flushed = True
            self.r.schedule(self, self.r.now() + self.r.ctx.config.limits.send_timeout)
            return
        self._close_now()

    def pause_client(self, paused: bool) -> None:
        if self.eof or self.closed:
            return
        self._set_mask(self.mask & ~_IN if paused else self.mask | _IN)

    def open_upstream(self, backend: Backend, *, fresh: bool) -> UpstreamIO:
        up = self.r.ctx.pools[backend.url].lend(self.r, self, fresh=fresh)
        self.up = up
        return up

    def send_upstream(self, upstream: Upstream, data: bytes) -> None:
        up = cast(UpstreamIO, upstream)
        if up.out or not up.connected or up.sock is None:
            up.out.append(data)
            return
        if self._write_upstream(up, data):
            self.r.set_mask(up, up.mask | _OUT)
            self.notes |= UPSTREAM_BLOCKED

    def shutdown_upstream(self, upstream: Upstream) -> None:
        up = cast(UpstreamIO, upstream)
        if up.out:
            up.shut = True
            return
        if up.sock is not None:
            with contextlib.suppress(OSError):
                up.sock.shutdown(socket.SHUT_WR)

    def pause_upstream(self, upstream: Upstream, paused: bool) -> None:
        up = cast(UpstreamIO, upstream)
        if up.paused != paused and up.sock is not None:
            up.paused = paused
            self.r.set_mask(up, up.mask & ~_IN if paused else up.mask | _IN)

    def finish_upstream(
        self, upstream: Upstream, *, reusable: bool, ok: bool | None, failure: str | None
    ) -> None:
        up = cast(UpstreamIO, upstream)
        if up is self.up:
            self.up = None
        pool = up.pool
        if failure is not None or ok is False or (ok and pool.health.failures):
            self.r.upstream_outcome(pool, ok, failure)
        pool.give_back(self.r, up, reusable=reusable)

    def admit(self, check: Check) -> None:
        self.r.admission.start(self, check)

    def release_leases(self, leases: Sequence[object]) -> None:
        self.r.admission.release(leases)

    def notify_upstream(
        self, backend: Backend, target: bytes, headers: tuple[tuple[bytes, bytes], ...], body: bytes
    ) -> None:
        self.r.admission.notify(backend, target, headers, body)

    # -- inside ------------------------------------------------------------------------------------

    def _flush(self) -> None:
        data = b"".join(self.out)
        self.out.clear()
        try:
            written = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError:
            self.out.clear()
            if self.close_when_flushed:
                self._close_now()
            else:
                self.notes |= CLIENT_BROKEN
            return
        if written < len(data):
            self.out.append(data[written:])
            return
        self._set_mask(self.mask & ~_OUT)
        if self.close_when_flushed:
            self._close_now()
            return
        if self.shut_pending:
            self.shut_pending = False
            self.shutdown_client()
        self.notes |= CLIENT_DRAINED

    def _flush_upstream(self, up: UpstreamIO) -> None:
        data = b"".join(up.out)
        up.out.clear()
        if up.sock is None or self._write_upstream(up, data) is not False:
            return
        self.r.set_mask(up, up.mask & ~_OUT)
        if up.shut:
            up.shut = False
            self.shutdown_upstream(up)
        self.notes |= UPSTREAM_DRAINED

    def _write_upstream(self, up: UpstreamIO, data: bytes) -> bool | None:
        """Send ``data`` on ``up``'s socket and keep what it does not take in ``up.out``:
        True when bytes are left, False when all went, None when the socket broke."""
        assert up.sock is not None
        try:
            written = up.sock.send(data)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError as exc:
            self.up_error = exc.errno or errno.EPIPE
            self.notes |= UPSTREAM_BROKEN
            return None
        up.written += written
        if written < len(data):
            up.out.append(data[written:])
            return True
        return False

    def _set_mask(self, mask: int) -> None:
        if mask != self.mask and not self.closed:
            self.mask = mask
            self.r.modify(self.fd, mask)

    def _close_now(self) -> None:
        self.closed = True
        self.out.clear()
        self.r.client_closed(self)
        with contextlib.suppress(OSError):
            self.sock.close()
