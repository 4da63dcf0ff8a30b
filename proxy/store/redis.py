"""Redis from Trio: a small multiplexed, pipelined RESP client on trio sockets.

redis-py's async client is asyncio-only, and sync redis-py in threads measured 10-30x
slower, so this speaks RESP2 itself: ``hiredis.pack_command`` encodes, ``hiredis.Reader``
parses. One connection per worker carries every task's commands: ``execute`` appends the
encoded command to an outgoing buffer and a slot to a FIFO of pending replies; a single
writer flushes whatever accumulated in one send (pipelining), a single reader hands each
reply to the oldest slot. Redis answers in order, so the FIFO is the whole protocol.

Failure rules (DESIGN §5): the request path never waits on a dead Redis. While the
connection is down ``execute`` raises ``RedisUnavailable`` at once; ``run`` reconnects
forever with jittered exponential back-off. A command slower than its timeout raises
``RedisTimeout`` but keeps its slot, so its late reply is read and dropped and the FIFO
stays in sync; if the oldest reply is overdue by ``stall_timeout`` the connection is
deemed hung and is replaced.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

import hiredis
import trio

RECV_SIZE: Final = 65536
BACKOFF_MIN: Final = 0.05
BACKOFF_MAX: Final = 2.0


def next_delay(delay: float) -> float:
    """The reconnect back-off after ``delay``: doubled, up to BACKOFF_MAX."""
    return min(delay * 2, BACKOFF_MAX)


def jittered(delay: float) -> float:
    """Half to all of ``delay``: many workers do not reconnect in lockstep."""
    return random.uniform(delay / 2, delay)


Arg = bytes | str | int | float


class RedisError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-WRONGTYPE ...``, ``-NOSCRIPT ...``)."""


class RedisUnavailable(Exception):
    """No reply could be had: not connected, or the connection was lost meanwhile."""


class RedisTimeout(RedisUnavailable):
    """The reply did not come within the command timeout."""


# Must differ from every possible reply: None is a nil reply, False is hiredis' default.
_NOT_ENOUGH: Final = object()
_CONNECTION_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    hiredis.ProtocolError,
    RedisError,
    RedisUnavailable,
)


class _Slot:
    """One command awaiting its reply; it stays queued even if its caller gave up."""

    __slots__ = ("done", "error", "result", "sent_at")

    def __init__(self, sent_at: float) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.sent_at = sent_at


