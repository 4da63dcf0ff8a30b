"""Era translation through the proxy (``backend_era = "2026-07-28"``): the official
Python SDK client in its handshake mode (2025-11-25) on a backend that speaks only
2026-07-28 (``McpBackend(modern_only=True)``), through two workers, real processes; and
a translated session continuing on other workers and on a second proxy with the same
session keys."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import mcp_types as types
import pytest
import trio
from mcp.client import Client
from mcp.client.session import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_types import TextContent, TextResourceContents

from proxy.protocol.eras import CLIENT_CAPABILITIES_META_KEY, CLIENT_INFO_META_KEY
from tests.mcp.conftest import key_sections
from tests.support.backends import poll_until, proxy_running
from tests.support.mcp_servers import (
    HANDSHAKE_VERSION,
    MCP_ACCEPT,
    MODERN_VERSION,
    REPLICA_URI,
    TOOL_NAMES,
    McpBackend,
    handshake_request,
    initialize_body,
    rpc_response,
)
from tests.support.proxy_process import ProxyProcess
from tests.support.ts_client import run_ts_client

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

TRANSLATED_SERIES = (
    'switchboard_mcp_translated_total{backend_era="2026-07-28",client_era="2025-11-25",'
    'route="/mcp"}'
)


def _route(backend: McpBackend) -> dict[str, Any]:
    return {
        "prefix": "/mcp",
        "kind": "mcp",
        "backends": [backend.url],
        "backend_era": MODERN_VERSION,
        "keepalive_interval": 0.05,
    }


@asynccontextmanager
async def _sdk_client(url: str, mode: str, elicited: list[str]) -> AsyncIterator[Client]:
    async def elicitation_callback(
        context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult:
        elicited.append(params.message)
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0, read=60.0)) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(
            transport, mode=mode, elicitation_callback=elicitation_callback
        ) as client:
            yield client


async def _converse(client: Client) -> None:
    """What a 2025-11-25 client does, each answer checked."""
    tools = await client.list_tools()
    assert {t.name for t in tools.tools} == TOOL_NAMES
    steps: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        steps.append((progress, total, message))

    # 0.1 s between steps: the progress events stream through the proxy (not held),
    # with keep-alive comments between them.
    result = await client.call_tool("count", {"n": 3, "delay": 0.1}, progress_callback=on_progress)
    assert isinstance(result.content[0], TextContent) and not result.is_error
    assert result.content[0].text == "counted 3"
    assert steps == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]
    result = await client.call_tool("whoami", {})
    assert isinstance(result.content[0], TextContent) and result.content[0].text == "r1"
    resource = await client.read_resource(REPLICA_URI)
    assert isinstance(resource.contents[0], TextResourceContents)
    assert resource.contents[0].text == "replica r1"
    with pytest.raises(MCPError) as missing:
        await client.read_resource("test://nowhere")
    assert missing.value.error.code == -32002  # 2025-11-25's code, not 2026-07-28's -32602
    prompt = await client.get_prompt("describe", {"topic": "proxies"})
    content = prompt.messages[0].content
    assert isinstance(content, TextContent)
    assert content.text == "Describe proxies (asked of r1)"
    with pytest.warns(MCPDeprecationWarning):
        await client.send_ping()  # answered by the proxy
    with pytest.warns(MCPDeprecationWarning):
        await client.set_logging_level("info")  # answered by the proxy


async def _translated_count(proxy: ProxyProcess) -> float:
    async with httpx2.AsyncClient() as http:
        text = (await http.get(f"{proxy.admin_url}/metrics")).text
    for line in text.splitlines():
        if line.startswith(TRANSLATED_SERIES + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_2025_11_25_sdk_client_uses_a_2026_07_28_only_backend(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = McpBackend("r1", modern_only=True)
    await nursery.start(backend.serve)
    elicited: list[str] = []
    async with proxy_running(tmp_path, [_route(backend)], sections=key_sections()) as proxy:
        with trio.fail_after(30):
            async with _sdk_client(f"{proxy.url}/mcp", "legacy", elicited) as client:
                assert client.protocol_version == HANDSHAKE_VERSION
                await _converse(client)
                # The backend would ask for the name with an input-required result, which
                # a translated session cannot carry: the client's elicitation capability
                # is not passed on, and the backend says what it needed.
                with pytest.raises(MCPError) as refused:
                    await client.call_tool("greet_user", {})
                assert "elicitation" in refused.value.error.message
        assert elicited == []

        def logged() -> list[dict[str, Any]]:
            return [line for line in proxy.access_lines() if line.get("route") == "/mcp"]

        # initialize, initialized, GET (405), 9 posts, DELETE at the end.
        await poll_until(lambda: any(line["method"] == "DELETE" for line in logged()), limit=10)
        for _ in range(50):  # the workers publish their counts a few times a second
            count = await _translated_count(proxy)
            if count >= len(logged()):
                break
            await trio.sleep(0.1)
        lines = logged()

    assert {
        (line["mcp_era"], line["mcp_backend_era"], line["mcp_translated"]) for line in lines
    } == {("2025-11-25", MODERN_VERSION, True)}
    assert {line["status"] for line in lines if line["method"] == "GET"} == {405}
    assert count == len(lines)
    posts = backend.mcp_posts()
    assert [r for r in backend.requests if r.method != "POST"] == []
    assert {r.headers["mcp-method"] for r in posts} == {
        "server/discover",
        "tools/list",
        "tools/call",
        "resources/read",
        "prompts/get",
    }
    for seen in posts:
        assert seen.headers["mcp-protocol-version"] == MODERN_VERSION
        assert "mcp-session-id" not in seen.headers
        meta = seen.message()["params"]["_meta"]
        assert meta[CLIENT_INFO_META_KEY]["name"] == "mcp"
        assert "elicitation" not in meta[CLIENT_CAPABILITIES_META_KEY]


async def test_a_2026_07_28_client_on_the_route_is_not_translated(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = McpBackend("r1", modern_only=True)
    await nursery.start(backend.serve)
    elicited: list[str] = []
    async with proxy_running(tmp_path, [_route(backend)], sections=key_sections()) as proxy:
        with trio.fail_after(30):
            async with _sdk_client(f"{proxy.url}/mcp", "auto", elicited) as client:
                assert client.protocol_version == MODERN_VERSION
                result = await client.call_tool("greet_user", {})
                assert isinstance(result.content[0], TextContent)
                assert result.content[0].text == "hello Ada from r1"
        await poll_until(lambda: len(proxy.access_lines()) >= 3, limit=10)
        lines = [line for line in proxy.access_lines() if line.get("route") == "/mcp"]
    assert elicited == ["What is your name?"]
    assert {(line["mcp_era"], line["mcp_translated"]) for line in lines} == {
        (MODERN_VERSION, False)
    }


async def _post(url: str, body: dict[str, Any], session: str | None) -> httpx2.Response:
    """One POST on a connection of its own (so the kernel may hand it to any worker)."""
    headers = {"Accept": MCP_ACCEPT, "MCP-Protocol-Version": HANDSHAKE_VERSION}
    if session is not None:
        headers["Mcp-Session-Id"] = session
    async with httpx2.AsyncClient(timeout=10) as http:
        return await http.post(url, json=body, headers=headers)


async def test_a_translated_session_continues_on_every_worker_and_another_proxy(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = McpBackend("r1", modern_only=True, json_response=True)
    await nursery.start(backend.serve)
    route = _route(backend)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        proxy_running(tmp_path / "a", [route], sections=key_sections()) as first,
        proxy_running(tmp_path / "b", [route], sections=key_sections()) as second,
    ):
        with trio.fail_after(60):
            body = initialize_body()
            body["params"]["clientInfo"] = {"name": "roaming-agent", "version": "7"}
            body["params"]["capabilities"] = {"experimental": {"x": {}}}
            answer = await _post(f"{first.url}/mcp", body, None)
            assert answer.status_code == 200
            session = answer.headers["mcp-session-id"]
            assert (
                rpc_response(answer.headers["content-type"], answer.content)["result"][
                    "protocolVersion"
                ]
                == HANDSHAKE_VERSION
            )

            def workers_seen(proxy: ProxyProcess) -> set[int]:
                return {
                    line["worker"]
                    for line in proxy.access_lines()
                    if line.get("mcp_method") == "tools/call"
                }

            calls = 0
            for proxy, wanted in ((first, 2), (second, 1)):
                while len(workers_seen(proxy)) < wanted:
                    calls += 1
                    call = handshake_request(calls, "tools/call", {"name": "whoami"})
                    reply = await _post(f"{proxy.url}/mcp", call, session)
                    assert reply.status_code == 200
                    message = rpc_response(reply.headers["content-type"], reply.content)
                    assert message["result"]["content"][0]["text"] == "r1"
                    await trio.sleep(0.3)  # the access line's batch
                    assert calls < 40, "the kernel never handed a connection to the other worker"
    calls_seen = [
        r.message() for r in backend.mcp_posts() if r.headers["mcp-method"] == "tools/call"
    ]
    assert len(calls_seen) == calls
    for message in calls_seen:
        meta = message["params"]["_meta"]
        assert meta[CLIENT_INFO_META_KEY] == {"name": "roaming-agent", "version": "7"}
        assert meta[CLIENT_CAPABILITIES_META_KEY] == {"experimental": {"x": {}}}


async def test_the_typescript_v1_client_uses_a_2026_07_28_only_backend(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = McpBackend("r1", modern_only=True)
    await nursery.start(backend.serve)
    async with proxy_running(tmp_path, [_route(backend)], sections=key_sections()) as proxy:
        report = await run_ts_client("v1", f"{proxy.url}/mcp", REPLICA_URI)
    assert report.get("error") is None
    assert report["protocolVersion"] == HANDSHAKE_VERSION
    assert report["serverInfo"]["name"] == "test-r1"
    steps = report["steps"]
    assert steps["tools/list"] == {"ok": True, "value": sorted(TOOL_NAMES)}
    assert steps["tools/call"] == {
        "ok": True,
        "value": {"text": "counted 2", "progress": [[1, 2, "step 1"], [2, 2, "step 2"]]},
    }
    assert steps["resources/read"] == {"ok": True, "value": "replica r1"}
    assert steps["resources/read missing"]["code"] == -32002
    assert steps["prompts/get"] == {"ok": True, "value": "Describe proxies (asked of r1)"}
    assert steps["ping"]["ok"]
    assert {r.headers["mcp-method"] for r in backend.mcp_posts()} == {
        "server/discover",
        "tools/list",
        "tools/call",
        "resources/read",
        "prompts/get",
    }
