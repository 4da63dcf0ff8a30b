"""The official MCP SDK client and servers, through a ``kind = "mcp"`` route, in each of
the three ways the client connects:

- "2025-11-25": ``Client(url, mode="legacy")``, the initialize handshake over Streamable
  HTTP, with an ``Mcp-Session-Id`` session (the proxy's signed token on the client side,
  the backend's own id on the backend side);
- "2026-07-28": ``Client(url, mode="auto")``, which discovers the server and settles on
  the stateless single-exchange protocol;
- "legacy-sse": ``Client(sse_client(url), mode="legacy")``, the 2024-11-05 HTTP+SSE
  transport, whose ``endpoint`` event the proxy rewrites to carry a token.

Each does initialize (or discovery), tools/list, tools/call with progress notifications,
resources/read, prompts/get, and a tool that elicits from the client (a server-to-client
request mid-call on handshake-era connections, an input-required round at 2026-07-28).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import mcp_types as types
import pytest
import trio
from mcp.client import Client
from mcp.client.session import ClientRequestContext
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import TextContent, TextResourceContents

from proxy.routing import replica_id
from tests.mcp.conftest import key_sections, tokens_for
from tests.support.backends import poll_until, proxy_running
from tests.support.mcp_servers import (
    HANDSHAKE_VERSION,
    MODERN_VERSION,
    REPLICA_URI,
    TOOL_NAMES,
    McpBackend,
)

# The SDK client (httpx2) leaves SSE async generators for the garbage collector, which
# trio reports as ResourceWarning; that is the client's business, not the proxy's.
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

ERA_BY_MODE = {
    "2025-11-25": "2025-11-25",
    "2026-07-28": "2026-07-28",
    "legacy-sse": "2024-11-05 HTTP+SSE",
}
# Methods every mode must have sent through the proxy (2026-07-28 has no initialize).
METHODS_BY_MODE = {
    "2025-11-25": {
        "initialize",
        "notifications/initialized",
        "tools/list",
        "tools/call",
        "resources/read",
        "prompts/get",
    },
    "2026-07-28": {"server/discover", "tools/list", "tools/call", "resources/read", "prompts/get"},
    "legacy-sse": {
        "initialize",
        "notifications/initialized",
        "tools/list",
        "tools/call",
        "resources/read",
        "prompts/get",
    },
}

# How greet_user's elicitation crosses the proxy: (tools/call greet_user POSTs, POSTs
# carrying a JSON-RPC response). Handshake eras: the server's elicitation/create request
# rides the call's response stream (or the legacy GET stream) and the client POSTs its
# answer. 2026-07-28: the call returns an input-required result, and the client calls
# again with the answer in the request.
ELICITATION = {"2025-11-25": (1, 1), "2026-07-28": (2, 0), "legacy-sse": (1, 1)}


@dataclass
class ClientView:
    """What the client side saw."""

    session_ids_sent: list[str | None] = field(default_factory=list)
    """Mcp-Session-Id of every Streamable HTTP request (None where absent)."""
    legacy_session: list[str] = field(default_factory=list)
    """The session id in the legacy ``endpoint`` event."""
    elicitations: list[str] = field(default_factory=list)
    progress: list[tuple[float, float | None, str | None]] = field(default_factory=list)


@asynccontextmanager
async def _connect(mode: str, url: str, view: ClientView) -> AsyncIterator[Client]:
    async def elicitation_callback(
        context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult | types.ErrorData:
        view.elicitations.append(params.message)
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async def record_session(request: httpx2.Request) -> None:
        view.session_ids_sent.append(request.headers.get("mcp-session-id"))

    transport: AbstractAsyncContextManager[Any]
    if mode == "legacy-sse":
        transport = sse_client(url, on_session_created=view.legacy_session.append)
        async with Client(
            transport, mode="legacy", elicitation_callback=elicitation_callback
        ) as client:
            yield client
        return
    async with httpx2.AsyncClient(
        timeout=httpx2.Timeout(30.0, read=60.0), event_hooks={"request": [record_session]}
    ) as http:
        transport = streamable_http_client(url, http_client=http)
        client_mode = "legacy" if mode == "2025-11-25" else "auto"
        async with Client(
            transport, mode=client_mode, elicitation_callback=elicitation_callback
        ) as client:
            yield client


async def _exercise(client: Client, view: ClientView, replica: str) -> None:
    """The same conversation in every mode; every answer checked."""
    tools = await client.list_tools()
    assert {tool.name for tool in tools.tools} == TOOL_NAMES

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        view.progress.append((progress, total, message))

    # 0.15 s between steps: longer than the route's keep-alive interval, so the proxy
    # puts keep-alive comments between the progress events the client must still parse.
    result = await client.call_tool("count", {"n": 3, "delay": 0.15}, progress_callback=on_progress)
    assert not result.is_error
    assert isinstance(result.content[0], TextContent)
    assert result.content[0].text == "counted 3"
    assert view.progress == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]

    result = await client.call_tool("whoami", {})
    assert isinstance(result.content[0], TextContent)
    assert result.content[0].text == replica

    result = await client.call_tool("greet_user", {})
    assert not result.is_error, result
    assert isinstance(result.content[0], TextContent)
    assert result.content[0].text == f"hello Ada from {replica}"
    assert view.elicitations == ["What is your name?"]

    resource = await client.read_resource(REPLICA_URI)
    assert len(resource.contents) == 1
    assert isinstance(resource.contents[0], TextResourceContents)
    assert resource.contents[0].text == f"replica {replica}"

    prompt = await client.get_prompt("describe", {"topic": "proxies"})
    assert prompt.messages[0].role == "user"
    content = prompt.messages[0].content
    assert isinstance(content, TextContent)
    assert content.text == f"Describe proxies (asked of {replica})"


def _is_token(value: str | None) -> bool:
    return value is not None and value.startswith("v1.")


@pytest.mark.parametrize("mode", ["2025-11-25", "2026-07-28", "legacy-sse"])
async def test_sdk_client_through_proxy(nursery: trio.Nursery, tmp_path: Path, mode: str) -> None:
    backend = McpBackend("r1", legacy=mode == "legacy-sse")
    await nursery.start(backend.serve)
    route: dict[str, Any] = {
        "prefix": "/mcp",
        "kind": "mcp",
        "backends": [backend.url],
        "keepalive_interval": 0.05,
    }
    if backend.legacy:
        # /mcp/sse -> /sse; the endpoint event's /messages/ must come back as /mcp/messages/.
        route["strip_prefix"] = True
    view = ClientView()
    async with proxy_running(tmp_path, [route], sections=key_sections()) as proxy:
        with trio.fail_after(30):
            url = f"{proxy.url}/mcp/sse" if backend.legacy else f"{proxy.url}/mcp"
            async with _connect(mode, url, view) as client:
                expected_version = MODERN_VERSION if mode == "2026-07-28" else HANDSHAKE_VERSION
                assert client.protocol_version == expected_version
                await _exercise(client, view, "r1")
        # Access lines are written after each response; the last ones may still be coming.
        await poll_until(lambda: _all_logged(proxy.access_lines, mode), limit=10)
        lines = [line for line in proxy.access_lines() if line.get("route") == "/mcp"]

    assert lines
    assert {line["mcp_era"] for line in lines} == {ERA_BY_MODE[mode]}
    assert {line["replica"] for line in lines} == {replica_id(backend.url)}
    posts = [line for line in lines if line["method"] == "POST"]
    # The client got whole answers to everything, so nothing may be logged as an error.
    failed = [
        (line["mcp_method"], line["status"], line["error"])
        for line in posts
        if line["status"] not in (200, 202) or line["error"] is not None
    ]
    assert not failed
    calls = {line["mcp_name"] for line in posts if line["mcp_method"] == "tools/call"}
    assert calls == TOOL_NAMES
    assert {line["mcp_name"] for line in posts if line["mcp_method"] == "resources/read"} == {
        REPLICA_URI
    }
    assert {line["mcp_name"] for line in posts if line["mcp_method"] == "prompts/get"} == {
        "describe"
    }
    assert backend.elicited == ["Ada"]
    assert _elicitation_exchanges(posts) == ELICITATION[mode]

    if mode == "2025-11-25":
        _check_stateful_session(backend, view)
    elif mode == "2026-07-28":
        # No sessions at all: nothing to pin, nothing to rewrite.
        assert not any(r.session_id for r in backend.requests)
        assert not any(view.session_ids_sent)
        assert backend.whoami_calls == [(None, "r1")]
        assert "initialize" not in {line["mcp_method"] for line in lines}
    else:
        _check_legacy_session(backend, view)


def _elicitation_exchanges(posts: list[dict[str, Any]]) -> tuple[int, int]:
    """(greet_user calls, posted JSON-RPC responses): how the elicitation travelled."""
    greets = sum(1 for line in posts if line.get("mcp_name") == "greet_user")
    answers = sum(1 for line in posts if line.get("mcp_method") is None)
    return greets, answers


def _all_logged(access_lines: Callable[[], list[dict[str, Any]]], mode: str) -> bool:
    lines = access_lines()
    posts = [line for line in lines if line.get("method") == "POST"]
    seen = {line.get("mcp_method") for line in posts}
    # A streamed call is logged when the backend ends its stream, which may be after the
    # client, holding its response, has moved on: every call must be in.
    called = {line.get("mcp_name") for line in posts if line.get("mcp_method") == "tools/call"}
    return (
        METHODS_BY_MODE[mode] <= seen
        and called >= TOOL_NAMES
        and _elicitation_exchanges(posts) == ELICITATION[mode]
    )


def _check_stateful_session(backend: McpBackend, view: ClientView) -> None:
    """The client only ever saw the proxy's token; the backend only ever saw its own id."""
    assert len(backend.sessions_created) == 1
    backend_id = backend.sessions_created[0]
    assert not _is_token(backend_id)
    assert view.session_ids_sent[0] is None  # initialize
    sent = set(view.session_ids_sent[1:])
    assert len(sent) == 1
    (token,) = sent
    assert token is not None and _is_token(token)
    assert token != backend_id
    claims = tokens_for().verify(token)
    assert claims.backend_session == backend_id
    assert claims.replica == replica_id(backend.url)
    # Every request after initialize reached the backend with the backend's own id.
    after_initialize = [r for r in backend.requests if r.session_id is not None]
    assert len(after_initialize) == len(backend.requests) - 1
    assert {r.session_id for r in after_initialize} == {backend_id}
    assert backend.whoami_calls == [(backend_id, "r1")]


def _check_legacy_session(backend: McpBackend, view: ClientView) -> None:
    """The endpoint event the client got carries a token; the message POSTs reach the
    backend with its own session id."""
    assert len(view.legacy_session) == 1
    token = view.legacy_session[0]
    assert _is_token(token)
    claims = tokens_for().verify(token)
    assert claims.replica == replica_id(backend.url)
    backend_id = claims.backend_session
    assert not _is_token(backend_id)
    streams = [r for r in backend.requests if r.method == "GET"]
    assert [r.path for r in streams] == ["/sse"]
    posts = backend.mcp_posts()
    assert posts
    assert {r.path for r in posts} == {"/messages/"}
    assert {r.session_id for r in posts} == {backend_id}
    assert backend.whoami_calls == [(backend_id, "r1")]
