"""PostgreSQL from Trio: the sync psycopg pool, driven from worker threads.

psycopg's async API is asyncio-only, so every database call runs a plain function
(``proxy.store.postgres``) in ``trio.to_thread.run_sync`` under a ``CapacityLimiter`` no
larger than the pool, so threads never queue inside psycopg. Only background tasks (the
snapshot poller, the audit writer) call it: nothing on the request path waits on it.

The pool is opened lazily and dropped after a failure, so an outage costs one fast
connection attempt per call instead of a pool that keeps reconnecting in the background.
``up`` and ``down_since`` say what the last call found, for metrics and ``/ready``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import trio
from psycopg_pool import ConnectionPool, PoolTimeout

from proxy.config import DatabaseConfig
from proxy.store import postgres as store

T = TypeVar("T")


class Database:
    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 2,
        connect_timeout: float = 3.0,
        call_timeout: float = 10.0,
        on_state_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.call_timeout = call_timeout
        self.pool_size = max(1, pool_size)
        self.connect_timeout = connect_timeout
        self.on_state_change = on_state_change
        self.limiter = trio.CapacityLimiter(self.pool_size)
        self.up: bool | None = None
        """None until the first call; then whether the last call reached PostgreSQL."""
        self.down_since: float | None = None
        """time.monotonic() of the first failure of the current outage."""
        self._pool: ConnectionPool | None = None
        self._lock = threading.Lock()

    def _get_pool(self) -> ConnectionPool:
        with self._lock:
            if self._pool is None:
                try:
                    self._pool = store.open_pool(
                        self.dsn,
                        min_size=1,
                        max_size=self.pool_size,
                        timeout=self.connect_timeout,
                        name="switchboard-worker",
                        # A server that stops answering (frozen, or a dead link) must
                        # fail the connection, not hang a thread forever.
                        keepalives=1,
                        keepalives_idle=5,
                        keepalives_interval=2,
                        keepalives_count=3,
                        tcp_user_timeout=round(self.call_timeout * 1000),
                    )
                except PoolTimeout:
                    raise store.StoreUnavailable(
                        f"cannot connect to PostgreSQL at {store.describe_dsn(self.dsn)}"
                    ) from None
            return self._pool

    def _drop_pool(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=0)

    def _call(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        pool = self._get_pool()
        try:
            with pool.connection(timeout=self.connect_timeout) as conn:
                return fn(conn)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            self._drop_pool()
            raise store.StoreUnavailable(
                f"PostgreSQL at {store.describe_dsn(self.dsn)}: {exc}".splitlines()[0]
            ) from None
        except psycopg.Error as exc:
            # Reached PostgreSQL, which refused (a missing GRANT, a schema older than
            # this version): an operator's problem to report, not an outage.
            raise store.StoreError(f"PostgreSQL refused: {exc}".splitlines()[0]) from None

    async def run(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``fn(conn)`` on a pooled connection in a worker thread; StoreUnavailable when
        PostgreSQL (or PgBouncer) cannot be reached or does not answer within
        ``call_timeout``; StoreError when it refuses. A cancelled caller abandons the
        thread (it finishes on its own, bounded by the TCP timeouts)."""
        with trio.move_on_after(self.call_timeout):
            try:
                result = await trio.to_thread.run_sync(
                    self._call, fn, limiter=self.limiter, abandon_on_cancel=True
                )
            except store.StoreUnavailable:
                self._set_up(False)
                raise
            self._set_up(True)
            return result
        # A server that hangs rather than refuses: the thread is abandoned (it ends when
        # the TCP timeouts fire) and PostgreSQL counts as down.
        self._set_up(False)
        raise store.StoreUnavailable(
            f"PostgreSQL at {store.describe_dsn(self.dsn)} did not answer "
            f"within {self.call_timeout:g} s"
        )

    def _set_up(self, up: bool) -> None:
        if up == self.up:
            return
        self.up = up
        self.down_since = None if up else time.monotonic()
        if self.on_state_change is not None:
            self.on_state_change(up)

    def close(self) -> None:
        self._drop_pool()


READY_PROBE_TIMEOUT = 1.0
"""Seconds the readiness probe waits for PostgreSQL: a hung server (frozen, or a dead
link behind a live PgBouncer) counts as down this soon, not after the workers' longer
call timeout."""


async def watch_for_readiness(
    get_config: Callable[[], DatabaseConfig], set_degraded: Callable[[str | None], None]
) -> None:
    """The supervisor's own check of the control-plane database, for ``/ready``: degraded
    once PostgreSQL has not answered for ``ready_grace`` seconds (workers keep serving
    their snapshot either way; the point is to let a load balancer prefer healthy hosts).

    A probe (``SELECT version FROM config_version``) every ``poll_interval``, each given
    ``READY_PROBE_TIMEOUT``: /ready turns 503 at most ``ready_grace + poll_interval +
    READY_PROBE_TIMEOUT`` seconds after PostgreSQL stops answering, and never sooner than
    ``ready_grace`` after the last answer."""
    db: Database | None = None
    last_answer = time.monotonic()
    while True:
        config = get_config()
        if not config.url or not config.ready_grace:
            set_degraded(None)
        else:
            if db is None or db.dsn != config.url:
                if db is not None:
                    db.close()
                probe_timeout = min(config.connect_timeout, READY_PROBE_TIMEOUT)
                db = Database(
                    config.url,
                    pool_size=1,
                    connect_timeout=probe_timeout,
                    call_timeout=probe_timeout,
                )
                last_answer = time.monotonic()
            try:
                await db.run(store.current_version)
                answered = True
            except store.StoreUnavailable:
                answered = False
            except store.StoreError:
                answered = True  # schema problems are the workers' to report
            now = time.monotonic()
            if answered:
                last_answer = now
                set_degraded(None)
            elif now - last_answer >= config.ready_grace:
                set_degraded(f"PostgreSQL has not answered for {round(now - last_answer)} s")
        await trio.sleep(config.poll_interval)
