"""Requests and backend answers that tests of the connection machine send through it,
and the routes they are sent on (``routes_config``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.config import Config
from tests.support.machine import make_config

JWT_AUTH = {"jwt_algorithms": ["HS256"], "jwt_secret": "s" * 32}
"""Auth configured so that routes may require it (FakeEnv.identities does the checking)."""
ROUTES: tuple[dict[str, Any], ...] = (
    {"prefix": "/", "backends": ["http://10.0.0.1:80", "http://10.0.0.2:80"]},
    {"prefix": "/one", "backends": ["http://10.0.9.1:80"]},
    {"prefix": "/slow", "backends": ["http://10.0.2.1:80"], "response_timeout": 7},
    {"prefix": "/mcp", "kind": "mcp", "backends": ["http://10.0.1.1:80", "http://10.0.1.2:80"]},
    {
        "prefix": "/private",
        "auth": "required",
        "tenants": ["acme"],
        "backends": ["http://10.0.3.1:80"],
    },
    {"prefix": "/tools", "kind": "mcp", "auth": "required", "backends": ["http://10.0.4.1:80"]},
)
"""``/`` and ``/mcp`` have two replicas each; ``/one`` has one; ``/slow`` has its own
response_timeout (7 s); ``/private`` and ``/tools`` need credentials."""


def routes_config(**sections: Mapping[str, Any]) -> Config:
    """``ROUTES`` with ``sections`` (limits, upstream...) on top of the defaults."""
    return make_config(ROUTES, **{"auth": JWT_AUTH, **sections})


def mcp_post(body: bytes, *headers: bytes, target: bytes = b"/mcp") -> bytes:
    """A POST the way MCP SDK clients send one (Content-Length, both media types)."""
    extra = b"".join(header + b"\r\n" for header in headers)
    return (
        b"POST %s HTTP/1.1\r\nHost: proxy.example\r\nContent-Type: application/json\r\n"
        b"Accept: application/json, text/event-stream\r\n%sContent-Length: %d\r\n\r\n%s"
        % (target, extra, len(body), body)
    )


def call_2026(request_id: int = 7, tool: bytes = b"echo", *headers: bytes) -> bytes:
    """A 2026-07-28 tools/call: stateless, closing its stream cancels it."""
    body = (
        b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"%s","arguments":{},'
        b'"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}' % (request_id, tool)
    )
    return mcp_post(
        body,
        b"MCP-Protocol-Version: 2026-07-28",
        b"Mcp-Method: tools/call",
        b"Mcp-Name: " + tool,
        *headers,
    )


def call_2025(token: str, request_id: int = 7, tool: bytes = b"echo") -> bytes:
    """A 2025-11-25 tools/call in the session ``token`` (leaving is no cancellation)."""
    body = b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"%s"}}' % (
        request_id,
        tool,
    )
    return mcp_post(body, b"MCP-Protocol-Version: 2025-11-25", b"Mcp-Session-Id: " + token.encode())


def ok(body: bytes = b"hello", *headers: bytes, status: bytes = b"200 OK") -> bytes:
    """A backend's response with a Content-Length body."""
    extra = b"".join(header + b"\r\n" for header in headers)
    return b"HTTP/1.1 %s\r\n%bContent-Length: %d\r\n\r\n%s" % (status, extra, len(body), body)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
"""A backend's event stream head (its events follow as chunks)."""
