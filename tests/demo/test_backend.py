"""End-to-end tests of the demo backend, driven by the official MCP SDK client under trio."""

from __future__ import annotations

from functools import partial

import httpx
import pytest
import trio
from mcp.client import Client
from mcp_types import TextContent, TextResourceContents
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

from proxy.demo.backend import GREETING_TEXT, GREETING_URI, serve

# The SDK client (httpx2) leaves SSE async generators for the garbage collector, which
# trio reports as ResourceWarning; that is the client's business, not the backend's.
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


@pytest.fixture
async def base_url(nursery: trio.Nursery) -> str:
    """Start the backend on a free loopback port; pytest-trio cancels it after the test."""
    port: int = await nursery.start(serve, "127.0.0.1", 0)
    return f"http://127.0.0.1:{port}"


# "legacy" forces the initialize handshake and a stateful Mcp-Session-Id session;
# "auto" probes server/discover and, against this SDK, settles on the stateless
# 2026-07-28 single-exchange protocol. A proxy has to carry both.
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_sdk_client_round_trip(base_url: str, mode: str) -> None:
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))

    with trio.fail_after(15):
        async with Client(f"{base_url}/mcp", mode=mode) as client:
            if mode == "legacy":
                assert client.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS
            else:
                assert client.protocol_version in MODERN_PROTOCOL_VERSIONS

            tools = await client.list_tools()
            assert {tool.name for tool in tools.tools} == {"echo", "add", "slow_count"}

            result = await client.call_tool("add", {"a": 2, "b": 3})
            assert not result.is_error
            assert result.structured_content == {"result": 5}
            assert isinstance(result.content[0], TextContent)
            assert result.content[0].text == "5"

            result = await client.call_tool("echo", {"text": "hi"})
            assert isinstance(result.content[0], TextContent)
            assert result.content[0].text == "hi"

            result = await client.call_tool("slow_count", {"n": 3}, progress_callback=on_progress)
            assert isinstance(result.content[0], TextContent)
            assert result.content[0].text == "done"
            assert [(done, total) for done, total, _ in updates] == [(1, 3), (2, 3), (3, 3)]

            resource = await client.read_resource(GREETING_URI)
            assert len(resource.contents) == 1
            assert isinstance(resource.contents[0], TextResourceContents)
            assert resource.contents[0].text == GREETING_TEXT

            prompt = await client.get_prompt("summarize", {"text": "a long story"})
            assert prompt.messages[0].role == "user"
            content = prompt.messages[0].content
            assert isinstance(content, TextContent)
            assert "a long story" in content.text


async def test_healthz(base_url: str) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{base_url}/healthz")
    assert response.status_code == 200
    assert response.text == "ok"


async def test_foreign_host_header_accepted_by_default(base_url: str) -> None:
    # A proxy may forward the client's Host unchanged; the backend must not answer 421.
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{base_url}/mcp",
            json=INITIALIZE,
            headers={**MCP_HEADERS, "Host": "switchboard.example:8080"},
        )
    assert response.status_code == 200
    assert response.headers["mcp-session-id"]


async def test_host_check_when_enabled(nursery: trio.Nursery) -> None:
    port: int = await nursery.start(partial(serve, "127.0.0.1", 0, allowed_hosts=["127.0.0.1:*"]))
    async with httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{port}/mcp"
        ok = await http.post(url, json=INITIALIZE, headers=MCP_HEADERS)
        rejected = await http.post(
            url, json=INITIALIZE, headers={**MCP_HEADERS, "Host": "switchboard.example:8080"}
        )
    assert ok.status_code == 200
    assert rejected.status_code == 421
