"""Fixtures for the MCP end-to-end tests: official-SDK backends served in the test's trio
nursery, and the session key the proxies under test share."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from proxy.protocol.session_token import Keyring, SessionTokens
from tests.support.mcp_servers import McpBackend

SESSION_KID = "k1"
SESSION_SECRET = "switchboard-test-session-key-0123456789ab"  # 40 characters


def key_sections(kid: str = SESSION_KID, secret: str = SESSION_SECRET) -> dict[str, Any]:
    """The proxy config's ``[mcp] session_keys = {kid = secret}``, as the
    ``sections`` of ``run_proxy`` (whose TOML writer has no inline tables)."""
    return {"mcp.session_keys": {kid: secret}}


def tokens_for(kid: str = SESSION_KID, secret: str = SESSION_SECRET) -> SessionTokens:
    """What a proxy configured with this key signs and verifies session ids with."""
    return SessionTokens(Keyring({kid: secret.encode()}, kid))


@pytest.fixture
async def replicas(nursery: trio.Nursery) -> tuple[McpBackend, McpBackend]:
    """Two Streamable HTTP replicas, "r1" and "r2"; cancelled after the test.

    They answer with JSON bodies rather than one-event SSE streams: the affinity test
    sends 4,400 requests, and the SDK's per-response SSE machinery would nearly double
    what each costs on this shared 2-core machine (streams are covered elsewhere)."""
    pair = (McpBackend("r1", json_response=True), McpBackend("r2", json_response=True))
    for backend in pair:
        await nursery.start(backend.serve)
    return pair
