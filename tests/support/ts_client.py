"""The TypeScript SDK 1.x as an MCP client (2025-11-25 Streamable HTTP), for tests:
``run_handshake_client(url, resource_uri)`` runs tests/support/node/handshake_client.mjs
with node and returns its report (``make test`` installs the SDK: npm ci in
tests/support/node). The conversation: connect (initialize), tools/list, tools/call of
``count`` with progress, resources/read of ``resource_uri`` and of a missing resource,
prompts/get of ``describe``, ping, then DELETE of the session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import trio

NODE_DIR = Path(__file__).resolve().parent / "node"
CLIENT = NODE_DIR / "handshake_client.mjs"
SDK = NODE_DIR / "node_modules/@modelcontextprotocol/sdk/package.json"


async def run_handshake_client(url: str, resource_uri: str) -> dict[str, Any]:
    """The client's report: ``protocolVersion``, ``sessionId``, ``serverInfo`` and per
    step ``{"ok": true, "value": ...}`` or ``{"ok": false, "code", "message"}``."""
    node = shutil.which("node")
    if node is None or not SDK.exists():
        raise RuntimeError("the TypeScript SDK is not installed: `make test` installs it")
    with trio.fail_after(30):
        done = await trio.run_process(
            [node, str(CLIENT), url, resource_uri],
            cwd=NODE_DIR,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    if done.returncode != 0 or not done.stdout.strip():
        raise AssertionError(
            f"the TypeScript client failed ({done.returncode}): "
            f"{done.stdout.decode(errors='replace')} {done.stderr.decode(errors='replace')}"
        )
    report: dict[str, Any] = json.loads(done.stdout.decode().splitlines()[-1])
    return report
