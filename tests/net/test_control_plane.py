"""The control plane end to end: real PostgreSQL behind real PgBouncer (transaction
pooling), a real redis-server, official-SDK MCP backends, proxies run as `switchboard
run` processes, keys and routes managed with the `switchboard keys|routes` commands.

Outage tests (PostgreSQL stopped or paused) use a cluster of their own; the others share
the session's cluster, each with a fresh database.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
import trio

from proxy import control
from proxy.store import postgres as store
from proxy.store.schema import LATEST_VERSION
from tests.mcp.conftest import key_sections
from tests.support.backends import HttpClient, poll_until, proxy_running
from tests.support.mcp_servers import MCP_ACCEPT, MODERN_VERSION, McpBackend, modern_request
from tests.support.pg_outage import paused, running_cluster
from tests.support.postgres import PgEnv, pg_fixture  # noqa: F401
from tests.support.proxy_process import ProxyProcess, free_port, render_toml
from tests.support.redis_server import RedisServer, running_redis

JWT_SECRET = "switchboard-test-jwt-secret-0123456789abcdef"
AUDIENCE = "switchboard-tests"


# --- helpers ------------------------------------------------------------------------------


def cli(*argv: str) -> Any:
    """Run a `switchboard db|keys|routes` command; its JSON output."""
    out, err = io.StringIO(), io.StringIO()
    code = control.main([*argv, "--json"], stdout=out, stderr=err, environ={})
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue()) if out.getvalue().strip() else None


async def acli(*argv: str) -> Any:
    return await trio.to_thread.run_sync(lambda: cli(*argv))


async def new_key(dsn: str, tenant: str, name: str, *flags: str) -> str:
    """A key made with `switchboard keys create`."""
    created = await acli("keys", "create", "--tenant", tenant, "--name", name, *flags, "--dsn", dsn)
    return str(created["key"])


def migrated(dsn: str) -> str:
    assert cli("db", "migrate", "--dsn", dsn)["version"] >= 3
    return dsn


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict[str, Any] | None
    seconds: float


async def call(
    port: int,
    tool: str = "whoami",
    credential: str | None = None,
    *,
    path: str = "/mcp",
    header: str = "Authorization",
) -> Answer:
    """One 2026-07-28 tools/call on a fresh connection (so workers take turns)."""
    headers = [
        ("Accept", MCP_ACCEPT),
        ("Content-Type", "application/json"),
        ("MCP-Protocol-Version", MODERN_VERSION),
        ("Mcp-Method", "tools/call"),
        ("Mcp-Name", tool),
    ]
    if credential is not None:
        value = f"Bearer {credential}" if header.lower() == "authorization" else credential
        headers.append((header, value))
    body = json.dumps(modern_request(1, "tools/call", {"name": tool, "arguments": {}})).encode()
    started = time.perf_counter()
    client = await HttpClient.connect(port)
    try:
        with trio.fail_after(15):
            response = await client.request("POST", path, headers=headers, body=body)
    finally:
        await client.aclose()
    seconds = time.perf_counter() - started
    decoded: dict[str, Any] | None = None
    if response.body.startswith(b"{"):
        decoded = json.loads(response.body)
    names = {k.decode().lower(): v.decode() for k, v in response.headers}
    return Answer(response.status, names, decoded, seconds)


async def wait_for_status(
    port: int, status: int, credential: str | None, *, limit: float = 60.0
) -> float:
    """Seconds until a call answers ``status`` (several workers: it must hold for 6
    consecutive fresh connections, which land on different workers). ``limit`` is a
    guard: workers poll every ``poll_interval`` (0.25 s here)."""
    started = time.monotonic()
    streak = 0
    while streak < 6:
        answer = await call(port, credential=credential)
        streak = streak + 1 if answer.status == status else 0
        if time.monotonic() - started > limit:
            raise AssertionError(f"still {answer.status}, wanted {status}")
        if streak == 0:
            await trio.sleep(0.05)
    return time.monotonic() - started


def cp_sections(
    dsn: str, state_dir: Path, *, redis: RedisServer | None = None, **extra: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {
        "database": {
            "url": dsn,
            "poll_interval": 0.25,
            "state_dir": str(state_dir),
            "audit_flush_interval": 0.2,
            "connect_timeout": 1.0,
        },
        "auth": {"required": True},
        **key_sections(),
    }
    if redis is not None:
        sections["redis"] = {"url": f"redis://{redis.host}:{redis.port}/0"}
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    return sections


def token(**claims: Any) -> str:
    payload = {"sub": "agent-7", "tenant": "jwt-tenant", "aud": AUDIENCE, "exp": time.time() + 60}
    payload.update(claims)
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


def unsigned_token() -> str:
    """An ``alg: none`` token: header and claims, no signature."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims = {"sub": "mallory", "aud": AUDIENCE, "exp": time.time() + 60}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def usage_count(dsn: str) -> int:
    with psycopg.connect(dsn, prepare_threshold=None) as conn:
        row = conn.execute("SELECT count(*) FROM usage_records").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def dsn(pg: PgEnv) -> str:
    return migrated(pg.dsn(database=pg.create_database(), bouncer=True))


