"""JSON-RPC batches where the protocol allows them: a 2025-03-26 session's batch goes to
its backend (the TypeScript SDK's reference "everything" server, which takes them)
through a two-worker proxy, and comes back as the backend answers it, directly and
through the proxy alike; a batch of a later revision is refused by the proxy and never
reaches a backend.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.mcp.conftest import key_sections
from tests.support.backends import HttpClient, poll_until, proxy_running
from tests.support.everything_server import EverythingServer, running_everything
from tests.support.mcp_servers import MCP_ACCEPT

BATCH_REVISION = "2025-03-26"
BATCH = [
    {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": "hi"}},
    },
    {"jsonrpc": "2.0", "id": 3, "method": "ping"},
    {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"},
]


@pytest.fixture
def everything(tmp_path: Path) -> Iterator[EverythingServer]:
    with running_everything(tmp_path / "everything") as server:
        yield server


async def post(
    port: int, body: Any, headers: list[tuple[str, str]]
) -> tuple[int, dict[str, list[str]], bytes]:
    client = await HttpClient.connect(port)
    try:
        with trio.fail_after(15):
            response = await client.request(
                "POST",
                "/mcp",
                headers=[("Accept", MCP_ACCEPT), ("Content-Type", "application/json"), *headers],
                body=json.dumps(body).encode(),
            )
    finally:
        await client.aclose()
    names = {name.decode().lower() for name, _ in response.headers}
    return response.status, {n: response.header(n) for n in names}, response.body


def messages(content_type: str, body: bytes) -> list[dict[str, Any]]:
    """The JSON-RPC messages of an answer: a JSON body (one or an array), or the data of
    each event of an event stream."""
    if content_type.startswith("text/event-stream"):
        found = []
        for line in body.decode().splitlines():
            if line.startswith("data:"):
                found.append(json.loads(line[5:]))
        return found
    decoded = json.loads(body)
    return decoded if isinstance(decoded, list) else [decoded]


async def open_session(port: int) -> str:
    """initialize at 2025-03-26, then notifications/initialized, as a client of that
    revision does: without MCP-Protocol-Version (the header came in 2025-06-18)."""
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": BATCH_REVISION,
            "capabilities": {},
            "clientInfo": {"name": "switchboard-tests", "version": "0"},
        },
    }
    status, headers, body = await post(port, initialize, [])
    assert status == 200, body
    [result] = messages(headers["content-type"][0], body)
    assert result["result"]["protocolVersion"] == BATCH_REVISION
    [session] = headers["mcp-session-id"]
    notified = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    status, _, _ = await post(port, notified, [("Mcp-Session-Id", session)])
    assert status == 202
    return session


async def answered_batch(port: int) -> list[dict[str, Any]]:
    session = await open_session(port)
    status, headers, body = await post(port, BATCH, [("Mcp-Session-Id", session)])
    assert status == 200, body
    return sorted(messages(headers["content-type"][0], body), key=lambda m: m["id"])


async def test_a_2025_03_26_batch_is_answered_through_the_proxy_as_directly(
    tmp_path: Path, everything: EverythingServer
) -> None:
    direct = await answered_batch(everything.port)
    assert [m["id"] for m in direct] == [2, 3]
    assert direct[0]["result"]["content"][0]["text"] == "Echo: hi"

    route = {"prefix": "/mcp", "backends": [everything.url], "kind": "mcp"}
    async with proxy_running(tmp_path, [route], sections=key_sections()) as proxy:
        proxied = await answered_batch(proxy.port)
        assert proxied == direct

        # A later revision's session sends its version with every request: a batch in
        # one is refused, and never reaches the backend.
        session = await open_session(proxy.port)
        for version in ("2025-06-18", "2025-11-25"):
            status, _, body = await post(
                proxy.port,
                BATCH,
                [("Mcp-Session-Id", session), ("MCP-Protocol-Version", version)],
            )
            assert status == 400
            error = json.loads(body)["error"]
            assert (
                error["code"] == -32600 and "batch of 3 messages not supported" in error["message"]
            )

        def refusals() -> list[dict[str, Any]]:
            return [line for line in proxy.access_lines() if line["status"] == 400]

        await poll_until(lambda: len(refusals()) >= 2, limit=10)
        assert [line["upstream"] for line in refusals()] == [None, None]
