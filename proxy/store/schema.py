"""PostgreSQL schema: an ordered list of versioned migrations and ``migrate()``.

Every migration is applied in its own transaction together with its row in
``schema_migrations``, under ``pg_advisory_xact_lock`` so two migrators (two hosts
deploying at once, two CLI runs) never race: the second waits, then sees the first's
rows and applies nothing. The lock is transaction-scoped, which is what works through
PgBouncer in transaction pooling (a session-level advisory lock would stay on whichever
server connection PgBouncer happened to use). Migrations are append-only: never edit one
that has shipped; add the next version.

Tables (the control plane's source of truth, see DESIGN.md section 1):

- ``tenants``: who keys belong to; tenant-wide ``limits`` and ``allowed_tools``.
- ``routes`` + ``backends``: path prefix -> kind, options, ordered replica URLs.
- ``api_keys``: only a public ``prefix`` (for lookup) and a SHA-256 ``hash`` of the key;
  per-key ``limits`` and ``allowed_tools`` (NULL = every tool).
- ``usage_records``: the audit/usage sink, one row per request, batched by workers.
- ``config_version``: one row, bumped by trigger on every change to tenants, routes,
  backends or api_keys, so workers poll one cheap row instead of LISTEN/NOTIFY (which
  transaction pooling does not carry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

# pg_advisory_xact_lock key: any fixed bigint unique to this application ("SWBD" + 1).
MIGRATION_LOCK_ID = 0x53574244_00000001


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "tenants, routes, backends, api_keys",
        """
        CREATE TABLE tenants (
            id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name          text NOT NULL UNIQUE CHECK (name <> ''),
            -- tenant-wide limits, e.g. {"requests_per_minute": 600}
            limits        jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(limits) = 'object'),
            -- NULL: every tool; otherwise the tools/call names the tenant may use
            allowed_tools text[],
            created_at    timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE routes (
            id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            prefix     text NOT NULL UNIQUE CHECK (prefix LIKE '/%'),
            kind       text NOT NULL DEFAULT 'http' CHECK (kind IN ('http', 'mcp')),
            -- the rest of a route's settings (origins, strip_prefix, health, ...)
            options    jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(options) = 'object'),
            created_at timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE backends (
            id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            route_id bigint NOT NULL REFERENCES routes (id) ON DELETE CASCADE,
            url      text NOT NULL CHECK (url ~ '^https?://'),
            position integer NOT NULL,
            UNIQUE (route_id, position),
            UNIQUE (route_id, url)
        );

        -- Keys are "sb_<prefix>_<secret>" with a 256-bit random secret. Only the public
        -- prefix (to find the row) and the SHA-256 of the whole key are stored. A fast
        -- unsalted hash is right here, unlike for passwords: slow salted hashes (bcrypt,
        -- argon2) exist to make guessing low-entropy human passwords expensive, but a
        -- 256-bit random secret cannot be guessed or found in a dictionary however fast
        -- the hash, and a fast hash keeps the per-request check cheap.
        CREATE TABLE api_keys (
            id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            tenant_id     bigint NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
            name          text NOT NULL CHECK (name <> ''),
            prefix        text NOT NULL UNIQUE CHECK (prefix ~ '^[a-z0-9]{8}$'),
            hash          text NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
            created_at    timestamptz NOT NULL DEFAULT now(),
            revoked_at    timestamptz,
            -- per-key limits, e.g. {"requests_per_minute": 60}
            limits        jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(limits) = 'object'),
            -- NULL: every tool (within the tenant's allowed_tools)
            allowed_tools text[]
        );
        CREATE INDEX api_keys_tenant_id ON api_keys (tenant_id);
        """,
    ),
    Migration(
        2,
        "usage_records (audit/usage sink)",
        """
        -- Append-heavy: no foreign keys (a deleted key keeps its history, inserts stay
        -- cheap); key_id/tenant_id are NULL for unauthenticated requests.
        CREATE TABLE usage_records (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            ts          timestamptz NOT NULL DEFAULT now(),
            key_id      bigint,
            tenant_id   bigint,
            route       text NOT NULL,
            method      text NOT NULL,
            tool        text,
            status      integer NOT NULL,
            bytes_in    bigint NOT NULL DEFAULT 0,
            bytes_out   bigint NOT NULL DEFAULT 0,
            duration_ms double precision NOT NULL DEFAULT 0
        );
        CREATE INDEX usage_records_ts ON usage_records (ts);
        CREATE INDEX usage_records_key_ts ON usage_records (key_id, ts);
        """,
    ),
    Migration(
        3,
        "config_version row bumped on every config change",
        """
        CREATE TABLE config_version (
            id         boolean PRIMARY KEY DEFAULT true CHECK (id),
            version    bigint NOT NULL,
            changed_at timestamptz NOT NULL DEFAULT now()
        );
        INSERT INTO config_version (id, version) VALUES (true, 1);

        CREATE FUNCTION bump_config_version() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE config_version SET version = version + 1, changed_at = now();
            RETURN NULL;
        END
        $$;

        CREATE TRIGGER tenants_bump_config_version
            AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenants
            FOR EACH STATEMENT EXECUTE FUNCTION bump_config_version();
        CREATE TRIGGER routes_bump_config_version
            AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON routes
            FOR EACH STATEMENT EXECUTE FUNCTION bump_config_version();
        CREATE TRIGGER backends_bump_config_version
            AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON backends
            FOR EACH STATEMENT EXECUTE FUNCTION bump_config_version();
        CREATE TRIGGER api_keys_bump_config_version
            AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON api_keys
            FOR EACH STATEMENT EXECUTE FUNCTION bump_config_version();
        """,
    ),
    Migration(
        4,
        "usage_records.record_key: one row per record, however often a batch is written",
        """
        -- The idempotency key each record gets when the worker makes it. A batch written
        -- again (retried after its commit reply was lost, or replayed from a spill file)
        -- inserts only what is not there yet (INSERT ... ON CONFLICT DO NOTHING). Rows
        -- written before this migration keep a NULL key (NULLs never conflict); the
        -- CHECK, NOT VALID, holds for every new row without rewriting the old ones.
        ALTER TABLE usage_records ADD COLUMN record_key uuid;
        CREATE UNIQUE INDEX usage_records_record_key ON usage_records (record_key);
        ALTER TABLE usage_records ADD CONSTRAINT usage_records_record_key_given
            CHECK (record_key IS NOT NULL) NOT VALID;
        """,
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version

_CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    description text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


def _check_order(migrations: tuple[Migration, ...]) -> None:
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)) or (versions and versions[0] < 1):
        raise ValueError(f"migration versions must be positive and increasing: {versions}")


_check_order(MIGRATIONS)


def applied_versions(conn: psycopg.Connection[Any]) -> list[int]:
    """Versions recorded in ``schema_migrations`` ([] when the table does not exist)."""
    with conn.transaction():
        row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        if row is None or not row[0]:
            return []
        return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]


def migrate(
    conn: psycopg.Connection[Any], migrations: tuple[Migration, ...] = MIGRATIONS
) -> list[int]:
    """Apply the migrations not yet recorded, in order, one transaction each; return the
    versions applied ([] when the schema was already current).

    Safe to run concurrently from several processes and through PgBouncer in
    transaction pooling: each transaction first takes ``pg_advisory_xact_lock``.
    """
    _check_order(migrations)
    applied: list[int] = []
    while True:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
            conn.execute(_CREATE_MIGRATIONS_TABLE)
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            pending = [m for m in migrations if m.version not in done]
            if not pending:
                return applied
            migration = pending[0]
            # No parameters: psycopg sends it as one simple query, several statements OK.
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)",
                (migration.version, migration.description),
            )
        applied.append(migration.version)