@pytest.fixture
async def backend(nursery: trio.Nursery) -> McpBackend:
    server = McpBackend("r1", json_response=True)
    await nursery.start(server.serve)
    return server


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


# --- 1. migrations and CLI changes reach running workers ----------------------------------


async def test_cli_changes_reach_running_workers(
    tmp_path: Path, dsn: str, backend: McpBackend
) -> None:
    assert cli("db", "migrate", "--dsn", dsn) == {"applied": [], "version": LATEST_VERSION}
    sections = cp_sections(dsn, tmp_path / "state")
    async with proxy_running(tmp_path, [], sections=sections) as proxy:
        assert (await call(proxy.port)).status == 404
        await acli("routes", "add", "/mcp", backend.url, "--kind", "mcp", "--dsn", dsn)
        created = await acli("keys", "create", "--tenant", "acme", "--name", "a", "--dsn", dsn)
        key = created["key"]
        took = await wait_for_status(proxy.port, 200, key)
        print(f"route + key reached every worker in {took:.2f} s")
        answer = await call(proxy.port, credential=key)
        assert answer.body is not None and "result" in answer.body

        await acli("keys", "revoke", created["prefix"], "--dsn", dsn)
        took = await wait_for_status(proxy.port, 401, key)
        print(f"revocation reached every worker in {took:.2f} s")

        await acli("routes", "remove", "/mcp", "--dsn", dsn)
        await wait_for_status(proxy.port, 404, key)
        lines = [line for line in proxy.lines if line.get("event") == "snapshot_installed"]
        assert len({line["pid"] for line in lines}) == 2  # both workers installed them


# --- 2. who may call what -------------------------------------------------------------------


