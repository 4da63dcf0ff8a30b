"""PostgreSQL control-plane store: a thin synchronous layer over psycopg 3.

Used by the CLI directly and by workers through ``trio.to_thread.run_sync`` (psycopg's
async API is asyncio-only). Everything here is safe through PgBouncer in transaction
pooling mode:

- connections are opened with ``prepare_threshold=None`` (no server-side prepared
  statements, which would be looked up on another server connection next transaction);
- every function runs in its own ``conn.transaction()`` and leaves the connection idle
  (an open transaction would pin a PgBouncer server connection);
- per-transaction settings use ``SET LOCAL`` / ``SET TRANSACTION`` only, never ``SET``;
- no LISTEN/NOTIFY: ``current_version()`` polls the ``config_version`` row.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from proxy.audit import UsageRecord, clean_text
from proxy.auth import KEY_PREFIX, generate_api_key, hash_api_key
from proxy.snapshot import KeyEntry, RouteEntry, Snapshot

PREFIX_LENGTH = 8
CONNECT_KWARGS: dict[str, Any] = {"prepare_threshold": None, "autocommit": False}
"""What every connection is opened with (also the pool's ``kwargs``)."""


class StoreError(Exception):
    """A control-plane operation that cannot be done, with a message for people."""


class StoreUnavailable(StoreError):
    """PostgreSQL (or PgBouncer) cannot be reached."""


class NotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


class SchemaMissing(StoreError):
    pass


# --- keys -------------------------------------------------------------------------------


def generate_key() -> tuple[str, str]:
    """A new ``sb_<prefix>_<secret>`` key and its public prefix."""
    key, prefix, _ = generate_api_key()
    return key, prefix


# --- connections ------------------------------------------------------------------------


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` of a DSN, for messages (never the password)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable DSN)"
    host = str(params.get("host") or params.get("hostaddr") or "localhost (Unix socket)")
    port = str(params.get("port") or "5432")
    dbname = params.get("dbname")
    return f"{host}:{port}" + (f"/{dbname}" if dbname else "")


def _reason(exc: Exception) -> str:
    """The useful part of libpq's message: 'Connection refused', 'FATAL: password
    authentication failed for user "x"', 'timeout expired'."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return " ".join(lines[0].rsplit(" failed: ", 1)[-1].split())


def connect(dsn: str, *, connect_timeout: float = 5.0) -> psycopg.Connection[Any]:
    """A connection for PgBouncer transaction pooling (``prepare_threshold=None``,
    autocommit off). Raises StoreUnavailable naming host:port when it cannot connect."""
    extra: dict[str, Any] = dict(CONNECT_KWARGS)
    try:
        if "connect_timeout" not in conninfo_to_dict(dsn):
            extra["connect_timeout"] = max(1, round(connect_timeout))
    except psycopg.ProgrammingError as exc:
        raise StoreError(f"invalid database DSN: {exc}") from None
    try:
        return psycopg.connect(dsn, **extra)
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(
            f"cannot connect to PostgreSQL at {describe_dsn(dsn)}: {_reason(exc)}"
        ) from None


def open_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    timeout: float = 10.0,
    name: str = "switchboard",
    **conninfo: Any,
) -> ConnectionPool:
    """An opened ``psycopg_pool.ConnectionPool`` with the same connection settings as
    ``connect``. Workers call it from ``trio.to_thread.run_sync`` with a
    ``CapacityLimiter`` no larger than ``max_size``; close it with ``pool.close()``."""
    pool: ConnectionPool = ConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        name=name,
        kwargs={**CONNECT_KWARGS, **conninfo},
        open=False,
    )
    pool.open(wait=True, timeout=timeout)
    return pool


def _missing_schema() -> SchemaMissing:
    return SchemaMissing("the database schema is missing: run 'switchboard db migrate' first")


# --- reads ------------------------------------------------------------------------------


def current_version(conn: psycopg.Connection[Any]) -> int:
    """The config_version counter (one indexed row; poll it, reload on change)."""
    try:
        with conn.transaction():
            row = conn.execute("SELECT version FROM config_version").fetchone()
    except errors.UndefinedTable:
        raise _missing_schema() from None
    if row is None:
        raise StoreError("config_version has no row")
    return int(row[0])


_ROUTES_SQL = """
SELECT r.prefix, r.kind, r.options,
       coalesce(array_agg(b.url ORDER BY b.position) FILTER (WHERE b.url IS NOT NULL), '{}')
FROM routes r LEFT JOIN backends b ON b.route_id = r.id
GROUP BY r.id ORDER BY r.prefix
"""


def _routes(rows: Sequence[Sequence[Any]]) -> tuple[RouteEntry, ...]:
    return tuple(
        RouteEntry(prefix=p, kind=kind, options=dict(opts), backends=tuple(urls))
        for p, kind, opts, urls in rows
    )


def _tools(value: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


def load_snapshot(conn: psycopg.Connection[Any], *, statement_timeout_ms: int = 5000) -> Snapshot:
    """Routes, backends, active keys and config_version, read in one REPEATABLE READ
    transaction so they are consistent with each other and with the version."""
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            conn.execute(
                "SELECT set_config('statement_timeout', %s, true)", (f"{statement_timeout_ms}ms",)
            )
            version_row = conn.execute("SELECT version FROM config_version").fetchone()
            route_rows = conn.execute(_ROUTES_SQL).fetchall()
            key_rows = conn.execute(
                """
                SELECT k.id, k.prefix, k.hash, k.name, t.name, t.id, k.limits,
                       k.allowed_tools, t.limits, t.allowed_tools
                FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
                WHERE k.revoked_at IS NULL ORDER BY k.prefix
                """
            ).fetchall()
    except errors.UndefinedTable:
        raise _missing_schema() from None
    if version_row is None:
        raise StoreError("config_version has no row")
    routes = _routes(route_rows)
    keys = {
        row[1]: KeyEntry(
            key_id=row[0],
            prefix=row[1],
            hash=row[2],
            name=row[3],
            tenant=row[4],
            tenant_id=row[5],
            limits=dict(row[6]),
            allowed_tools=_tools(row[7]),
            tenant_limits=dict(row[8]),
            tenant_allowed_tools=_tools(row[9]),
        )
        for row in key_rows
    }
    return Snapshot(version=int(version_row[0]), routes=routes, keys=keys)


# --- admin operations (the CLI) -----------------------------------------------------------


class KeyInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What `keys list` shows: never the key or its hash."""

    prefix: str
    name: str
    tenant: str
    created_at: datetime
    revoked_at: datetime | None
    limits: dict[str, Any]
    allowed_tools: tuple[str, ...] | None


class NewKey(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    """The full key: shown once, never stored."""
    info: KeyInfo


class RouteInfo(msgspec.Struct, frozen=True, kw_only=True):
    prefix: str
    kind: str
    backends: tuple[str, ...]
    options: dict[str, Any]


_KEY_COLUMNS = """
    k.prefix, k.name, t.name, k.created_at, k.revoked_at, k.limits, k.allowed_tools
"""


def _key_info(row: Sequence[Any]) -> KeyInfo:
    return KeyInfo(
        prefix=row[0],
        name=row[1],
        tenant=row[2],
        created_at=row[3],
        revoked_at=row[4],
        limits=dict(row[5]),
        allowed_tools=_tools(row[6]),
    )


def _insert_key(
    conn: psycopg.Connection[Any],
    tenant_id: int,
    name: str,
    limits: dict[str, Any],
    tools: list[str] | None,
) -> tuple[str, str, datetime]:
    """Insert a new key (inside the caller's transaction); its key, prefix, created_at."""
    for _attempt in range(5):
        key, prefix = generate_key()
        try:
            with conn.transaction():  # a savepoint: retry on a prefix collision
                row = conn.execute(
                    "INSERT INTO api_keys (tenant_id, name, prefix, hash, limits, allowed_tools)"
                    " VALUES (%s, %s, %s, %s, %s, %s) RETURNING created_at",
                    (tenant_id, name, prefix, hash_api_key(key), Jsonb(limits), tools),
                ).fetchone()
        except errors.UniqueViolation:
            continue
        assert row is not None
        return key, prefix, row[0]
    raise StoreError("could not find an unused key prefix")


def create_key(
    conn: psycopg.Connection[Any],
    *,
    tenant: str,
    name: str,
    limits: dict[str, Any] | None = None,
    allowed_tools: Sequence[str] | None = None,
) -> NewKey:
    """Create the tenant if new, then a key for it; only the key's hash is stored."""
    if not tenant or not name:
        raise StoreError("a key needs a tenant and a name")
    tools = list(allowed_tools) if allowed_tools is not None else None
    limits = dict(limits or {})
    try:
        with conn.transaction():
            conn.execute(
                "INSERT INTO tenants (name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (tenant,)
            )
            tenant_row = conn.execute(
                "SELECT id FROM tenants WHERE name = %s", (tenant,)
            ).fetchone()
            assert tenant_row is not None
            key, prefix, created_at = _insert_key(conn, tenant_row[0], name, limits, tools)
    except errors.UndefinedTable:
        raise _missing_schema() from None
    info = KeyInfo(
        prefix=prefix,
        name=name,
        tenant=tenant,
        created_at=created_at,
        revoked_at=None,
        limits=limits,
        allowed_tools=_tools(tools),
    )
    return NewKey(key=key, info=info)


def list_keys(conn: psycopg.Connection[Any], *, tenant: str | None = None) -> list[KeyInfo]:
    try:
        with conn.transaction():
            rows = conn.execute(
                f"""
                SELECT {_KEY_COLUMNS} FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
                WHERE %(tenant)s::text IS NULL OR t.name = %(tenant)s
                ORDER BY t.name, k.created_at, k.prefix
                """,
                {"tenant": tenant},
            ).fetchall()
    except errors.UndefinedTable:
        raise _missing_schema() from None
    return [_key_info(r) for r in rows]


def revoke_key(conn: psycopg.Connection[Any], prefix: str) -> tuple[KeyInfo, bool]:
    """Revoke the key with this public prefix (``sb_`` and anything after the prefix are
    tolerated); return it and whether it was active until now."""
    if prefix.startswith(KEY_PREFIX):
        prefix = prefix[len(KEY_PREFIX) : len(KEY_PREFIX) + PREFIX_LENGTH]
    try:
        with conn.transaction():
            row = conn.execute(
                f"""
                SELECT {_KEY_COLUMNS} FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
                WHERE k.prefix = %s FOR UPDATE OF k
                """,
                (prefix,),
            ).fetchone()
            if row is None:
                raise NotFound(f"no API key with prefix {prefix!r}")
            info = _key_info(row)
            if info.revoked_at is not None:
                return info, False  # nothing written: config_version is not bumped
            revoked = conn.execute(
                "UPDATE api_keys SET revoked_at = now() WHERE prefix = %s RETURNING revoked_at",
                (prefix,),
            ).fetchone()
            assert revoked is not None
    except errors.UndefinedTable:
        raise _missing_schema() from None
    return msgspec.structs.replace(info, revoked_at=revoked[0]), True


def add_route(
    conn: psycopg.Connection[Any],
    prefix: str,
    backends: Sequence[str],
    *,
    kind: str = "http",
    options: dict[str, Any] | None = None,
) -> RouteInfo:
    if not prefix.startswith("/"):
        raise StoreError(f"route prefix must start with '/', got {prefix!r}")
    if kind not in ("http", "mcp"):
        raise StoreError(f"route kind must be 'http' or 'mcp', got {kind!r}")
    if not backends:
        raise StoreError("a route needs at least one backend URL")
    for url in backends:
        if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
            raise StoreError(f"backend URL must be http://HOST:PORT[/PATH], got {url!r}")
    if len(set(backends)) != len(backends):
        raise StoreError("the same backend URL is given twice")
    try:
        with conn.transaction():
            try:
                with conn.transaction():
                    row = conn.execute(
                        "INSERT INTO routes (prefix, kind, options) VALUES (%s, %s, %s) "
                        "RETURNING id",
                        (prefix, kind, Jsonb(options or {})),
                    ).fetchone()
            except errors.UniqueViolation:
                raise AlreadyExists(f"a route with prefix {prefix!r} already exists") from None
            assert row is not None
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO backends (route_id, url, position) VALUES (%s, %s, %s)",
                    [(row[0], url, i) for i, url in enumerate(backends)],
                )
    except errors.UndefinedTable:
        raise _missing_schema() from None
    return RouteInfo(prefix=prefix, kind=kind, backends=tuple(backends), options=options or {})


def list_routes(conn: psycopg.Connection[Any]) -> list[RouteInfo]:
    snapshot_routes = _route_rows(conn)
    return [
        RouteInfo(prefix=r.prefix, kind=r.kind, backends=r.backends, options=r.options)
        for r in snapshot_routes
    ]


def _route_rows(conn: psycopg.Connection[Any]) -> list[RouteEntry]:
    try:
        with conn.transaction():
            rows = conn.execute(_ROUTES_SQL).fetchall()
    except errors.UndefinedTable:
        raise _missing_schema() from None
    return list(_routes(rows))


def remove_route(conn: psycopg.Connection[Any], prefix: str) -> None:
    try:
        with conn.transaction():
            row = conn.execute(
                "DELETE FROM routes WHERE prefix = %s RETURNING id", (prefix,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no route with prefix {prefix!r}")
    except errors.UndefinedTable:
        raise _missing_schema() from None


# --- usage/audit records ------------------------------------------------------------------

_USAGE_COLUMNS = (
    "ts, key_id, tenant_id, route, method, tool, status, bytes_in, bytes_out, duration_ms,"
    " record_key"
)
# Per transaction (ON COMMIT DROP), so it is safe under PgBouncer's transaction pooling.
_USAGE_BATCH_TABLE = """
CREATE TEMP TABLE usage_batch (
    ts timestamptz, key_id bigint, tenant_id bigint, route text, method text, tool text,
    status integer, bytes_in bigint, bytes_out bigint, duration_ms double precision,
    record_key uuid
) ON COMMIT DROP
"""


def write_usage(conn: psycopg.Connection[Any], records: Sequence[UsageRecord]) -> int:
    """Insert a batch of usage records in one transaction (all or none); return how many
    were new. Writing the same records again inserts nothing: they go into a temporary
    table with one COPY, then into usage_records with ``ON CONFLICT (record_key) DO
    NOTHING``. ``synchronous_commit`` is on for this transaction whatever the server's
    default, so a commit PostgreSQL acknowledged survives its crash. COPY needs no
    prepared statement, so all of it is fine through PgBouncer."""
    if not records:
        return 0
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SET LOCAL synchronous_commit = on")
            cur.execute(_USAGE_BATCH_TABLE)
            with cur.copy(f"COPY usage_batch ({_USAGE_COLUMNS}) FROM STDIN") as copy:
                for r in records:
                    # Text is cleaned here, where PostgreSQL would reject it: one NUL in a
                    # tool name must not make the whole batch (and its spill file) fail
                    # forever.
                    copy.write_row(
                        (
                            datetime.fromtimestamp(r.ts, UTC),
                            r.key_id,
                            r.tenant_id,
                            clean_text(r.route),
                            clean_text(r.method),
                            None if r.tool is None else clean_text(r.tool),
                            r.status,
                            r.bytes_in,
                            r.bytes_out,
                            r.duration_ms,
                            r.key,
                        )
                    )
            cur.execute(
                f"INSERT INTO usage_records ({_USAGE_COLUMNS})"
                f" SELECT {_USAGE_COLUMNS} FROM usage_batch"
                " ON CONFLICT (record_key) DO NOTHING"
            )
            inserted = cur.rowcount
    except errors.UndefinedTable:
        raise _missing_schema() from None
    except errors.UndefinedColumn:
        raise SchemaMissing(
            "the database schema is older than this version: run 'switchboard db migrate'"
        ) from None
    return max(inserted, 0)
