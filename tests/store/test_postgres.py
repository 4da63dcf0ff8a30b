"""proxy.store.schema and proxy.store.postgres against a real PostgreSQL 15, directly and
through a real PgBouncer in transaction pooling mode (tests/support/postgres.py)."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
import trio

from proxy.audit import UsageRecord
from proxy.auth import AuthFailure, Identity, hash_api_key, parse_api_key, verify_api_key
from proxy.snapshot import key_table, snapshot_from_json, snapshot_to_json
from proxy.store import postgres as store
from proxy.store.schema import LATEST_VERSION, MIGRATIONS, applied_versions, migrate
from tests.support.postgres import PgEnv, pg_fixture  # noqa: F401

ALL_VERSIONS = [m.version for m in MIGRATIONS]


@pytest.fixture
def fresh_dsn(pg: PgEnv) -> str:
    """A new, empty database reached through PgBouncer."""
    return pg.dsn(database=pg.create_database(), bouncer=True)


@pytest.fixture
def migrated_dsn(fresh_dsn: str) -> str:
    with store.connect(fresh_dsn) as conn:
        migrate(conn)
    return fresh_dsn


def _tables(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    conn.commit()
    return {r[0] for r in rows}


@pytest.mark.parametrize("bouncer", [False, True], ids=["direct", "pgbouncer"])
def test_migrate_twice_second_is_noop(pg: PgEnv, bouncer: bool) -> None:
    dsn = pg.dsn(database=pg.create_database(), bouncer=bouncer)
    with store.connect(dsn) as conn:
        assert applied_versions(conn) == []
        assert migrate(conn) == ALL_VERSIONS
        assert migrate(conn) == []
        assert applied_versions(conn) == ALL_VERSIONS
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert {
            "schema_migrations",
            "tenants",
            "routes",
            "backends",
            "api_keys",
            "usage_records",
            "config_version",
        } <= _tables(conn)
        indexes = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'usage_records'"
        ).fetchall()
        conn.commit()
        assert any("(ts)" in r[0] for r in indexes)
    # A new connection (another process, another day) agrees.
    with store.connect(dsn) as conn:
        assert migrate(conn) == []
        assert store.current_version(conn) == 1


def test_concurrent_migrators_apply_each_migration_once(pg: PgEnv, fresh_dsn: str) -> None:
    barrier = threading.Barrier(2)
    results: list[list[int]] = []
    failures: list[BaseException] = []

    def migrator() -> None:
        try:
            with store.connect(fresh_dsn) as conn:
                barrier.wait(timeout=10)
                results.append(migrate(conn))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=migrator) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not failures, failures
    assert len(results) == 2
    assert sorted(v for r in results for v in r) == ALL_VERSIONS
    with store.connect(fresh_dsn) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall()
        assert [r[0] for r in rows] == ALL_VERSIONS


def test_schema_missing_is_a_clear_error(fresh_dsn: str) -> None:
    with store.connect(fresh_dsn) as conn:
        with pytest.raises(store.SchemaMissing, match="db migrate"):
            store.current_version(conn)
        with pytest.raises(store.SchemaMissing):
            store.load_snapshot(conn)


def test_snapshot_has_routes_and_only_active_keys(migrated_dsn: str) -> None:
    with store.connect(migrated_dsn) as conn:
        store.add_route(conn, "/mcp", ["http://10.0.0.5:8000", "http://10.0.0.6:8000"], kind="mcp")
        store.add_route(conn, "/api", ["http://10.0.0.7:9000"])
        kept = store.create_key(
            conn, tenant="acme", name="ci", limits={"requests_per_minute": 60}, allowed_tools=["a"]
        )
        gone = store.create_key(conn, tenant="acme", name="old")
        other = store.create_key(conn, tenant="globex", name="bot")
        store.revoke_key(conn, gone.info.prefix)

        snapshot = store.load_snapshot(conn)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert snapshot.version == store.current_version(conn)
    assert [(r.prefix, r.kind, r.backends) for r in snapshot.routes] == [
        ("/api", "http", ("http://10.0.0.7:9000",)),
        ("/mcp", "mcp", ("http://10.0.0.5:8000", "http://10.0.0.6:8000")),
    ]
    assert set(snapshot.keys) == {kept.info.prefix, other.info.prefix}
    entry = snapshot.keys[kept.info.prefix]
    assert entry.hash == hash_api_key(kept.key)
    assert (entry.tenant, entry.name) == ("acme", "ci")
    assert entry.limits == {"requests_per_minute": 60}
    assert entry.allowed_tools == ("a",)
    assert snapshot.keys[other.info.prefix].allowed_tools is None

    # Persistable: JSON out and back gives the same snapshot.
    assert snapshot_from_json(snapshot_to_json(snapshot)) == snapshot

    # The request path: find a presented key in the snapshot's key table.
    table = key_table(snapshot)
    found = verify_api_key(kept.key, table)
    assert isinstance(found, Identity) and found.key_id == entry.key_id
    assert found.tenant == "acme" and found.allowed_tools == frozenset({"a"})
    tampered = kept.key[:-1] + ("A" if kept.key[-1] != "A" else "B")
    for refused in (tampered, gone.key, "not-a-key"):
        assert isinstance(verify_api_key(refused, table), AuthFailure)


def test_config_version_bumps_on_every_change(migrated_dsn: str) -> None:
    with store.connect(migrated_dsn) as conn:
        seen = [store.current_version(conn)]

        def bumped() -> bool:
            now = store.current_version(conn)
            grew = now > seen[-1]
            seen.append(now)
            return grew

        store.add_route(conn, "/a", ["http://127.0.0.1:1"])
        assert bumped()
        new = store.create_key(conn, tenant="t", name="k")
        assert bumped()
        store.revoke_key(conn, new.info.prefix)
        assert bumped()
        # Nothing changed: no bump (workers would reload for nothing).
        assert store.revoke_key(conn, new.info.prefix)[1] is False
        assert not bumped()
        with pytest.raises(store.NotFound):
            store.remove_route(conn, "/nope")
        assert not bumped()
        with pytest.raises(store.AlreadyExists):
            store.add_route(conn, "/a", ["http://127.0.0.1:2"])
        assert not bumped()
        store.remove_route(conn, "/a")
        assert bumped()
        # Changes from another client (another CLI run, through PgBouncer) show too.
        conn.execute("UPDATE tenants SET limits = '{\"requests_per_minute\": 5}'")
        conn.commit()
        assert bumped()


def test_key_format_and_storage(migrated_dsn: str) -> None:
    with store.connect(migrated_dsn) as conn:
        new = store.create_key(conn, tenant="acme", name="ci")
        row = conn.execute(
            "SELECT prefix, hash FROM api_keys WHERE prefix = %s", (new.info.prefix,)
        ).fetchone()
        conn.commit()
    assert new.key.startswith(f"sb_{new.info.prefix}_")
    assert parse_api_key(new.key) == new.info.prefix
    assert len(new.key) > 40
    assert row == (new.info.prefix, hash_api_key(new.key))
    assert new.key not in str(row)


def test_repeated_queries_on_a_pool_through_pgbouncer(pg: PgEnv, migrated_dsn: str) -> None:
    """prepare_threshold=None: the same parametrized query 50 times over a pool of 2
    through transaction pooling never meets a prepared-statement error."""
    pool = store.open_pool(migrated_dsn, min_size=2, max_size=2)
    try:
        failures: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(n):
                    with pool.connection() as conn:
                        row = conn.execute(
                            "SELECT %s::int + 1, version FROM config_version", (i,)
                        ).fetchone()
                        assert row is not None and row[0] == i + 1
            except BaseException as exc:
                failures.append(exc)

        work(50)  # one thread, sequential
        threads = [threading.Thread(target=work, args=(50,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not failures, failures
    finally:
        pool.close()


def test_prepared_statements_would_break_under_transaction_pooling(
    pg: PgEnv, migrated_dsn: str
) -> None:
    """The control for the test above: with server-side prepared statements
    (prepare_threshold=0) two clients sharing PgBouncer's server connections collide.
    PgBouncer >= 1.21 with max_prepared_statements set would hide this; 1.18 does not."""
    a = psycopg.connect(migrated_dsn, prepare_threshold=0)
    b = psycopg.connect(migrated_dsn, prepare_threshold=0)
    try:
        with pytest.raises(psycopg.Error, match="prepared statement"):
            for i in range(50):
                for conn in (a, b):
                    conn.execute("SELECT %s::int + 1", (i,)).fetchone()
                    conn.commit()
    finally:
        a.close()
        b.close()


async def test_snapshot_from_trio_through_a_pool(migrated_dsn: str) -> None:
    """The worker pattern: sync pool, trio.to_thread, limiter no larger than the pool."""
    pool = store.open_pool(migrated_dsn, min_size=1, max_size=2)
    limiter = trio.CapacityLimiter(2)
    versions: list[int] = []

    def load() -> int:
        with pool.connection() as conn:
            return store.load_snapshot(conn).version

    async def one() -> None:
        versions.append(await trio.to_thread.run_sync(load, limiter=limiter))

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
    finally:
        pool.close()
    assert len(versions) == 50
    assert len(set(versions)) == 1


def test_connect_failure_names_host_and_port() -> None:
    from tests.support.proxy_process import free_port

    port = free_port()
    with pytest.raises(store.StoreUnavailable, match=f"127.0.0.1:{port}"):
        store.connect(f"postgresql://u:secret@127.0.0.1:{port}/db")
    try:
        store.connect(f"postgresql://u:secret@127.0.0.1:{port}/db")
    except store.StoreUnavailable as exc:
        assert "secret" not in str(exc)


def test_latest_version_is_last_migration() -> None:
    assert ALL_VERSIONS[-1] == LATEST_VERSION
    assert sorted(ALL_VERSIONS) == ALL_VERSIONS


# --- usage records: written once, however often a batch is sent --------------------------


def _usage(i: int) -> UsageRecord:
    return UsageRecord(
        ts=1_700_000_000.0 + i,
        key_id=None,
        tenant_id=None,
        route="/mcp",
        method="tools/call",
        tool="search",
        status=200,
        bytes_in=i,
        bytes_out=0,
        duration_ms=1.0,
    )


def test_a_batch_written_twice_inserts_each_record_once(migrated_dsn: str) -> None:
    batch = [_usage(i) for i in range(50)]
    with store.connect(migrated_dsn) as conn:
        assert store.write_usage(conn, batch) == 50
        # A retry after a lost commit reply, or a replayed spill file, overlapping new ones.
        assert store.write_usage(conn, [*batch[25:], _usage(50)]) == 1
        twice = _usage(51)
        assert store.write_usage(conn, [twice, twice]) == 1  # one record twice in a batch
        rows = conn.execute("SELECT count(*), count(DISTINCT record_key) FROM usage_records")
        assert rows.fetchone() == (52, 52)
        # synchronous_commit was set for the batch's transaction only.
        setting = conn.execute("SHOW synchronous_commit").fetchone()
        conn.commit()
    assert setting == ("off",)  # the test cluster's own default


def test_migration_keeps_existing_usage_rows(fresh_dsn: str) -> None:
    with store.connect(fresh_dsn) as conn:
        migrate(conn, MIGRATIONS[:3])
        with conn.transaction():
            conn.execute(
                "INSERT INTO usage_records (route, method, status) VALUES ('/a', 'GET', 200),"
                " ('/b', 'GET', 200)"
            )
        # This version's writer against the old table: a clear error, not a crash.
        with pytest.raises(store.SchemaMissing, match="older than this version"):
            store.write_usage(conn, [_usage(1)])
        assert migrate(conn) == [4]
        assert store.write_usage(conn, [_usage(1), _usage(2)]) == 2
        rows = conn.execute(
            "SELECT route, record_key IS NULL FROM usage_records ORDER BY id"
        ).fetchall()
        conn.commit()
        assert rows == [("/a", True), ("/b", True), ("/mcp", False), ("/mcp", False)]
        with pytest.raises(psycopg.errors.CheckViolation), conn.transaction():
            conn.execute(
                "INSERT INTO usage_records (route, method, status) VALUES ('/c', 'GET', 1)"
            )