class RedisClient:
    """One multiplexed connection to Redis; start ``run`` in a nursery, then ``execute``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        password: str | None = None,
        command_timeout: float = 0.25,
        connect_timeout: float = 1.0,
        stall_timeout: float = 3.0,
        on_state_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.db = db
        self.password = password
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self.on_state_change = on_state_change
        self._up = False
        self._connected = False  # socket open (handshake may still be running)
        self._pending: deque[_Slot] = deque()
        self._outgoing: list[bytes] = []
        self._wake_writer = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._lost: BaseException | None = None
        self._expired = 0  # how many slots at the head of _pending already timed out
        self._reached_up = False
        self._on_ready: Callable[[], None] | None = None  # run()'s task_status.started
        self._scripts: dict[str, str] = {}  # sha1 -> source, for the NOSCRIPT fallback

    @property
    def available(self) -> bool:
        """True while connected and authenticated; commands fail fast otherwise."""
        return self._up

    async def execute(self, *args: Arg) -> Any:
        """Send one command and return its reply (bytes, int, None, list...).

        A caller may also give up sooner under its own cancel scope: the command's slot
        stays queued all the same and its reply is dropped when it comes.
        """
        if not self._up:
            raise RedisUnavailable("redis is not connected")
        return await self._call(args)

    async def script_load(self, script: str) -> str:
        """``SCRIPT LOAD`` a Lua script; remembered so ``evalsha`` can resend it."""
        sha = str((await self.execute("SCRIPT", "LOAD", script)).decode())
        self._scripts[sha] = script
        return sha

    def register_script(self, script: str) -> str:
        """A script's SHA1, remembered so ``evalsha`` can send it when Redis lacks it
        (no round trip now: the first EVALSHA's NOSCRIPT is answered by one EVAL)."""
        sha = hashlib.sha1(script.encode()).hexdigest()
        self._scripts[sha] = script
        return sha

    async def evalsha(self, sha: str, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """``EVALSHA``; on NOSCRIPT (Redis restarted or flushed) ``EVAL`` the known source.

        ``EVAL`` also caches the script in Redis, so the next ``EVALSHA`` hits again.
        """
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except RedisError as exc:
            script = self._scripts.get(sha)
            if script is None or not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.execute("EVAL", script, len(keys), *keys, *args)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connection manager: connect, serve, and on any loss reconnect, forever.

        ``started`` is signalled after the first attempt whatever its outcome, so a worker
        starts even when Redis is down (it then runs degraded, DESIGN §5).
        """
        delay = BACKOFF_MIN
        self._on_ready = task_status.started
        while True:
            self._reached_up = False
            try:
                stream = await self._connect()
            except _CONNECTION_ERRORS as exc:
                self._drop(exc)
            else:
                await self._serve(stream)
            self._fail_pending(self._lost)
            if self._on_ready is not None:  # first attempt failed: start degraded
                ready, self._on_ready = self._on_ready, None
                ready()
            if self._reached_up:
                delay = BACKOFF_MIN  # a connection that worked earns a quick first retry
            await trio.sleep(jittered(delay))
            delay = next_delay(delay)

    # -- connection internals -------------------------------------------------------

    async def _connect(self) -> trio.SocketStream:
        self._lost = None
        with trio.move_on_after(self.connect_timeout):
            # open_tcp_stream sets TCP_NODELAY: small pipelined writes must not wait.
            return await trio.open_tcp_stream(self.host, self.port)
        raise RedisTimeout("timed out connecting to redis")

    async def _serve(self, stream: trio.SocketStream) -> None:
        """Run reader, writer and handshake until one of them loses the connection."""
        async with stream, trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            self._connected = True
            nursery.start_soon(self._guard, self._write_loop, stream)
            nursery.start_soon(self._guard, self._read_loop, stream)
            nursery.start_soon(self._guard, self._timeout_loop)
            nursery.start_soon(self._guard, self._handshake)
        self._scope = None

    async def _guard(self, fn: Callable[..., Any], *args: Any) -> None:
        # Children record why the connection died and end the connection, instead of
        # raising: exception groups would otherwise wrap every ordinary disconnect.
        try:
            await fn(*args)
        except _CONNECTION_ERRORS as exc:
            self._drop(exc)

    def _drop(self, exc: BaseException) -> None:
        """Mark the connection dead now (fail fast from here on) and end it."""
        self._connected = False
        self._set_up(False)
        if self._lost is None:
            self._lost = exc
        if self._scope is not None:
            self._scope.cancel()

    async def _handshake(self) -> None:
        if self.password is not None:
            await self._call(("AUTH", self.password))
        if self.db:
            await self._call(("SELECT", self.db))
        await self._call(("PING",))  # e.g. -LOADING fails here
        self._reached_up = True
        self._set_up(True)
        if self._on_ready is not None:
            ready, self._on_ready = self._on_ready, None
            ready()

    async def _write_loop(self, stream: trio.SocketStream) -> None:
        while True:
            await self._wake_writer.wait()
            # A fresh event before draining: commands added during send_all wake us again.
            self._wake_writer = trio.Event()
            while self._outgoing:
                data = b"".join(self._outgoing)
                self._outgoing.clear()
                await stream.send_all(data)

    async def _read_loop(self, stream: trio.SocketStream) -> None:
        reader = hiredis.Reader(replyError=RedisError, notEnoughData=_NOT_ENOUGH)
        while True:
            data = await stream.receive_some(RECV_SIZE)
            if not data:
                raise RedisUnavailable("redis closed the connection")
            reader.feed(data)
            while (reply := reader.gets()) is not _NOT_ENOUGH:
                if not self._pending:
                    raise RedisUnavailable("unsolicited reply from redis")
                slot = self._pending.popleft()
                if self._expired:  # its caller already got RedisTimeout: drop the reply
                    self._expired -= 1
                    continue
                if isinstance(reply, RedisError):
                    slot.error = reply
                else:
                    slot.result = reply
                slot.done.set()  # nobody waits if the caller was cancelled: reply dropped

    async def _timeout_loop(self) -> None:
        # Every command has the same timeout and joins the FIFO in time order, so the
        # deadlines are ordered too and the expired slots are always a prefix of the FIFO:
        # one task expires them, cheaper than a cancel scope per command (~30% of its CPU).
        while True:
            now = trio.current_time()
            wake = now + self.command_timeout
            while self._expired < len(self._pending):
                slot = self._pending[self._expired]
                if slot.sent_at + self.command_timeout > now:
                    wake = slot.sent_at + self.command_timeout
                    break
                slot.error = RedisTimeout(f"no reply within {self.command_timeout:g}s")
                slot.done.set()
                self._expired += 1
            if self._pending and now - self._pending[0].sent_at > self.stall_timeout:
                raise RedisTimeout("redis stopped answering")  # hung: replace the connection
            await trio.sleep_until(wake)

    async def _call(self, args: tuple[Arg, ...]) -> Any:
        if not self._connected:
            raise RedisUnavailable("redis is not connected")
        slot = _Slot(trio.current_time())
        # Buffer and FIFO are appended together, with no checkpoint in between, so
        # the order of commands on the wire is the order of slots.
        self._outgoing.append(hiredis.pack_command(args))  # type: ignore[arg-type]  # stub: 1-tuple
        self._pending.append(slot)
        self._wake_writer.set()
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _fail_pending(self, cause: BaseException | None) -> None:
        self._outgoing.clear()
        self._expired = 0
        while self._pending:
            slot = self._pending.popleft()
            slot.error = RedisUnavailable(f"redis connection lost: {cause!r}")
            slot.done.set()

    def _set_up(self, up: bool) -> None:
        if up == self._up:
            return
        self._up = up
        if self.on_state_change is not None:
            self.on_state_change(up)
