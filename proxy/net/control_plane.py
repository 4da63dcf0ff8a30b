"""A worker's view of the control plane: snapshot, credentials, limits, caps, audit.

Background tasks keep it current; the request path only reads what they leave in memory:

- the snapshot poller asks PostgreSQL (through ``Database``, in threads) for the
  config_version row every ``database.poll_interval``, reloads the snapshot when it moved,
  persists it to ``state_dir/snapshot.json`` and installs the keys and routes. A worker
  that starts while PostgreSQL is down serves from the persisted file;
- the Redis client (``proxy.store.redis``) reconnects by itself; a rate-limit decision
  is one EVALSHA at most, after a local pre-check, and falls back to per-worker buckets
  at once while Redis is away;
- the JWKS refresher re-reads the key set (file or URL) when it is due;
- connection caps (``proxy.net.conncaps``) and the audit sink (``proxy.net.audit_sink``)
  run their own loops.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from proxy.admission import Buckets
from proxy.auth import HMAC_ALGORITHMS, JwksCache, JwtVerifier, KeyTable
from proxy.config import Config, RouteConfig, parse_backend_url, parse_redis_url
from proxy.metrics import metrics
from proxy.net.audit_sink import AuditSink
from proxy.net.conncaps import ConnectionCaps
from proxy.net.database import Database
from proxy.net.upstream import Addresses, resolve
from proxy.ratelimit import GCRA_LUA, Decision, LocalLimiter, combine, parse_reply, script_args
from proxy.snapshot import (
    Snapshot,
    key_table,
    merged_routes,
    snapshot_from_json,
    snapshot_to_json,
)
from proxy.store import postgres as store
from proxy.store.redis import RedisClient, RedisError, RedisUnavailable

SNAPSHOT_FILE = "snapshot.json"
SNAPSHOT_LOCK = ".snapshot.lock"
JWKS_CHECK_INTERVAL = 10.0


class ControlPlane:
    def __init__(
        self,
        config: Config,
        worker_id: int,
        workers: int,
        log: Any,
        on_routes: Callable[[tuple[RouteConfig, ...], Addresses], None],
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self._worker_label = str(worker_id)
        self.workers = max(1, workers)
        self.log = log
        self.on_routes = on_routes
        self.keys = KeyTable()
        self.auth_header = config.auth.header.lower().encode("ascii")
        self.snapshot: Snapshot | None = None
        self.jwt = self._jwt_verifier()
        self.limiter = LocalLimiter(config.rate_limits.local_max_keys)
        db = config.database
        self.state_dir = Path(db.state_dir) if db.url else None
        self.db: Database | None = None
        if db.url:
            self.db = Database(
                db.url,
                pool_size=db.pool_size,
                connect_timeout=db.connect_timeout,
                call_timeout=db.connect_timeout + db.statement_timeout,
                on_state_change=self._postgres_state,
            )
        self.redis: RedisClient | None = None
        self._gcra_sha = ""
        if config.redis.url:
            host, port, number, password = parse_redis_url(config.redis.url)
            self.redis = RedisClient(
                host,
                port,
                db=number,
                password=password,
                command_timeout=config.redis.command_timeout,
                on_state_change=self._redis_state,
            )
            self._gcra_sha = self.redis.register_script(GCRA_LUA)
            metrics().redis_up.labels(self._worker_label).set(0)
        rl = config.rate_limits
        self.rate_limited = bool(db.url or rl.per_ip or rl.per_key or rl.per_tenant or rl.per_tool)
        """Whether any request can be under a rate limit (keys may carry their own)."""
        self.caps: ConnectionCaps | None = None
        if rl.max_connections_per_ip or rl.max_connections_per_tenant or db.url:
            # Tenants may set their own cap in the database, so caps exist with a database.
            self.caps = ConnectionCaps(
                self.redis,
                # Without Redis there is nothing to fail: every worker counts its own.
                fail_mode=config.redis.fail_mode if self.redis is not None else "open",
                workers=self.workers,
                lease_ttl=rl.connection_lease_ttl,
                log=log,
            )
        self.audit: AuditSink | None = None
        if db.url and db.audit and self.state_dir is not None:
            self.audit = AuditSink(
                self.db,
                spill_dir=self.state_dir / "audit",
                worker_tag=f"{worker_id}-{os.getpid()}",
                batch_size=db.audit_batch_size,
                flush_interval=db.audit_flush_interval,
                max_buffer=db.audit_max_buffer,
                log=log,
                on_count=lambda outcome, n: metrics().audit_records.labels(outcome).inc(n),
            )

    # -- start and stop ---------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Load the first snapshot (database, else the persisted file) and start the
        background tasks; returns once the worker can serve."""
        if self.state_dir is not None:
            try:
                await trio.to_thread.run_sync(
                    partial(self.state_dir.mkdir, parents=True, exist_ok=True)
                )
            except OSError as exc:
                self.log.error("state_dir_unusable", path=str(self.state_dir), error=str(exc))
        if self.db is not None:
            with trio.move_on_after(self.config.database.connect_timeout + 2):
                await self.refresh()
            if self.snapshot is None:
                await self._load_persisted()
            nursery.start_soon(self._poll_forever)
        if self.redis is not None:
            # Started after its first connection attempt, so a new worker's first
            # requests already have Redis (or know it is down).
            await nursery.start(self.redis.run)
        if self.caps is not None:
            await nursery.start(self.caps.run)
        if self.audit is not None:
            await nursery.start(self.audit.run)
        if self.jwt is not None and self.jwt.jwks is not None:
            nursery.start_soon(self._refresh_jwks_forever, self.jwt.jwks)

    async def close(self) -> None:
        """On shutdown: flush (or spill) the audit records, give back connection leases."""
        with trio.CancelScope(shield=True):
            if self.audit is not None:
                await self.audit.close(timeout=self.config.database.connect_timeout + 2)
            if self.caps is not None:
                with trio.move_on_after(1.0):
                    await self.caps.aclose()
        if self.db is not None:
            self.db.close()

    # -- the snapshot -------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Reload the snapshot if config_version moved; log (once per outage) if not."""
        db = self.db
        assert db is not None
        try:
            version = await db.run(store.current_version)
            if self.snapshot is not None and version == self.snapshot.version:
                return
            timeout_ms = round(self.config.database.statement_timeout * 1000)
            snapshot = await db.run(partial(store.load_snapshot, statement_timeout_ms=timeout_ms))
            if await self._install(snapshot, source="database"):
                await self._persist(snapshot)
        except store.StoreUnavailable:
            return  # _postgres_state logged it
        except store.StoreError as exc:
            self.log.error("snapshot_failed", error=str(exc))
        except Exception:
            # A bad row or a bug must cost one poll, never the worker: the last good
            # snapshot keeps serving.
            self.log.exception("snapshot_failed")

    async def _poll_forever(self) -> None:
        while True:
            await trio.sleep(self.config.database.poll_interval)
            await self.refresh()

    async def _install(self, snapshot: Snapshot, source: str) -> bool:
        """Derive the key table and routes (in a thread: a large snapshot must not stall
        the loop), resolve new backends, then swap them in; False if it was not
        installed (older than the one served)."""
        previous = self.snapshot
        if previous is not None and snapshot.version < previous.version:
            return False
        addresses: Addresses = {}
        keys, (routes, problems) = await trio.to_thread.run_sync(
            lambda: (key_table(snapshot), merged_routes(self.config.routes, snapshot))
        )
        if previous is None or previous.routes != snapshot.routes:
            routes, unresolved, addresses = await trio.to_thread.run_sync(resolve_routes, routes)
            problems += unresolved
        for problem in problems:
            self.log.warning("snapshot_route_skipped", problem=problem)
        self.snapshot = snapshot
        self.keys = keys
        metrics().snapshot_version.labels(self._worker_label).set(snapshot.version)
        if previous is None or previous.routes != snapshot.routes:
            self.on_routes(routes, addresses)
        self.log.info(
            "snapshot_installed",
            version=snapshot.version,
            source=source,
            keys=len(snapshot.keys),
            routes=len(snapshot.routes),
        )
        return True

    async def _persist(self, snapshot: Snapshot) -> None:
        state_dir = self.state_dir
        if state_dir is None:
            return
        path = state_dir / SNAPSHOT_FILE

        def write() -> None:
            # Workers write the same file: under a lock, and only forward, so a slow
            # worker never replaces a newer snapshot (a revoked key) with an older one.
            # Each writes a temporary file and renames it: a reader sees a whole file.
            with open(state_dir / SNAPSHOT_LOCK, "a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    current = snapshot_from_json(path.read_bytes()).version
                except (OSError, ValueError):
                    current = -1
                if current >= snapshot.version:
                    return
                tmp = path.with_name(f".{SNAPSHOT_FILE}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    f.write(snapshot_to_json(snapshot))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)

        try:
            await trio.to_thread.run_sync(write)
        except OSError as exc:
            self.log.error("snapshot_persist_failed", path=str(path), error=str(exc))

    async def _load_persisted(self) -> None:
        assert self.state_dir is not None
        path = self.state_dir / SNAPSHOT_FILE
        try:
            data = await trio.to_thread.run_sync(path.read_bytes)
            snapshot = snapshot_from_json(data)
        except FileNotFoundError:
            self.log.error(
                "no_snapshot",
                reason="PostgreSQL unreachable and no persisted snapshot",
                path=str(path),
            )
            return
        except (OSError, ValueError) as exc:
            self.log.error("snapshot_file_unusable", path=str(path), error=str(exc))
            return
        await self._install(snapshot, source="file")

    def _postgres_state(self, up: bool) -> None:
        metrics().postgres_up.labels(self._worker_label).set(1 if up else 0)
        if up:
            self.log.info("postgres_up")
        else:
            self.log.error(
                "postgres_down",
                database=store.describe_dsn(self.config.database.url),
                serving_snapshot=self.snapshot.version if self.snapshot else None,
            )

    # -- rate limits ----------------------------------------------------------------------------

    def _redis_state(self, up: bool) -> None:
        metrics().redis_up.labels(self._worker_label).set(1 if up else 0)
        if up:
            self.log.info("redis_up")
        else:
            self.log.error(
                "redis_down",
                fail_mode=self.config.redis.fail_mode,
                fallback="per-worker limits",
            )

    async def rate_limit(self, buckets: Buckets) -> Decision:
        """One decision for all of a request's buckets: the local pre-check, then one
        EVALSHA, or the local fallback while Redis is unreachable."""
        counter = metrics().rate_limit_decisions
        now = time.time_ns() // 1000
        refused = self.limiter.precheck(buckets.keys, now)
        if refused is not None:
            counter.labels("limited", "precheck").inc()
            return refused
        redis = self.redis
        if redis is not None and redis.available:
            try:
                # Redis's own clock (ARGV[1] empty): every proxy shares one time base.
                reply = await redis.evalsha(
                    self._gcra_sha, buckets.keys, script_args(buckets.rates)
                )
                decisions = parse_reply(reply, buckets.rates)
            except (RedisUnavailable, RedisError, ValueError) as exc:
                self.log.warning("rate_limit_redis_failed", error=str(exc) or type(exc).__name__)
            else:
                self.limiter.record(buckets.keys, decisions, now)
                decision = combine(decisions)
                counter.labels(_result(decision), "redis").inc()
                return decision
        mode = self.config.redis.fail_mode if redis is not None else "open"
        decision = self.limiter.check(buckets.keys, buckets.rates, now, mode)
        counter.labels(_result(decision), "local").inc()
        return decision

    # -- JWT ------------------------------------------------------------------------------------

    def _jwt_verifier(self) -> JwtVerifier | None:
        auth = self.config.auth
        if not auth.jwt_algorithms:
            return None
        algorithms = frozenset(auth.jwt_algorithms)
        jwks = None
        if algorithms - HMAC_ALGORITHMS:
            document: dict[str, Any] = {"keys": []}
            if auth.jwt_jwks_file:
                document = _read_jwks_file(auth.jwt_jwks_file)
            jwks = JwksCache(document, time.time(), max_age=auth.jwt_jwks_max_age)
            if auth.jwt_jwks_url:
                jwks.fetched_at = -float("inf")  # fetch at once
        return JwtVerifier(
            algorithms=algorithms,
            hs_secret=auth.jwt_secret.encode() or None,
            jwks=jwks,
            audience=auth.jwt_audience or None,
            issuer=auth.jwt_issuer or None,
            leeway=auth.jwt_leeway,
            tenant_claim=auth.jwt_tenant_claim,
        )

    async def _refresh_jwks_forever(self, jwks: JwksCache) -> None:
        while True:
            if jwks.needs_refresh(time.time()):
                await self._refresh_jwks(jwks)
            await trio.sleep(JWKS_CHECK_INTERVAL)

    async def _refresh_jwks(self, jwks: JwksCache) -> None:
        auth = self.config.auth
        try:
            if auth.jwt_jwks_url:
                document = await trio.to_thread.run_sync(
                    _fetch_jwks_url, auth.jwt_jwks_url, abandon_on_cancel=True
                )
            else:
                document = await trio.to_thread.run_sync(_read_jwks_file, auth.jwt_jwks_file)
            fresh = JwksCache(document, time.time())
        except Exception as exc:  # any fetch or parse failure: keep the keys we have
            self.log.warning("jwks_refresh_failed", error=str(exc) or type(exc).__name__)
            jwks.fetched_at = time.time() - jwks.max_age + jwks.min_refresh
            return
        if not fresh.keys and jwks.keys:
            # An error page or an empty set must not log everyone out.
            self.log.warning("jwks_refresh_failed", error="no usable keys; keeping the old")
            jwks.fetched_at = time.time() - jwks.max_age + jwks.min_refresh
            return
        jwks.update(document, time.time())
        self.log.info("jwks_refreshed", keys=len(jwks.keys))


def resolve_routes(
    routes: tuple[RouteConfig, ...],
) -> tuple[tuple[RouteConfig, ...], list[str], Addresses]:
    """Resolve every backend (blocking: run it in a thread); a route with a backend that
    does not resolve is left out, with the reason, rather than installed half-working."""
    addresses: Addresses = {}
    kept: list[RouteConfig] = []
    problems: list[str] = []
    for route in routes:
        try:
            for url in route.backends:
                host, port, _ = parse_backend_url(url)
                if (host, port) not in addresses:
                    addresses[(host, port)] = resolve(host, port)
        except (OSError, ValueError) as exc:
            problems.append(f"route {route.prefix!r} left out: {exc}")
            continue
        kept.append(route)
    return tuple(kept), problems, addresses


def _result(decision: Decision) -> str:
    if decision.allowed:
        return "allowed"
    return "limited" if decision.status == 429 else "unavailable"


def _read_jwks_file(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        document = json.load(f)
    if not isinstance(document, dict):
        raise ValueError(f"{path}: a JWKS document must be a JSON object")
    return document


def _fetch_jwks_url(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        document = json.loads(response.read(1 << 20))
    if not isinstance(document, dict):
        raise ValueError(f"{url}: a JWKS document must be a JSON object")
    return document
