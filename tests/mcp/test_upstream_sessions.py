"""2026-07-28 clients through the proxy on backends that speak only 2025-11-25
(``backend_era = "2025-11-25"``, ``proxy.protocol.upstream_sessions``): the official
Python SDK client in 2026-07-28 mode and in auto mode, on the SDK server restricted to
the handshake era and on npm's ``server-everything``; two workers, real processes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import TextContent, TextResourceContents

from tests.mcp.conftest import key_sections
from tests.support.backends import poll_until, proxy_running
from tests.support.everything_server import running_everything
from tests.support.mcp_servers import (
    HANDSHAKE_VERSION,
    MODERN_VERSION,
    REPLICA_URI,
    TOOL_NAMES,
    McpBackend,
    modern_headers,
    modern_request,
)
from tests.support.ts_client import run_ts_client

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def _route(url: str) -> dict[str, Any]:
    return {
        "prefix": "/mcp",
        "kind": "mcp",
        "backends": [url],
        "backend_era": HANDSHAKE_VERSION,
        "keepalive_interval": 0.05,
    }


@asynccontextmanager
async def _client(url: str, mode: str) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(timeout=httpx2.Timeout(30.0, read=60.0)) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,
    ):
        yield client


@pytest.mark.parametrize("mode", [MODERN_VERSION, "auto"])
async def test_a_2026_07_28_sdk_client_uses_a_2025_11_25_only_backend(
    nursery: trio.Nursery, tmp_path: Path, mode: str
) -> None:
    backend = McpBackend("r1", handshake_only=True)
    await nursery.start(backend.serve)
    async with proxy_running(tmp_path, [_route(backend.url)], sections=key_sections()) as proxy:
        with trio.fail_after(30):
            async with _client(f"{proxy.url}/mcp", mode) as client:
                assert client.protocol_version == MODERN_VERSION
                tools = await client.list_tools()
                assert {t.name for t in tools.tools} == TOOL_NAMES
                steps: list[float] = []

                async def on_progress(
                    progress: float, total: float | None, message: str | None
                ) -> None:
                    steps.append(progress)

                result = await client.call_tool(
                    "count", {"n": 3, "delay": 0.1}, progress_callback=on_progress
                )
                assert isinstance(result.content[0], TextContent)
                assert result.content[0].text == "counted 3" and steps == [1, 2, 3]
                result = await client.call_tool("whoami", {})
                assert isinstance(result.content[0], TextContent) and result.content[0].text == "r1"
                resource = await client.read_resource(REPLICA_URI)
                assert isinstance(resource.contents[0], TextResourceContents)
                assert resource.contents[0].text == "replica r1"
                with pytest.raises(MCPError) as missing:
                    await client.read_resource("test://nowhere")
                assert missing.value.error.code == -32602  # 2026-07-28's code
                prompt = await client.get_prompt("describe", {"topic": "proxies"})
                content = prompt.messages[0].content
                assert isinstance(content, TextContent)
                assert content.text == "Describe proxies (asked of r1)"
                # Server-to-client requests cannot be carried: the client's elicitation
                # capability is not declared upstream, and the backend says so.
                with pytest.raises(MCPError) as refused:
                    await client.call_tool("greet_user", {})
                assert "elicitation" in refused.value.error.message
        await poll_until(lambda: len(proxy.access_lines()) >= 7, limit=10)
        lines = [line for line in proxy.access_lines() if line.get("route") == "/mcp"]

    assert {
        (line["mcp_era"], line["mcp_backend_era"], line["mcp_translated"]) for line in lines
    } == {(MODERN_VERSION, HANDSHAKE_VERSION, True)}
    posts = backend.mcp_posts()
    initializes = [r for r in posts if r.message().get("method") == "initialize"]
    # One session per worker at most, each opened once.
    assert 1 <= len(initializes) <= 2 and len(backend.sessions_created) == len(initializes)
    for seen in posts:
        assert seen.headers.get("mcp-protocol-version", HANDSHAKE_VERSION) == HANDSHAKE_VERSION
        assert "mcp-method" not in seen.headers
        if seen.message().get("method") != "initialize":
            assert seen.headers["mcp-session-id"] in backend.sessions_created
    assert not any(r.message().get("method") == "server/discover" for r in posts)


async def test_a_session_the_backend_forgets_is_opened_again(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = McpBackend("r1", handshake_only=True, json_response=True)
    await nursery.start(backend.serve)
    async with proxy_running(
        tmp_path, [_route(backend.url)], sections=key_sections(), workers=1
    ) as proxy:
        with trio.fail_after(30):
            async with _client(f"{proxy.url}/mcp", MODERN_VERSION) as client:
                assert (await client.call_tool("whoami", {})).content
                [first] = backend.sessions_created
                async with httpx2.AsyncClient() as http:
                    ended = await http.delete(
                        backend.endpoint,
                        headers={
                            "Mcp-Session-Id": first,
                            "MCP-Protocol-Version": HANDSHAKE_VERSION,
                        },
                    )
                assert ended.status_code == 200
                result = await client.call_tool("whoami", {})
                assert isinstance(result.content[0], TextContent) and result.content[0].text == "r1"
    assert len(backend.sessions_created) == 2
    calls = [r for r in backend.mcp_posts() if r.message().get("method") == "tools/call"]
    assert [r.headers["mcp-session-id"] for r in calls] == [
        first,
        first,
        backend.sessions_created[1],
    ]


async def test_a_2026_07_28_client_uses_npm_server_everything(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with running_everything(tmp_path / "everything") as everything:
        async with proxy_running(
            tmp_path, [_route(everything.url)], sections=key_sections()
        ) as proxy:
            with trio.fail_after(30):
                async with _client(f"{proxy.url}/mcp", MODERN_VERSION) as client:
                    assert client.protocol_version == MODERN_VERSION
                    tools = await client.list_tools()
                    assert "echo" in {t.name for t in tools.tools}
                    result = await client.call_tool("echo", {"message": "through"})
                    assert isinstance(result.content[0], TextContent)
                    assert "through" in result.content[0].text


async def test_the_typescript_v2_client_uses_a_2025_11_25_only_backend(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = McpBackend("r1", handshake_only=True)
    await nursery.start(backend.serve)
    async with proxy_running(tmp_path, [_route(backend.url)], sections=key_sections()) as proxy:
        report = await run_ts_client("v2", f"{proxy.url}/mcp", REPLICA_URI)
    assert report.get("error") is None, report
    steps = report["steps"]
    assert steps["tools/list"] == {"ok": True, "value": sorted(TOOL_NAMES)}, steps
    assert steps["tools/call"] == {
        "ok": True,
        "value": {"text": "counted 2", "progress": [[1, 2, "step 1"], [2, 2, "step 2"]]},
    }
    assert steps["resources/read"] == {"ok": True, "value": "replica r1"}
    assert steps["resources/read missing"]["code"] == -32602
    assert steps["prompts/get"] == {"ok": True, "value": "Describe proxies (asked of r1)"}
    sessions = {r.headers.get("mcp-session-id") for r in backend.mcp_posts()} - {None}
    assert sessions and sessions <= set(backend.sessions_created)


async def test_a_2026_07_28_client_closing_its_stream_cancels_the_upstream_request(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = McpBackend("r1", handshake_only=True)
    await nursery.start(backend.serve)
    body = modern_request(7, "tools/call", {"name": "count", "arguments": {"n": 50, "delay": 0.1}})
    body["params"]["_meta"]["progressToken"] = "p7"
    async with proxy_running(
        tmp_path, [_route(backend.url)], sections=key_sections(), workers=1
    ) as proxy:
        with trio.fail_after(30):
            async with (
                httpx2.AsyncClient(timeout=10) as http,
                http.stream(
                    "POST",
                    f"{proxy.url}/mcp",
                    json=body,
                    headers=dict(modern_headers("tools/call", "count")),
                ) as answer,
            ):
                assert answer.status_code == 200
                async for chunk in answer.aiter_raw():
                    if b"notifications/progress" in chunk:
                        break  # one step reported: the client goes

            def told() -> list[dict[str, Any]]:
                return [
                    r.message()
                    for r in backend.mcp_posts()
                    if r.message().get("method") == "notifications/cancelled"
                ]

            await poll_until(lambda: bool(told()), limit=10)
    [cancel] = told()
    assert cancel["params"]["requestId"] == 7
    [call] = [r for r in backend.mcp_posts() if r.message().get("method") == "tools/call"]
    [note] = [
        r for r in backend.mcp_posts() if r.message().get("method") == "notifications/cancelled"
    ]
    assert note.headers["mcp-session-id"] == call.headers["mcp-session-id"]


async def test_a_2026_07_28_listen_gets_resource_updates_from_a_2025_11_25_backend(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = McpBackend("r1", handshake_only=True, subscriptions=True)
    await nursery.start(backend.serve)
    async with proxy_running(
        tmp_path, [_route(backend.url)], sections=key_sections(), workers=1
    ) as proxy:
        with trio.fail_after(30):
            async with (
                _client(f"{proxy.url}/mcp", MODERN_VERSION) as client,
                client.listen(resource_subscriptions=[REPLICA_URI]) as subscription,
            ):
                assert backend.subscribed == [REPLICA_URI]
                touched = await client.call_tool("touch", {})
                assert isinstance(touched.content[0], TextContent)
                assert touched.content[0].text == "touched 1"
                event = await subscription.__anext__()
                assert getattr(event, "uri", None) == REPLICA_URI
    gets = [r for r in backend.requests if r.method == "GET"]
    [initialize_for_listen] = [
        r for r in backend.mcp_posts() if r.message().get("method") == "resources/subscribe"
    ]
    assert len(gets) == 1
    # The listen's own session: the GET and the subscription in it, not the calls'.
    assert gets[0].headers["mcp-session-id"] == initialize_for_listen.headers["mcp-session-id"]
    calls = [r for r in backend.mcp_posts() if r.message().get("method") == "tools/call"]
    assert calls[0].headers["mcp-session-id"] != gets[0].headers["mcp-session-id"]


@pytest.mark.parametrize(
    ("backend_kind", "mode"), [("modern_only", "legacy"), ("handshake_only", MODERN_VERSION)]
)
async def test_an_auto_route_translates_for_the_era_it_finds(
    nursery: trio.Nursery, tmp_path: Path, backend_kind: str, mode: str
) -> None:
    backend = McpBackend(
        "r1",
        modern_only=backend_kind == "modern_only",
        handshake_only=backend_kind == "handshake_only",
    )
    await nursery.start(backend.serve)
    route = {**_route(backend.url), "backend_era": "auto"}
    async with proxy_running(tmp_path, [route], sections=key_sections()) as proxy:
        with trio.fail_after(30):
            async with _client(f"{proxy.url}/mcp", mode) as client:
                result = await client.call_tool("whoami", {})
                assert isinstance(result.content[0], TextContent)
                assert result.content[0].text == "r1"

        def calls() -> list[dict[str, Any]]:
            return [line for line in proxy.access_lines() if line.get("mcp_method") == "tools/call"]

        # Access lines are written in batches after the answers: wait for the call's.
        await poll_until(lambda: bool(calls()), limit=10)
        lines = calls()
    found = "2026-07-28" if backend_kind == "modern_only" else HANDSHAKE_VERSION
    assert {(line["mcp_backend_era"], line["mcp_translated"]) for line in lines} == {(found, True)}
    # Each worker probed at most once. (A probe's discover names the proxy as its
    # client; a guard that refuses a request does not read its body.)
    probes = [
        r
        for r in backend.mcp_posts()
        if r.headers.get("mcp-method") == "server/discover"
        and (b"switchboard-probe" in r.body or not r.body)
    ]
    assert 1 <= len(probes) <= 2
