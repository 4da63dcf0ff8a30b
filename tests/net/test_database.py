"""The supervisor's readiness probe against a real PostgreSQL behind a real PgBouncer:
PostgreSQL frozen with SIGSTOP (PgBouncer alive, so connections open and then hang)
turns ``/ready`` to 503 within the documented bound, ``ready_grace + poll_interval +
READY_PROBE_TIMEOUT`` (docs/control-plane.md), and back to 200 once it answers again.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio

from proxy.net.database import READY_PROBE_TIMEOUT
from tests.net.test_control_plane import acli, cp_sections, migrated, new_key, wait_for_status
from tests.support.backends import poll_until, proxy_running
from tests.support.mcp_servers import McpBackend
from tests.support.pg_outage import paused, running_cluster
from tests.support.proxy_process import ProxyProcess

GRACE = 1.0
POLL = 0.25
SCHEDULING_MARGIN = 3.0
"""Added to the bound for the assertion: the supervisor's timers and this test's polls
run late on a busy 2-core machine. The hang this catches took the grace plus the
workers' whole call timeout (1 + 5 s here) before it counted."""


@pytest.fixture
async def backend(nursery: trio.Nursery) -> McpBackend:
    server = McpBackend("r1", json_response=True)
    await nursery.start(server.serve)
    return server


def _ready(proxy: ProxyProcess) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{proxy.admin_url}/ready", timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


async def test_ready_degrades_within_the_bound_when_postgres_hangs(
    tmp_path: Path, backend: McpBackend
) -> None:
    async with running_cluster() as cluster:
        dsn = migrated(cluster.env.dsn(bouncer=True))
        await acli("routes", "add", "/mcp", backend.url, "--kind", "mcp", "--dsn", dsn)
        key = await new_key(dsn, "acme", "a")
        sections = cp_sections(
            dsn, tmp_path / "state", database={"ready_grace": GRACE, "poll_interval": POLL}
        )
        async with proxy_running(tmp_path, [], sections=sections) as proxy:
            await wait_for_status(proxy.port, 200, key)
            await poll_until(lambda: _ready(proxy)[0] == 200, limit=30)
            async with paused(cluster):
                frozen_at = time.monotonic()
                await poll_until(lambda: _ready(proxy)[0] == 503, limit=60, interval=0.05)
                took = time.monotonic() - frozen_at
                status, reason = _ready(proxy)
            await poll_until(lambda: _ready(proxy)[0] == 200, limit=60)
    bound = GRACE + POLL + READY_PROBE_TIMEOUT
    print(f"/ready 503 {took:.2f} s after PostgreSQL was frozen (documented bound {bound} s)")
    assert status == 503
    assert reason.startswith("degraded: PostgreSQL has not answered for ")
    assert took <= bound + SCHEDULING_MARGIN
