"""The admin endpoints of a real two-worker Switchboard, and what /metrics counts.

Requests go over fresh connections, so the kernel spreads them over both workers' listen
sockets (the access log's ``pid`` shows both served some); /metrics, aggregated across
the workers' multiprocess files, must count each of them exactly once, its output must
pass ``promtool check metrics`` without a lint remark, and its counters must survive a
worker killed with SIGKILL and restarted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.support.backends import (
    HttpBackend,
    HttpClient,
    backend_route,
    poll_until,
    proxy_running,
    wait_for_line,
)
from tests.support.proxy_process import ProxyProcess

WORKERS = 2
N = 300
M = 100
PARALLEL = 8
PREFIX = "/mcp"
PROMTOOL = "promtool"


@pytest.fixture
async def backend(nursery: trio.Nursery) -> HttpBackend:
    server = HttpBackend()
    await nursery.start(server.serve)
    return server


Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_metrics(text: str) -> Samples:
    """Sample name -> [(labels, value)], via prometheus_client's own parser."""
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((dict(sample.labels), sample.value))
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        value
        for sample_labels, value in samples.get(name, [])
        if all(sample_labels.get(k) == v for k, v in labels.items())
    )


async def fetch_metrics(proxy: ProxyProcess) -> str:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{proxy.admin_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def send_requests(proxy: ProxyProcess, paths: Sequence[str]) -> None:
    """One GET per path, each over its own fresh connection, ``PARALLEL`` at a time."""
    limiter = trio.CapacityLimiter(PARALLEL)
    failures: list[str] = []

    async def one(path: str) -> None:
        async with limiter:
            client = await HttpClient.connect(proxy.port)
            try:
                response = await client.request("GET", path)
            finally:
                await client.aclose()
            if response.status != 200:
                failures.append(f"{path}: {response.status}")

    async with trio.open_nursery() as nursery:
        for path in paths:
            nursery.start_soon(one, path)
    assert failures == []


async def wait_for_access_count(proxy: ProxyProcess, count: int) -> list[dict[str, Any]]:
    """The access lines once there are ``count`` of them. A worker writes its line after
    counting the request in its metrics, so by then every count is in /metrics."""
    try:
        await poll_until(lambda: len(proxy.access_lines()) >= count, limit=10.0, interval=0.02)
    except TimeoutError:
        raise AssertionError(
            f"{len(proxy.access_lines())} access lines, expected {count}"
        ) from None
    await trio.sleep(0.1)  # would let an extra, unexpected line show up
    lines = proxy.access_lines()
    assert len(lines) == count
    return lines


def promtool_check(text: str) -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output
    assert output.strip() == "", output  # lint problems are printed, one per line


def assert_counts(samples: Samples, requests: int) -> None:
    route = {"route": PREFIX}
    assert total(samples, "switchboard_requests_total", **route, status="200") == requests
    assert total(samples, "switchboard_requests_total") == requests  # no other route/status
    assert total(samples, "switchboard_request_duration_seconds_count", **route) == requests
    assert total(samples, "switchboard_request_duration_seconds_bucket", **route, le="+Inf") == (
        requests
    )
    assert total(samples, "switchboard_connections_total") == requests  # one per request
    assert total(samples, "switchboard_workers") == WORKERS
    assert total(samples, "switchboard_limit_rejections_total") == 0


async def test_metrics_count_every_request_across_workers_and_restarts(
    tmp_path: Path, backend: HttpBackend
) -> None:
    async with proxy_running(
        tmp_path, [backend_route(backend.port, PREFIX)], workers=WORKERS
    ) as proxy:
        original = proxy.worker_pids()
        assert len(original) == WORKERS

        await send_requests(proxy, [f"{PREFIX}/a/{i}" for i in range(N)])
        lines = await wait_for_access_count(proxy, N)
        assert {line["pid"] for line in lines} == set(original)  # both workers served
        assert len(backend.requests) == N

        text = await fetch_metrics(proxy)
        samples = parse_metrics(text)
        assert_counts(samples, N)
        assert total(samples, "switchboard_worker_restarts_total") == 0
        promtool_check(text)

        # SIGKILL one worker: the supervisor restarts it, and the dead worker's counts
        # stay in the aggregate.
        victim = original[0]
        os.kill(victim, signal.SIGKILL)
        await wait_for_line(
            proxy,
            lambda x: x.get("event") == "worker_started" and x.get("restarts") == 1,
            limit=10.0,
        )
        await poll_until(
            lambda: len(proxy.worker_pids()) == WORKERS and victim not in proxy.worker_pids(),
            limit=10.0,
        )
        current = proxy.worker_pids()
        assert original[1] in current

        await send_requests(proxy, [f"{PREFIX}/b/{i}" for i in range(M)])
        lines = await wait_for_access_count(proxy, N + M)
        assert {line["pid"] for line in lines[N:]} == set(current)
        assert len(backend.requests) == N + M

        text = await fetch_metrics(proxy)
        samples = parse_metrics(text)
        assert_counts(samples, N + M)
        assert total(samples, "switchboard_worker_restarts_total") == 1
        promtool_check(text)


async def test_admin_endpoints(tmp_path: Path, backend: HttpBackend) -> None:
    routes = [backend_route(backend.port, PREFIX), backend_route(backend.port, "/other")]
    async with (
        proxy_running(tmp_path, routes, workers=WORKERS) as proxy,
        httpx.AsyncClient(base_url=proxy.admin_url) as admin,
    ):
        health = await admin.get("/health")
        assert (health.status_code, health.text) == (200, "ok\n")

        ready = await admin.get("/ready")
        assert (ready.status_code, ready.text) == (200, "ready\n")

        services = await admin.get("/services")
        assert services.status_code == 200
        assert services.headers["content-type"] == "application/json"
        listing = json.loads(services.text)
        backend_url = f"http://127.0.0.1:{backend.port}"
        assert listing["routes"] == [
            {
                "prefix": PREFIX,
                "backends": [{"url": backend_url}],
                "host": "preserve",
                "strip_prefix": False,
            },
            {
                "prefix": "/other",
                "backends": [{"url": backend_url}],
                "host": "preserve",
                "strip_prefix": False,
            },
        ]
        assert listing["listen"] == [f"127.0.0.1:{proxy.port}"]
        assert listing["workers"] == WORKERS

        for path in ("/nope", "/metrics/extra", "/"):
            missing = await admin.get(path)
            assert missing.status_code == 404, path

        for method, path in (("POST", "/metrics"), ("PUT", "/health"), ("DELETE", "/ready")):
            refused = await admin.request(method, path)
            assert refused.status_code == 405, (method, path)

        # The admin port's own traffic is not proxied traffic: no requests counted.
        samples = parse_metrics(await fetch_metrics(proxy))
        assert total(samples, "switchboard_requests_total") == 0
        assert total(samples, "switchboard_workers") == WORKERS
        assert backend.requests == []
