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
from proxy.config import Config, RouteConfig, parse_redis_url
from proxy.metrics import metrics
from proxy.net.audit_sink import AuditSink
from proxy.net.conncaps import ConnectionCaps
from proxy.net.database import Database
from proxy.ratelimit import GCRA_LUA, Decision, LocalLimiter, combine, parse_reply, script_args
from proxy.snapshot import Snapshot, key_table, merged_routes, snapshot_from_json, snapshot_to_json
from proxy.store import postgres as store
from proxy.store.redis import RedisClient, RedisError, RedisUnavailable

SNAPSHOT_FILE = "snapshot.json"
JWKS_CHECK_INTERVAL = 10.0


class ControlPlane:
    def __init__(
        self,
        config: Config,
        worker_id: int,
        workers: int,
        log: Any,
        on_routes: Callable[[tuple[RouteConfig, ...]], None],
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
                fail_mode=config.redis.fail_mode,
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
            nursery.start_soon(self.redis.run)
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
        except store.StoreUnavailable:
            return  # _postgres_state logged it
        except store.StoreError as exc:
            self.log.error("snapshot_failed", error=str(exc))
            return
        self._install(snapshot, source="database")
        await self._persist(snapshot)

    async def _poll_forever(self) -> None:
        while True:
            await trio.sleep(self.config.database.poll_interval)
            await self.refresh()

    def _install(self, snapshot: Snapshot, source: str) -> None:
        previous = self.snapshot
        self.snapshot = snapshot
        self.keys = key_table(snapshot)
        metrics().snapshot_version.labels(self._worker_label).set(snapshot.version)
        routes, problems = merged_routes(self.config.routes, snapshot)
        for problem in problems:
            self.log.warning("snapshot_route_skipped", problem=problem)
        if previous is None or previous.routes != snapshot.routes:
            self.on_routes(routes)
        self.log.info(
            "snapshot_installed",
            version=snapshot.version,
            source=source,
            keys=len(snapshot.keys),
            routes=len(snapshot.routes),
        )

    async def _persist(self, snapshot: Snapshot) -> None:
        if self.state_dir is None:
            return
        path = self.state_dir / SNAPSHOT_FILE
        data = snapshot_to_json(snapshot)

        def write() -> None:
            # Each worker writes its own temporary file; rename is atomic, so a reader
            # (a worker starting during an outage) sees one whole snapshot or another.
            tmp = path.with_name(f".{SNAPSHOT_FILE}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
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
        self._install(snapshot, source="file")

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
        auth = self.config.auth
        while True:
            if jwks.needs_refresh(time.time()):
                try:
                    if auth.jwt_jwks_url:
                        document = await trio.to_thread.run_sync(
                            _fetch_jwks_url, auth.jwt_jwks_url, abandon_on_cancel=True
                        )
                    else:
                        document = await trio.to_thread.run_sync(
                            _read_jwks_file, auth.jwt_jwks_file
                        )
                except (OSError, ValueError) as exc:
                    self.log.warning("jwks_refresh_failed", error=str(exc))
                    jwks.fetched_at = time.time() - jwks.max_age + jwks.min_refresh
                else:
                    jwks.update(document, time.time())
                    self.log.info("jwks_refreshed", keys=len(jwks.keys))
            await trio.sleep(JWKS_CHECK_INTERVAL)


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