async def test_authentication_and_tool_permissions(
    tmp_path: Path, dsn: str, backend: McpBackend
) -> None:
    await acli("routes", "add", "/mcp", backend.url, "--kind", "mcp", "--dsn", dsn)
    limited = await new_key(dsn, "acme", "l", "--tools", "whoami")
    revoked = await acli("keys", "create", "--tenant", "acme", "--name", "r", "--dsn", dsn)
    await acli("keys", "revoke", revoked["prefix"], "--dsn", dsn)
    sections = cp_sections(
        dsn,
        tmp_path / "state",
        auth={"jwt_algorithms": ["HS256"], "jwt_secret": JWT_SECRET, "jwt_audience": AUDIENCE},
    )
    async with proxy_running(tmp_path, [], sections=sections) as proxy:
        await wait_for_status(proxy.port, 200, limited)

        missing = await call(proxy.port)
        assert missing.status == 401
        assert missing.headers["www-authenticate"].startswith('Bearer realm="switchboard"')
        assert missing.body is not None and missing.body["error"]["code"] == -32001

        for bad in (revoked["key"], limited + "x", "sb_abcdefgh_forged", unsigned_token()):
            answer = await call(proxy.port, credential=bad)
            assert answer.status == 401, bad
            assert "invalid_token" in answer.headers["www-authenticate"]

        for expired_or_foreign in (
            token(exp=time.time() - 120),
            token(aud="another-service"),
            jwt.encode({"sub": "x", "aud": AUDIENCE, "exp": time.time() + 60}, "x" * 40),
        ):
            assert (await call(proxy.port, credential=expired_or_foreign)).status == 401

        assert (await call(proxy.port, credential=token())).status == 200

        # A tool outside the key's list is hidden: its call is answered as the backend
        # answers a tool it does not have (tests/mcp/test_tool_lists.py).
        denied = await call(proxy.port, "count", credential=limited)
        assert denied.status == 200 and denied.body is not None
        assert denied.body["result"]["isError"] is True
        assert denied.body["result"]["content"][0]["text"] == "Unknown tool: count"
        allowed = await call(proxy.port, "whoami", credential=limited)
        assert allowed.status == 200 and allowed.body is not None and "result" in allowed.body

    seen = [r for r in backend.requests if r.method == "POST"]
    assert seen, "the backend served the allowed calls"
    assert all("authorization" not in r.headers for r in seen)  # credentials consumed
    assert not any(
        '"count"' in json.dumps(r.headers) or r.headers.get("mcp-name") == "count" for r in seen
    )


# --- 3. one limit across workers and proxies ---------------------------------------------


async def test_rate_limit_is_global(
    tmp_path: Path, dsn: str, backend: McpBackend, redis: RedisServer
) -> None:
    await acli("routes", "add", "/mcp", backend.url, "--kind", "mcp", "--dsn", dsn)
    limit = 5  # per minute: no token comes back during the test (one per 12 s)
    key = await new_key(dsn, "acme", "n", "--rpm", str(limit))
    sections = cp_sections(dsn, tmp_path / "state", redis=redis)
    async with (
        proxy_running(tmp_path, [], sections=sections) as first,
        proxy_running(tmp_path, [], sections=sections) as second,
    ):
        await _wait_redis_up([first, second])
        answers = []
        for i in range(16):
            answers.append(await call((first, second)[i % 2].port, credential=key))
        statuses = [a.status for a in answers]
        assert statuses.count(200) == limit, statuses
        assert statuses.count(429) == 16 - limit, statuses
        for refused in (a for a in answers if a.status == 429):
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.headers["ratelimit-limit"] == str(limit)
            assert refused.headers["ratelimit-remaining"] == "0"
            assert refused.body is not None and refused.body["error"]["code"] == -32029

        def mcp_lines() -> list[tuple[int, int]]:
            return [
                (proxy.port, line["pid"])
                for proxy in (first, second)
                for line in proxy.access_lines()
                if line.get("path") == "/mcp"
            ]

        # Access lines are written in batches: wait for all sixteen.
        await poll_until(lambda: len(mcp_lines()) == 16, limit=10)
        served = set(mcp_lines())
        assert len(served) >= 3, f"requests reached only {served}"


async def _wait_keys_installed(proxy: ProxyProcess, keys: int, workers: int = 2) -> None:
    """Until every worker has installed a snapshot holding ``keys`` keys."""

    def installed() -> bool:
        pids = {
            line["pid"]
            for line in list(proxy.lines)
            if line.get("event") == "snapshot_installed" and line.get("keys") == keys
        }
        return len(pids) == workers

    await poll_until(installed, limit=10)


async def _wait_redis_up(proxies: Sequence[ProxyProcess], limit: float = 10.0) -> None:
    workers = 2
    await poll_until(
        lambda: all(
            _metric(p, "switchboard_redis_up") == 1.0
            and _count(p, "switchboard_redis_up") == workers
            for p in proxies
        ),
        limit=limit,
    )


def _count(proxy: ProxyProcess, name: str) -> int:
    import urllib.request

    with urllib.request.urlopen(f"{proxy.admin_url}/metrics", timeout=5) as response:
        return sum(
            1 for line in response.read().decode().splitlines() if line.startswith(name + "{")
        )


