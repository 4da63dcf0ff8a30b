"""Global connection caps over Redis, with the per-worker fallback (``proxy.conncaps``).

One ``ConnectionCaps`` per worker: ``run`` in the worker's nursery keeps its owner id
alive in Redis and writes its counts back; ``acquire`` and ``release`` wrap each
connection. ``acquire`` never waits longer than the Redis client's command timeout: on
any failure it decides locally, by the fail mode, at once. Recovery needs nothing: the
next acquisition after the client reconnects goes to Redis again, and the heartbeat
(which polls quickly while Redis is away) re-registers the owner and re-writes every
count the moment Redis is back, a restarted, empty Redis included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Final

import trio

from proxy.conncaps import (
    OWNERS_KEY,
    SCRIPTS,
    CapDecision,
    FailMode,
    Lease,
    LocalConnectionCounts,
    batches,
    hash_ttl,
    ip_scope,
    new_owner_id,
    parse_acquire_reply,
    scope_key,
    tenant_scope,
)
from proxy.store.redis import Arg, RedisClient, RedisError, RedisUnavailable

__all__ = ["CapDecision", "ConnectionCaps", "Lease", "ip_scope", "tenant_scope"]

RETRY_INTERVAL: Final = 0.1
"""Seconds between heartbeat attempts while Redis is away: recovery is noticed this fast."""
SHUTDOWN_TIMEOUT: Final = 2.0
"""Seconds ``aclose`` may spend removing this worker's counts from Redis."""

_REDIS_ERRORS = (RedisUnavailable, RedisError)


