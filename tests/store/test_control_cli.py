"""``switchboard db|keys|routes`` (proxy.control) against real PostgreSQL through a real
PgBouncer in transaction pooling mode."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest

from proxy import control
from proxy.auth import hash_api_key
from proxy.store import postgres as store
from proxy.store.schema import LATEST_VERSION
from tests.support.postgres import PgEnv, pg_fixture  # noqa: F401
from tests.support.proxy_process import free_port


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code = code
        self.out = out
        self.err = err

    def json(self) -> Any:
        return json.loads(self.out)


def cli(*argv: str, environ: dict[str, str] | None = None) -> Result:
    out, err = io.StringIO(), io.StringIO()
    code = control.main(list(argv), stdout=out, stderr=err, environ=environ or {})
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def dsn(pg: PgEnv) -> str:
    """A fresh database through PgBouncer, migrated with ``db migrate``."""
    dsn = pg.dsn(database=pg.create_database(), bouncer=True)
    result = cli("db", "migrate", "--dsn", dsn)
    assert result.code == 0, result.err
    assert "applied migration(s) 1, 2, 3" in result.out
    return dsn


def version(dsn: str) -> int:
    with store.connect(dsn) as conn:
        return store.current_version(conn)


def test_db_migrate_again_applies_nothing(dsn: str) -> None:
    again = cli("db", "migrate", "--dsn", dsn)
    assert again.code == 0
    assert "up to date" in again.out
    as_json = cli("db", "migrate", "--dsn", dsn, "--json").json()
    assert as_json == {"applied": [], "version": LATEST_VERSION}


def test_keys_create_list_revoke(dsn: str) -> None:
    created = cli(
        "keys", "create", "--tenant", "acme", "--name", "ci", "--rpm", "60",
        "--tools", "search, fetch", "--dsn", dsn,
    )  # fmt: skip
    assert created.code == 0, created.err
    key = created.out.strip()
    match = re.fullmatch(r"sb_([a-z0-9]{8})_[A-Za-z0-9_-]{40,}", key)
    assert match, key
    prefix = match.group(1)
    assert "shown only this once" in created.err
    assert key not in created.err

    other = cli("keys", "create", "--tenant", "globex", "--name", "bot", "--dsn", dsn, "--json")
    assert other.code == 0
    other_key = other.json()
    assert other_key["key"].startswith(f"sb_{other_key['prefix']}_")
    assert other_key["tenant"] == "globex"
    assert other_key["allowed_tools"] is None

    listed = cli("keys", "list", "--dsn", dsn)
    assert listed.code == 0
    lines = listed.out.splitlines()
    assert lines[0].split() == ["PREFIX", "NAME", "TENANT", "CREATED", "REVOKED", "RPM", "TOOLS"]
    row = next(line for line in lines if line.startswith(prefix))
    assert row.split()[:3] == [prefix, "ci", "acme"]
    assert row.split()[-3:] == ["-", "60", "search,fetch"]
    # Aligned: every column starts at the same offset as its header.
    assert row.index("acme") == lines[0].index("TENANT")
    for secret in (key, hash_api_key(key), other_key["key"]):
        assert secret not in listed.out

    as_json = cli("keys", "list", "--json", "--dsn", dsn)
    entries = as_json.json()
    assert {e["prefix"] for e in entries} == {prefix, other_key["prefix"]}
    mine = next(e for e in entries if e["prefix"] == prefix)
    assert mine["name"] == "ci" and mine["tenant"] == "acme" and mine["revoked_at"] is None
    assert mine["limits"] == {"requests_per_minute": 60}
    assert mine["allowed_tools"] == ["search", "fetch"]
    assert all("hash" not in e and "key" not in e for e in entries)
    assert key not in as_json.out and hash_api_key(key) not in as_json.out

    before = version(dsn)
    revoked = cli("keys", "revoke", prefix, "--dsn", dsn)
    assert revoked.code == 0, revoked.err
    assert f"revoked key {prefix}" in revoked.out
    assert version(dsn) > before

    after = {e["prefix"]: e for e in cli("keys", "list", "--json", "--dsn", dsn).json()}
    assert after[prefix]["revoked_at"] is not None
    assert after[other_key["prefix"]]["revoked_at"] is None
    row = next(line for line in cli("keys", "list", "--dsn", dsn).out.splitlines()
               if line.startswith(prefix))  # fmt: skip
    assert re.search(r"\d{4}-\d\d-\d\d", row.split("acme", 1)[1].split("60")[0])

    # Again: nothing to do, nothing bumped. The full key is accepted in place of a prefix.
    current = version(dsn)
    again = cli("keys", "revoke", key, "--dsn", dsn)
    assert again.code == 0 and "already revoked" in again.out
    assert version(dsn) == current

    with store.connect(dsn) as conn:
        snapshot = store.load_snapshot(conn)
    assert set(snapshot.keys) == {other_key["prefix"]}

    missing = cli("keys", "revoke", "zzzzzzzz", "--dsn", dsn)
    assert missing.code == 1
    assert "no API key with prefix 'zzzzzzzz'" in missing.err


def test_keys_filter_by_tenant(dsn: str) -> None:
    for tenant in ("a", "b", "b"):
        assert cli("keys", "create", "--tenant", tenant, "--name", "k", "--dsn", dsn).code == 0
    only_b = cli("keys", "list", "--tenant", "b", "--json", "--dsn", dsn).json()
    assert [e["tenant"] for e in only_b] == ["b", "b"]


def test_routes_add_list_remove(dsn: str) -> None:
    before = version(dsn)
    added = cli(
        "routes", "add", "/mcp", "http://10.0.0.5:8000", "http://10.0.0.6:8000",
        "--kind", "mcp", "--dsn", dsn,
    )  # fmt: skip
    assert added.code == 0, added.err
    assert "added mcp route /mcp -> http://10.0.0.5:8000, http://10.0.0.6:8000" in added.out
    assert version(dsn) > before
    assert cli("routes", "add", "/", "http://10.0.0.7:9000", "--dsn", dsn).code == 0

    table = cli("routes", "list", "--dsn", dsn).out.splitlines()
    assert table[0].split() == ["PREFIX", "KIND", "BACKENDS"]
    assert table[1].split() == ["/", "http", "http://10.0.0.7:9000"]
    assert table[2].split() == ["/mcp", "mcp", "http://10.0.0.5:8000,", "http://10.0.0.6:8000"]
    assert table[2].index(" mcp ") + 1 == table[0].index("KIND")

    listed = cli("routes", "list", "--json", "--dsn", dsn).json()
    assert listed == [
        {"prefix": "/", "kind": "http", "backends": ["http://10.0.0.7:9000"], "options": {}},
        {
            "prefix": "/mcp",
            "kind": "mcp",
            "backends": ["http://10.0.0.5:8000", "http://10.0.0.6:8000"],
            "options": {},
        },
    ]

    duplicate = cli("routes", "add", "/mcp", "http://10.0.0.8:8000", "--dsn", dsn)
    assert duplicate.code == 1 and "already exists" in duplicate.err
    bad = cli("routes", "add", "mcp", "http://10.0.0.8:8000", "--dsn", dsn)
    assert bad.code == 1 and "must start with '/'" in bad.err
    bad_url = cli("routes", "add", "/x", "10.0.0.8:8000", "--dsn", dsn)
    assert bad_url.code == 1 and "http://HOST:PORT" in bad_url.err

    before = version(dsn)
    removed = cli("routes", "remove", "/mcp", "--dsn", dsn)
    assert removed.code == 0 and "removed route /mcp" in removed.out
    assert version(dsn) > before
    assert [r["prefix"] for r in cli("routes", "list", "--json", "--dsn", dsn).json()] == ["/"]
    with store.connect(dsn) as conn:
        assert [r.prefix for r in store.load_snapshot(conn).routes] == ["/"]
        # backends went with their route
        row = conn.execute("SELECT count(*) FROM backends").fetchone()
        conn.commit()
    assert row == (1,)

    gone = cli("routes", "remove", "/mcp", "--dsn", dsn)
    assert gone.code == 1 and "no route with prefix '/mcp'" in gone.err


def test_dsn_from_environment(dsn: str) -> None:
    result = cli("routes", "list", environ={control.DSN_ENV: dsn})
    assert result.code == 0, result.err
    assert result.out.split() == ["PREFIX", "KIND", "BACKENDS"]


def test_no_dsn_is_a_usage_error() -> None:
    result = cli("keys", "list")
    assert result.code == 2
    assert control.DSN_ENV in result.err and "--dsn" in result.err


def test_unreachable_database_is_a_clear_error() -> None:
    port = free_port()
    result = cli("keys", "list", "--dsn", f"postgresql://sb:hunter2@127.0.0.1:{port}/switchboard")
    assert result.code == 1
    assert result.err.startswith("switchboard: cannot connect to PostgreSQL at ")
    assert f"127.0.0.1:{port}/switchboard" in result.err
    assert "hunter2" not in result.err
    assert "Connection refused" in result.err


def test_wrong_password_is_a_clear_error(pg: PgEnv) -> None:
    dsn = pg.dsn().replace(pg.password, "wrong")
    result = cli("keys", "list", "--dsn", dsn)
    assert result.code == 1
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{pg.bouncer_port}/" in result.err
    assert "authentication failed" in result.err  # PgBouncer: "SASL authentication failed"
    assert result.out == ""


def test_unmigrated_database_says_to_migrate(pg: PgEnv) -> None:
    fresh = pg.dsn(database=pg.create_database(), bouncer=True)
    result = cli("keys", "list", "--dsn", fresh)
    assert result.code == 1
    assert "run 'switchboard db migrate' first" in result.err


def test_argument_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as exc:
        cli("keys", "create", "--tenant", "a", "--name", "b", "--rpm", "0")
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        cli("routes", "add", "/only-prefix")


def test_format_table_aligns_columns() -> None:
    text = control.format_table(["A", "LONGER"], [["xxxx", "y"], ["z", "w"]])
    assert text.splitlines() == ["A     LONGER", "xxxx  y", "z     w"]
