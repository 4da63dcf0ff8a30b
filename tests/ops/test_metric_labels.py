"""Metric labels stay bounded: 1,000 requests with invented HTTP methods, JSON-RPC methods
and tool names to an MCP route of a real two-worker Switchboard (official-SDK backend)
add no series beyond the fixed label sets of ``proxy.labels`` (docs/operations.md).
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import trio

from proxy.labels import STATUS_LABELS
from proxy.mcp_routing import METHOD_LABELS
from tests.mcp.conftest import key_sections
from tests.ops.test_admin_metrics import fetch_metrics, parse_metrics, wait_for_access_count
from tests.support.backends import HttpClient, proxy_running
from tests.support.mcp_servers import MCP_ACCEPT, MODERN_VERSION, McpBackend, modern_request
from tests.support.proxy_process import ProxyProcess

REQUESTS = 1000
FIRST = 100
"""Requests of every kind before the first count: each kind's fold values exist by then."""
CONNECTIONS = 4


@pytest.fixture
async def backend(nursery: trio.Nursery) -> McpBackend:
    server = McpBackend("r1", json_response=True)
    await nursery.start(server.serve)
    return server


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(10))


def _request(rng: random.Random, i: int) -> tuple[str, list[tuple[str, str]], bytes]:
    """An invented HTTP method, an invented JSON-RPC method, or tools/call of an invented
    tool, in turn."""
    headers = [
        ("Accept", MCP_ACCEPT),
        ("Content-Type", "application/json"),
        ("MCP-Protocol-Version", MODERN_VERSION),
    ]
    if i % 3 == 0:
        # Without the 2026-07-28 version header: a 2025-11-25-era request, which the
        # proxy forwards whatever its method (the backend answers it).
        return "X" + _name(rng).upper(), [("Accept", MCP_ACCEPT)], b""
    if i % 3 == 1:
        method = f"{_name(rng)}/{_name(rng)}"
        body = modern_request(i, method, {})
        return "POST", [*headers, ("Mcp-Method", method)], json.dumps(body).encode()
    tool = _name(rng)
    body = modern_request(i, "tools/call", {"name": tool, "arguments": {}})
    extra = [("Mcp-Method", "tools/call"), ("Mcp-Name", tool)]
    return "POST", [*headers, *extra], json.dumps(body).encode()


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (name, tuple(sorted(labels.items())))
        for name, samples in parse_metrics(text).items()
        for labels, _ in samples
    }


async def send(proxy: ProxyProcess, rng: random.Random, indices: range) -> list[int]:
    statuses: list[int] = []
    todo = iter(indices)

    async def connection() -> None:
        client = await HttpClient.connect(proxy.port)
        try:
            for i in todo:
                method, headers, body = _request(rng, i)
                response = await client.request(method, "/mcp", headers=headers, body=body)
                statuses.append(response.status)
                if response.header("connection") == ["close"]:
                    await client.aclose()
                    client = await HttpClient.connect(proxy.port)
        finally:
            await client.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(CONNECTIONS):
            nursery.start_soon(connection)
    return statuses


async def test_random_methods_and_tools_add_no_series(tmp_path: Path, backend: McpBackend) -> None:
    route = {"prefix": "/mcp", "backends": [backend.url], "kind": "mcp"}
    rng = random.Random(13)
    async with proxy_running(tmp_path, [route], sections=key_sections()) as proxy:
        # Workers publish their counts a few times a second; a request's access line is
        # written once its counts are published, so each scrape waits for the lines.
        first = await send(proxy, rng, range(FIRST))
        await wait_for_access_count(proxy, FIRST)
        after_first = series(await fetch_metrics(proxy))
        rest = await send(proxy, rng, range(FIRST, REQUESTS))
        await wait_for_access_count(proxy, REQUESTS)
        after_all = series(await fetch_metrics(proxy))
    assert len(first) + len(rest) == REQUESTS
    print(
        f"series after {FIRST} invented requests: {len(after_first)}, after {REQUESTS}: "
        f"{len(after_all)}; statuses {sorted(set(first + rest))}"
    )
    assert after_all == after_first
    for name, labels in after_all:
        values = dict(labels)
        if name.startswith("switchboard_mcp_request"):
            assert values["method"] in METHOD_LABELS, (name, values)
        if "status" in values:
            assert values["status"] in STATUS_LABELS, (name, values)