def _metric(proxy: ProxyProcess, name: str) -> float | None:
    import urllib.request

    with urllib.request.urlopen(f"{proxy.admin_url}/metrics", timeout=5) as response:
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in response.read().decode().splitlines()
            if line.startswith((name + " ", name + "{"))
        ]
    return min(values) if values else None  # one sample per worker: the worst


# --- 4. Redis goes away and comes back ---------------------------------------------------


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
async def test_redis_outage_and_recovery(
    tmp_path: Path, dsn: str, backend: McpBackend, redis: RedisServer, fail_mode: str
) -> None:
    await acli("routes", "add", "/mcp", backend.url, "--kind", "mcp", "--dsn", dsn)
    roomy = await new_key(dsn, "t", "big", "--rpm", "1000")
    sections = cp_sections(dsn, tmp_path / "state", redis=redis)
    sections["redis"]["fail_mode"] = fail_mode
    async with proxy_running(tmp_path, [], sections=sections) as proxy:
        await _wait_redis_up([proxy])
        assert [(await call(proxy.port, credential=roomy)).status for _ in range(4)] == [200] * 4

        await trio.to_thread.run_sync(redis.stop)
        await poll_until(lambda: _metric(proxy, "switchboard_redis_up") == 0.0, limit=10)
        during = [await call(proxy.port, credential=roomy) for _ in range(10)]
        if fail_mode == "open":
            assert [a.status for a in during] == [200] * 10
        else:
            assert [a.status for a in during] == [503] * 10
            assert all(int(a.headers["retry-after"]) >= 1 for a in during)
        assert any(
            line.get("event") == "redis_down" and line.get("fail_mode") == fail_mode
            for line in proxy.lines
        )

        await trio.to_thread.run_sync(redis.start)
        await _wait_redis_up([proxy])
        # Global again: a key of 3 per minute gets exactly 3 across both workers (local
        # buckets would give each worker its own 3).
        small = await new_key(dsn, "t", "s", "--rpm", "3")
        await _wait_keys_installed(proxy, 2)
        statuses = [(await call(proxy.port, credential=small)).status for _ in range(12)]
        assert statuses.count(200) == 3, statuses
        assert statuses.count(429) == 9, statuses


# --- 5 and 6: PostgreSQL and PgBouncer away ---------------------------------------------------


async def test_postgres_outage_snapshot_and_audit(tmp_path: Path, backend: McpBackend) -> None:
    async with running_cluster() as cluster:
        dsn = migrated(cluster.env.dsn(bouncer=True))
        await acli("routes", "add", "/mcp", backend.url, "--kind", "mcp", "--dsn", dsn)
        key = await new_key(dsn, "acme", "a")
        sections = cp_sections(dsn, tmp_path / "state", database={"ready_grace": 1.0})
        proxies: list[ProxyProcess] = []
        async with proxy_running(tmp_path, [], sections=sections) as proxy:
            proxies.append(proxy)
            await wait_for_status(proxy.port, 200, key)
            assert [(await call(proxy.port, credential=key)).status for _ in range(10)] == [
                200
            ] * 10
            await cluster.stop()
            assert [(await call(proxy.port, credential=key)).status for _ in range(10)] == [
                200
            ] * 10
            await poll_until(lambda: _ready_status(proxy) == 503, limit=10)
            # SIGTERM while PostgreSQL is down: what is not written goes to spill files.

        async with proxy_running(tmp_path, [], sections=sections) as restarted:
            proxies.append(restarted)
            assert any(
                line.get("event") == "snapshot_installed" and line.get("source") == "file"
                for line in restarted.lines
            )
            assert [(await call(restarted.port, credential=key)).status for _ in range(10)] == [
                200
            ] * 10
        assert list((tmp_path / "state" / "audit").iterdir()), "nothing was spilled"

        await cluster.start()
        async with proxy_running(tmp_path, [], sections=sections) as replaying:
            proxies.append(replaying)
            sent = sum(
                1 for p in proxies for line in p.access_lines() if line.get("route") == "/mcp"
            )
            assert sent >= 36
            await poll_until(lambda: _usage_or_zero(dsn) >= sent, limit=20)
            await poll_until(lambda: _ready_status(replaying) == 200, limit=10)
        print(f"{sent} requests served across the outage; {usage_count(dsn)} usage records")
        assert usage_count(dsn) == sent


