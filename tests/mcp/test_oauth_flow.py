"""MCP authorization through the proxy, end to end: a real authorization server (the MCP
SDK's authorization-server handlers: metadata, dynamic registration, authorization code
with PKCE, RS256 JWTs; tests/support/oauth_server.py), a two-worker proxy whose MCP route
is an OAuth resource, an official-SDK backend, and the official SDK client's OAuth
support.

Given only the proxy's URL, the client meets the 401, reads the resource metadata it
names, registers, is authorized, gets a token for the resource and calls tools, in both
protocol eras; the backend never sees the token, and learns the caller from the proxy's
headers. Each refusal has its status and challenge.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest
import trio
from mcp.client import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthToken,
)
from mcp_types import TextContent
from pydantic import AnyUrl

from tests.mcp.conftest import key_sections
from tests.support.backends import HttpClient, proxy_running
from tests.support.mcp_servers import McpBackend, modern_headers, modern_request
from tests.support.oauth_server import SUBJECT, AuthServer
from tests.support.proxy_process import ProxyProcess, free_port

SCOPE = "mcp"


class MemoryStorage:
    """The client's token storage (mcp.client.auth.TokenStorage), in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


@asynccontextmanager
async def oauth_client(url: str, mode: str) -> AsyncIterator[Client]:
    """The SDK client with its OAuth provider; the "browser" follows the authorization
    URL and hands the code in the redirect back to the client."""
    redirect: dict[str, str | None] = {}

    async def redirect_handler(authorization_url: str) -> None:
        async with httpx2.AsyncClient() as browser:
            response = await browser.get(authorization_url, follow_redirects=False)
        assert response.status_code in (302, 303, 307), response.text
        query = parse_qs(urlsplit(response.headers["location"]).query)
        redirect["code"] = query["code"][0]
        redirect["state"] = query.get("state", [None])[0]

    async def callback_handler() -> AuthorizationCodeResult:
        code = redirect["code"]
        assert code is not None
        return AuthorizationCodeResult(code=code, state=redirect["state"])

    provider = OAuthClientProvider(
        server_url=url,
        client_metadata=OAuthClientMetadata(
            client_name="switchboard-tests",
            redirect_uris=[AnyUrl("http://127.0.0.1:9/callback")],
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
        ),
        storage=MemoryStorage(),
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
    )
    async with (
        httpx2.AsyncClient(auth=provider, timeout=httpx2.Timeout(30.0)) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,
    ):
        yield client


async def raw_call(proxy: ProxyProcess, token: str | None) -> tuple[int, str, Any]:
    """One 2026-07-28 tools/call with ``token``: (status, WWW-Authenticate, body)."""
    headers = modern_headers("tools/call", "whoami")
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    body = json.dumps(modern_request(1, "tools/call", {"name": "whoami", "arguments": {}}))
    client = await HttpClient.connect(proxy.port)
    try:
        with trio.fail_after(15):
            response = await client.request("POST", "/mcp", headers=headers, body=body.encode())
    finally:
        await client.aclose()
    challenge = response.header("www-authenticate")
    return response.status, challenge[0] if challenge else "", response.body


@pytest.fixture
async def auth_server(nursery: trio.Nursery) -> AuthServer:
    server = AuthServer(scopes=[SCOPE])
    await nursery.start(server.serve)
    return server


async def test_the_sdk_client_gets_a_token_through_the_proxy_and_calls_tools(
    tmp_path: Path, nursery: trio.Nursery, auth_server: AuthServer
) -> None:
    backend = McpBackend("r1")
    await nursery.start(backend.serve)
    port = free_port()
    resource = f"http://127.0.0.1:{port}/mcp"
    metadata_url = f"http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp"
    route = {
        "prefix": "/mcp",
        "kind": "mcp",
        "backends": [backend.url],
        "oauth": {
            "resource": resource,
            "authorization_servers": [auth_server.issuer],
            "scopes": [SCOPE],
            "caller_headers": {"subject": "x-mcp-subject", "client_id": "x-mcp-client"},
        },
    }
    sections = {
        **key_sections(),
        "server": {"listen": [f"127.0.0.1:{port}"]},
        "auth": {"jwt_algorithms": ["RS256"], "jwt_jwks_url": auth_server.jwks_url},
    }
    async with proxy_running(tmp_path, [route], sections=sections, workers=2) as proxy:
        # The key set is fetched in the background at start: wait until a token verifies.
        valid = auth_server.mint(aud=resource)
        for _ in range(200):
            if (await raw_call(proxy, valid))[0] == 200:
                break
            await trio.sleep(0.1)
        else:
            raise AssertionError("the proxy never accepted a valid token")

        async with httpx2.AsyncClient() as http:
            metadata = (await http.get(metadata_url)).json()
        assert metadata == {
            "resource": resource,
            "authorization_servers": [auth_server.issuer],
            "bearer_methods_supported": ["header"],
            "scopes_supported": [SCOPE],
        }

        for mode in ("legacy", "auto"):  # 2025-11-25, then 2026-07-28
            async with oauth_client(resource, mode) as client:
                tools = await client.list_tools()
                assert {t.name for t in tools.tools} >= {"whoami", "count"}, mode
                result = await client.call_tool("whoami", {})
                assert isinstance(result.content[0], TextContent)
                assert result.content[0].text == "r1", mode

        # Each refusal: its status, and a challenge that says where to get a token.
        challenge = f'resource_metadata="{metadata_url}", scope="{SCOPE}"'
        status, www, _ = await raw_call(proxy, None)
        assert (status, www) == (401, f"Bearer {challenge}")
        for why, token in {
            "wrong audience": auth_server.mint(aud="http://127.0.0.1:1/mcp"),
            "no audience": auth_server.mint(aud=None),
            "wrong issuer": auth_server.mint(aud=resource, iss="http://127.0.0.1:1"),
            "expired": auth_server.mint(aud=resource, exp=1_000_000_000),
            "alg none": _unsigned(aud=resource, iss=auth_server.issuer),
        }.items():
            status, www, body = await raw_call(proxy, token)
            assert (status, www) == (401, f'Bearer error="invalid_token", {challenge}'), why
            assert json.loads(body)["error"]["code"] == -32001, why
        status, www, _ = await raw_call(proxy, auth_server.mint(aud=resource, scope="other"))
        assert (status, www) == (403, f'Bearer error="insufficient_scope", {challenge}')

    # Two clients, two eras: two registrations, two tokens, both for this resource.
    assert len(auth_server.issued) == 2
    assert {claims["aud"] for claims in auth_server.issued} == {resource}
    posts = [r for r in backend.requests if r.method == "POST"]
    assert posts and all("authorization" not in r.headers for r in posts)
    assert {r.headers.get("x-mcp-subject") for r in posts} == {SUBJECT}
    clients = {claims["client_id"] for claims in auth_server.issued} | {"minted"}
    assert {r.headers.get("x-mcp-client") for r in posts} <= clients


def _unsigned(**claims: Any) -> str:
    import base64
    import time

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    payload = {"sub": "mallory", "scope": SCOPE, "exp": time.time() + 60} | claims
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."
