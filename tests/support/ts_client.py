"""The official TypeScript SDK as an MCP client, for tests: ``run_ts_client(sdk, url,
resource_uri)`` runs tests/support/node/ts_client.mjs with node and returns its report
(``make test`` installs the SDKs: npm ci in tests/support/node). ``sdk`` "v1":
``@modelcontextprotocol/sdk`` 1.x, a 2025-11-25 client (initialize, sessions); "v2":
``@modelcontextprotocol/client`` 2.x pinned to 2026-07-28 (stateless requests). The
conversation: connect, tools/list, tools/call of ``count`` with progress, resources/read
of ``resource_uri`` and of a missing resource, prompts/get of ``describe``; v1 then pings
and DELETEs its session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import trio

NODE_DIR = Path(__file__).resolve().parent / "node"
CLIENT = NODE_DIR / "ts_client.mjs"
SDKS = {
    "v1": NODE_DIR / "node_modules/@modelcontextprotocol/sdk/package.json",
    "v2": NODE_DIR / "node_modules/@modelcontextprotocol/client/package.json",
}


async def run_ts_client(sdk: str, url: str, resource_uri: str) -> dict[str, Any]:
    """The client's report: ``protocolVersion``, ``sessionId``, ``serverInfo`` and per
    step ``{"ok": true, "value": ...}`` or ``{"ok": false, "code", "message"}``."""
    node = shutil.which("node")
    if node is None or not SDKS[sdk].exists():
        raise RuntimeError("the TypeScript SDK is not installed: `make test` installs it")
    with trio.fail_after(30):
        done = await trio.run_process(
            [node, str(CLIENT), sdk, url, resource_uri],
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