def _usage_or_zero(dsn: str) -> int:
    try:
        return usage_count(dsn)
    except psycopg.OperationalError:
        return 0


def _ready_status(proxy: ProxyProcess) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{proxy.admin_url}/ready", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def test_paused_postgres_does_not_slow_requests(tmp_path: Path, backend: McpBackend) -> None:
    async with running_cluster() as cluster:
        dsn = migrated(cluster.env.dsn(bouncer=True))
        await acli("routes", "add", "/mcp", backend.url, "--kind", "mcp", "--dsn", dsn)
        key = await new_key(dsn, "acme", "a")
        # A PostgreSQL call now gives up only after 20 minutes: a request that waited on
        # one would not be answered while PostgreSQL is frozen.
        sections = cp_sections(
            dsn, tmp_path / "state", database={"connect_timeout": 600.0, "statement_timeout": 600.0}
        )
        async with proxy_running(tmp_path, [], sections=sections) as proxy:
            await wait_for_status(proxy.port, 200, key)
            normal = [await call(proxy.port, credential=key) for _ in range(60)]
            async with paused(cluster):
                # Pollers and audit writers are now stuck inside PostgreSQL calls.
                stalled = [await call(proxy.port, credential=key) for _ in range(60)]
                still_frozen = all(p.status() == "stopped" for p in cluster.processes())
        base = statistics.median(a.seconds for a in normal)
        during = statistics.median(a.seconds for a in stalled)
        print(
            f"median latency {base * 1000:.2f} ms normal, {during * 1000:.2f} ms with "
            f"PostgreSQL stopped by SIGSTOP (max {max(a.seconds for a in stalled) * 1000:.1f} ms)"
        )
        assert [a.status for a in stalled] == [200] * 60
        assert still_frozen  # every answer came while PostgreSQL could not have given one


# --- what the database may hold, and what the host must provide -----------------------------


async def test_database_route_options_and_bad_rows(
    tmp_path: Path, dsn: str, backend: McpBackend
) -> None:
    """A route's options come from its row (here: auth required though the file says
    not); a route whose backend does not resolve is left out and logged, and the
    workers keep serving the rest."""
    with store.connect(dsn) as conn:
        store.add_route(conn, "/mcp", [backend.url], kind="mcp", options={"auth": "required"})
        store.add_route(conn, "/bad", ["http://no-such-host.invalid:80"])
        conn.commit()
    key = await new_key(dsn, "acme", "a")
    sections = cp_sections(dsn, tmp_path / "state", auth={"required": False})
    async with proxy_running(tmp_path, [], sections=sections) as proxy:
        await wait_for_status(proxy.port, 200, key)
        assert (await call(proxy.port)).status == 401
        assert (await call(proxy.port, credential=key, path="/bad")).status == 404
        skipped = [line for line in proxy.lines if line.get("event") == "snapshot_route_skipped"]
        assert skipped and all("/bad" in line["problem"] for line in skipped)
        assert not [line for line in proxy.lines if line.get("event") == "worker_exited"]


def test_unwritable_state_dir_is_refused_at_start(tmp_path: Path) -> None:
    config = tmp_path / "sb.toml"
    config.write_text(
        render_toml(
            {
                "server": {"listen": [f"127.0.0.1:{free_port()}"], "workers": 1},
                "admin": {"listen": ""},
                "database": {
                    "url": "postgresql://u:p@127.0.0.1:9/db",
                    "state_dir": "/proc/switchboard-state",
                },
            },
            [],
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(
        "switchboard: database.state_dir '/proc/switchboard-state' is not writable"
    )
    assert len(result.stderr.splitlines()) == 1