class ConnectionCaps:
    """Concurrent-connection caps shared by every worker through Redis (None: local only)."""

    def __init__(
        self,
        redis: RedisClient | None,
        *,
        fail_mode: FailMode,
        workers: int,
        lease_ttl: float = 15.0,
        log: Any,
        on_decision: Callable[[CapDecision], None] | None = None,
        owner: str | None = None,
    ) -> None:
        if lease_ttl <= 0:
            raise ValueError("lease_ttl must be positive")
        self.redis = redis
        self.lease_ttl = lease_ttl
        self.log = log
        self.on_decision = on_decision
        self.owner = owner or new_owner_id()
        self.local = LocalConnectionCounts(fail_mode, workers)
        self._lease_ttl_ms = max(1, math.ceil(lease_ttl * 1000))
        self._hash_ttl_ms = math.ceil(hash_ttl(lease_ttl) * 1000)
        self._shas: dict[str, str] = {}
        self._wake = trio.Event()
        self._closed = False
        self._outage = False  # Redis was last seen unreachable (or failing)
        self._beats = 0

    @property
    def heartbeat_interval(self) -> float:
        return self.lease_ttl / 3

    # -- per connection ---------------------------------------------------------------

    async def acquire(self, scope: str, limit: int) -> Lease | CapDecision:
        """A lease when the scope is under ``limit``, else the refusing decision."""
        if limit < 1:
            raise ValueError(f"a connection cap must be at least 1, not {limit}")
        decision = None
        redis = self.redis
        if redis is not None and redis.available and not self._closed:
            decision = await self._acquire_remote(redis, scope, limit)
        if decision is None:
            if self.redis is not None and not self._closed:
                self._note_outage("acquire")
            decision = self.local.acquire_local(scope, limit)
        else:
            self._note_up()
        if self.on_decision is not None:
            self.on_decision(decision)
        if decision.allowed:
            return Lease(scope, decision.limit, decision.source, decision.count)
        return decision

    async def release(self, lease: Lease) -> None:
        """Give a lease back. Safe in ``finally`` under cancellation; never raises."""
        if lease.released:
            return
        lease.released = True
        try:
            if not self.local.release(lease.scope):
                return  # never in Redis, or Redis is overwritten soon (dirty scope)
            redis = self.redis
            if redis is None or self._closed or not redis.available:
                self.local.mark_dirty(lease.scope)
                return
            done = False
            # Shielded: the connection's task is usually being cancelled right now, and
            # a lease left in Redis would hold its slot until this worker dies.
            with trio.CancelScope(shield=True), trio.move_on_after(redis.command_timeout):
                try:
                    sha = await self._sha(redis, "release")
                    left = await redis.evalsha(sha, [scope_key(lease.scope)], [self.owner])
                    done = True
                    if int(left) < 0:  # nothing to take off: Redis lost this owner's count
                        self._lost_state()
                except _REDIS_ERRORS:
                    pass
            if not done:
                self.local.mark_dirty(lease.scope)  # it may or may not have run
        except Exception as exc:  # a release must never fail the connection's teardown
            self.local.mark_dirty(lease.scope)
            self.log.error("conncaps_release_failed", scope=lease.scope, error=repr(exc))

    async def _acquire_remote(
        self, redis: RedisClient, scope: str, limit: int
    ) -> CapDecision | None:
        """Redis's decision, or None to decide locally."""
        # One budget for the whole call: evalsha may need a second round trip (NOSCRIPT).
        with trio.move_on_after(redis.command_timeout):
            try:
                sha = await self._sha(redis, "acquire")
                write = self.local.begin_remote(scope)
                try:
                    reply = await redis.evalsha(
                        sha,
                        [scope_key(scope), OWNERS_KEY],
                        [
                            self.owner,
                            limit,
                            *write.args(),
                            self._lease_ttl_ms,
                            self._hash_ttl_ms,
                        ],
                    )
                    allowed, count, present = parse_acquire_reply(reply)
                except BaseException:
                    self.local.finish_remote(write, None)
                    raise
                self.local.finish_remote(write, allowed)
                if not present:
                    self._lost_state()
                return CapDecision(allowed, scope, limit, count, "redis")
            except (*_REDIS_ERRORS, ValueError) as exc:
                if not isinstance(exc, RedisUnavailable):  # not an outage: worth a line
                    self.log.error("conncaps_redis_error", scope=scope, error=repr(exc))
        return None

    # -- heartbeat --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep this owner alive in Redis and its counts right, until ``aclose``."""
        task_status.started()
        while not self._closed:
            ok = await self._heartbeat()
            with trio.move_on_after(self.heartbeat_interval if ok else RETRY_INTERVAL):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _heartbeat(self) -> bool:
        """Refresh the owner and write every scope's count back; False if Redis is away."""
        redis = self.redis
        if redis is None or self._closed:
            return True
        if not redis.available:
            self._note_outage("heartbeat")
            return False
        try:
            for name in SCRIPTS:  # loaded ahead, so acquisitions need a single round trip
                await self._sha(redis, name)
            # Every scope is written each beat: expiries stay fresh, unsynced leases reach
            # Redis, and fields Redis lost (restart, flush, this owner deemed dead) come
            # back within one interval even where nothing is acquired.
            for i, chunk in enumerate(batches(self.local.scopes())):
                present = await self._sync(redis, chunk)
                if i == 0 and not present and self._beats:
                    self.log.warning("conncaps_owner_reregistered", owner=self.owner)
        except _REDIS_ERRORS as exc:
            self._note_outage("heartbeat", exc)
            return False
        self._beats += 1
        self._note_up()
        return True

    async def _sync(self, redis: RedisClient, scopes: Sequence[str]) -> bool:
        """Write this worker's absolute counts for ``scopes``; whether the owner was alive."""
        writes = self.local.begin_sync(scopes)
        args: list[Arg] = [self.owner, self._lease_ttl_ms, self._hash_ttl_ms]
        for write in writes:
            args += write.args()
        try:
            present = await redis.evalsha(
                self._shas["sync"], [OWNERS_KEY, *(scope_key(w.scope) for w in writes)], args
            )
        except BaseException:
            self.local.end_sync(writes, ok=False)
            raise
        self.local.end_sync(writes, ok=True)
        return bool(present)

    def _note_outage(self, where: str, error: BaseException | None = None) -> None:
        if self._outage:
            return
        self._outage = True
        self.log.warning(
            "conncaps_redis_unavailable",
            where=where,
            fail_mode=self.local.fail_mode,
            error=None if error is None else repr(error),
        )

    def _note_up(self) -> None:
        if self._outage:
            self._outage = False
            self.log.info("conncaps_redis_restored")

    def _lost_state(self) -> None:
        """Redis lost this owner (restart, flush, or it was deemed dead): a heartbeat now
        writes its counts back in every scope, not only in the next one acquired in."""
        self._wake.set()

    async def _sha(self, redis: RedisClient, name: str) -> str:
        sha = self._shas.get(name)
        if sha is None:
            # script_load also lets evalsha re-send the source after a Redis restart.
            sha = self._shas[name] = await redis.script_load(SCRIPTS[name])
        return sha

    # -- shutdown ---------------------------------------------------------------------

    async def aclose(self) -> None:
        """Remove this owner and all its counts from Redis (graceful exit); never raises.

        Leases still open are then counted only locally.
        """
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        redis = self.redis
        if redis is None or not redis.available:
            return  # the owner's deadline runs out on its own
        with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_TIMEOUT):
            try:
                sha = await self._sha(redis, "depart")
                for chunk in batches(self.local.scopes()):
                    keys = [OWNERS_KEY, *(scope_key(s) for s in chunk)]
                    await redis.evalsha(sha, keys, [self.owner])
            except _REDIS_ERRORS as exc:
                self.log.warning("conncaps_depart_failed", error=repr(exc))
