#!/usr/bin/env python3
"""The SDK's reference everything server speaking only 2026-07-28: a backend of the other
era for the 2025-11-25 suite run through Switchboard's era translation (run.py).

Run with conformance/.venv's Python, in conformance/.venv/everything-server (where
``mcp_everything_server`` is): ``python modern_only_server.py --port PORT``. The server
is the reference one, served as its own ``main`` serves it (Streamable HTTP at /mcp, its
event store, 100 ms retry interval, loopback), behind a middleware that answers what is
not a 2026-07-28 request as a server without the handshake does: a POST without
``MCP-Protocol-Version: 2026-07-28`` (``initialize`` and every later handshake-era
request) gets 400 with JSON-RPC -32022 "Unsupported protocol version", a GET or DELETE
405.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import uvicorn

sys.path.insert(0, str(Path.cwd()))  # mcp_everything_server lives where it is run
from mcp_everything_server.server import event_store, mcp

MODERN = b"2026-07-28"


def modern_only(app: Any) -> Any:
    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        version = dict(scope["headers"]).get(b"mcp-protocol-version", b"")
        if scope["method"] == "POST" and version == MODERN:
            await app(scope, receive, send)
            return
        if scope["method"] == "POST":
            status = 400
            error = {
                "code": -32022,
                "message": "Unsupported protocol version",
                "data": {"supported": ["2026-07-28"], "requested": version.decode() or None},
            }
            body = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()
        else:
            status, body = 405, b""
        headers = [(b"content-type", b"application/json"), (b"allow", b"POST")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return guarded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = mcp.streamable_http_app(event_store=event_store, retry_interval=100, host="127.0.0.1")
    uvicorn.run(modern_only(app), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
