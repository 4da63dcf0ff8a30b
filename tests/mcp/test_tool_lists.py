"""Per-caller tool lists end to end: API keys with allow-lists in real PostgreSQL (behind
PgBouncer), a two-worker proxy, an official-SDK backend that pages its ``tools/list``
(two tools a page) and marks it ``cacheScope: public``, answering with JSON or with an
event stream, in both protocol eras.

Each caller walks every page and sees only the tools it may call; a caller's call of a
hidden tool gets exactly what the backend answers for a tool it does not have, and the
backend never runs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.net import test_control_plane as control_plane
from tests.net.test_control_plane import (
    AUDIENCE,
    JWT_SECRET,
    acli,
    cp_sections,
    new_key,
    token,
    wait_for_status,
)
from tests.support.backends import HttpClient, proxy_running
from tests.support.mcp_servers import (
    HANDSHAKE_VERSION,
    MCP_ACCEPT,
    MODERN_VERSION,
    McpBackend,
    handshake_request,
    initialize_body,
    modern_request,
    rpc_response,
)
from tests.support.postgres import pg_fixture  # noqa: F401

dsn = control_plane.dsn
"""A fresh, migrated database behind PgBouncer (the control-plane suite's fixture)."""


class Caller:
    """One caller's MCP client over plain HTTP, in one era."""

    def __init__(self, port: int, credential: str, era: str) -> None:
        self.port = port
        self.credential = credential
        self.era = era
        self.session: str | None = None
        self.next_id = 1

    async def post(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        request_id = self.next_id
        self.next_id += 1
        headers = [
            ("Accept", MCP_ACCEPT),
            ("Content-Type", "application/json"),
            ("Authorization", f"Bearer {self.credential}"),
        ]
        if self.era == MODERN_VERSION:
            body = modern_request(request_id, method, params)
            headers += [("MCP-Protocol-Version", MODERN_VERSION), ("Mcp-Method", method)]
            if method == "tools/call" and params is not None:
                headers.append(("Mcp-Name", params["name"]))
        else:
            if self.session is None:
                await self._initialize()
            assert self.session is not None
            body = handshake_request(request_id, method, params)
            headers += [
                ("MCP-Protocol-Version", HANDSHAKE_VERSION),
                ("Mcp-Session-Id", self.session),
            ]
        status, content_type, answer, _ = await self._send(headers, body)
        assert status == 200, answer
        message = rpc_response(content_type, answer)
        assert message["id"] == request_id
        return message

    async def _initialize(self) -> None:
        headers = [
            ("Accept", MCP_ACCEPT),
            ("Content-Type", "application/json"),
            ("Authorization", f"Bearer {self.credential}"),
        ]
        status, _, answer, session = await self._send(headers, initialize_body(0))
        assert status == 200 and session is not None, answer
        self.session = session
        notified = handshake_request(None, "notifications/initialized")
        headers += [("MCP-Protocol-Version", HANDSHAKE_VERSION), ("Mcp-Session-Id", session)]
        status, _, _, _ = await self._send(headers, notified)
        assert status == 202

    async def _send(
        self, headers: list[tuple[str, str]], body: dict[str, Any]
    ) -> tuple[int, str, bytes, str | None]:
        client = await HttpClient.connect(self.port)
        try:
            with trio.fail_after(15):
                response = await client.request(
                    "POST", "/mcp", headers=headers, body=json.dumps(body).encode()
                )
        finally:
            await client.aclose()
        content_type = (response.header("content-type") or [""])[0]
        session = response.header("mcp-session-id")
        return response.status, content_type, response.body, session[0] if session else None

    async def list_tools(self) -> tuple[list[list[str]], list[dict[str, Any]]]:
        """Every page of ``tools/list``: the names on each page, and each page's result."""
        pages: list[list[str]] = []
        results: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            answer = await self.post("tools/list", {"cursor": cursor} if cursor else {})
            result = answer["result"]
            results.append(result)
            pages.append([tool["name"] for tool in result["tools"]])
            cursor = result.get("nextCursor")
            if not cursor:
                return pages, results


def without_id(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "id"}


@pytest.mark.parametrize("json_response", [True, False], ids=["json", "sse"])
async def test_each_caller_sees_only_its_tools_and_hidden_ones_look_unknown(
    tmp_path: Path, dsn: str, nursery: trio.Nursery, json_response: bool
) -> None:
    backend = McpBackend("r1", json_response=json_response, tools_page_size=2, public_lists=True)
    await nursery.start(backend.serve)
    await acli("routes", "add", "/mcp", backend.url, "--kind", "mcp", "--dsn", dsn)
    limited = await new_key(dsn, "acme", "limited", "--tools", "whoami,greet_user")
    counter = await new_key(dsn, "acme", "counter", "--tools", "count")
    unlimited = token()  # a JWT: no allow-list
    sections = cp_sections(
        dsn,
        tmp_path / "state",
        auth={"jwt_algorithms": ["HS256"], "jwt_secret": JWT_SECRET, "jwt_audience": AUDIENCE},
    )
    async with proxy_running(tmp_path, [], sections=sections, workers=2) as proxy:
        await wait_for_status(proxy.port, 200, limited)  # calls whoami, allowed to it
        whoami_ran = len(backend.whoami_calls)
        seen_before = len(backend.requests)
        for era in (MODERN_VERSION, HANDSHAKE_VERSION):
            everyone = Caller(proxy.port, unlimited, era)
            pages, results = await everyone.list_tools()
            assert pages == [["whoami", "count"], ["greet_user"]], era
            if era == MODERN_VERSION:
                # Public no more: a shared cache would hand one caller's view to another.
                assert {r["cacheScope"] for r in results} == {"private"}
                assert {r["ttlMs"] for r in results} == {60_000}

            pages, results = await Caller(proxy.port, limited, era).list_tools()
            assert pages == [["whoami"], ["greet_user"]], era
            pages, _ = await Caller(proxy.port, counter, era).list_tools()
            assert pages == [["count"], []], era

            # A hidden tool and one nobody has get the same answer, the one the backend
            # gives a caller allowed everything for a tool it does not have.
            caller = Caller(proxy.port, counter, era)
            hidden = await caller.post("tools/call", {"name": "whoami", "arguments": {}})
            unknown = await caller.post("tools/call", {"name": "nosuchtool", "arguments": {}})
            reference = await everyone.post("tools/call", {"name": "nosuchtool", "arguments": {}})
            assert without_id(unknown) == without_id(reference), era
            text = json.dumps(without_id(reference)).replace("nosuchtool", "whoami")
            assert without_id(hidden) == json.loads(text), era
            assert "whoami" in json.dumps(hidden)  # the backend's words name the tool

            allowed = await caller.post("tools/call", {"name": "count", "arguments": {"n": 1}})
            assert allowed["result"]["content"][0]["text"] == "counted 1", era

    assert len(backend.whoami_calls) == whoami_ran  # the hidden tool never ran
    posts = [r for r in backend.requests[seen_before:] if r.method == "POST"]
    assert all("authorization" not in r.headers for r in posts)
    assert not any(r.headers.get("mcp-name") == "whoami" for r in posts)
