"""While a request waits for its backend's response head: cancellation and timeouts.

- 2026-07-28: closing the connection IS the cancellation of the request, also before
  the response head arrived: the proxy must close the upstream request at once (and
  log 499). In 2025-11-25 a disconnect is not a cancellation: the backend finishes.
- A tool call may take minutes: MCP routes wait for the response head up to
  ``upstream.mcp_response_timeout`` (default 300 s), not the ``upstream.response_timeout``
  of plain HTTP routes, unless the route sets a ``response_timeout`` of its own (absent
  or 0: its kind's default).

The backend is a scripted raw one: it reads the request, waits, and answers with a JSON
body, recording whether the proxy closed the connection before it answered.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from tests.mcp.conftest import key_sections
from tests.support.mcp_servers import (
    HANDSHAKE_VERSION,
    MCP_ACCEPT,
    MODERN_VERSION,
    handshake_request,
    modern_request,
)
from tests.support.proxy_process import ProxyProcess, run_proxy
from tests.support.raw_backend import (
    RawClient,
    RecordingBackend,
    eventually,
    open_client,
    wait_for_access,
)

TOOL = "slow_tool"
REQUEST_ID = 7
CANCEL_DELAY = 4.0
"""How long the backend takes to answer the cancelled (or not) tool call."""
LEAVE_AFTER = 0.5
"""When the client closes its connection, counted from sending the request."""
HEAD_TIMEOUT = 1.0
SLOW_ANSWER = 2.5
"""Longer than HEAD_TIMEOUT, far below the MCP default of 300 s."""


def json_reply(request_id: int) -> bytes:
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": request_id,
            "result": {"content": [{"type": "text", "text": "done"}], "isError": False},
        }
    ).encode()
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % len(body) + body
    )


def post(body: dict[str, Any], headers: Mapping[str, str]) -> bytes:
    payload = json.dumps(body).encode()
    head = {
        "Host": "example.test",
        "Content-Type": "application/json",
        "Accept": MCP_ACCEPT,
        **headers,
        "Content-Length": str(len(payload)),
    }
    lines = "".join(f"{name}: {value}\r\n" for name, value in head.items())
    return f"POST /mcp HTTP/1.1\r\n{lines}\r\n".encode() + payload


def modern_tools_call() -> bytes:
    """A 2026-07-28 tools/call: headers that agree with the body's ``_meta``."""
    body = modern_request(REQUEST_ID, "tools/call", {"name": TOOL, "arguments": {}})
    headers = {"MCP-Protocol-Version": MODERN_VERSION, "Mcp-Method": "tools/call", "Mcp-Name": TOOL}
    return post(body, headers)


def handshake_tools_call() -> bytes:
    """A 2025-11-25 tools/call (no session: the backend here does not keep any)."""
    body = handshake_request(REQUEST_ID, "tools/call", {"name": TOOL, "arguments": {}})
    return post(body, {"MCP-Protocol-Version": HANDSHAKE_VERSION})


@contextmanager
def proxy_to(
    tmp_path: Path,
    backend: RecordingBackend,
    *,
    kind: str = "mcp",
    upstream: Mapping[str, Any] | None = None,
    **route: Any,
) -> Iterator[ProxyProcess]:
    sections: dict[str, Mapping[str, Any]] = {
        "server": {"drain_timeout": 1.0},
        "upstream": upstream or {},
        **key_sections(),
    }
    prefix = "/mcp" if kind == "mcp" else "/"
    routes: list[Mapping[str, Any]] = [
        {"prefix": prefix, "kind": kind, "backends": [backend.url], **route}
    ]
    with run_proxy(tmp_path, routes, workers=1, sections=sections) as proxy:
        yield proxy


async def access_status(proxy: ProxyProcess, client: RawClient) -> int:
    """The status of the connection's one access line; an error status comes with an
    ``error``."""
    port = client.local_port
    line = await wait_for_access(proxy, lambda entry: entry.get("port") == port)
    status = line["status"]
    assert isinstance(status, int), line
    if status >= 400:
        assert isinstance(line["error"], str) and line["error"], line
    assert [entry for entry in proxy.access_lines() if entry.get("port") == port] == [line]
    return status


# -- a client leaving before the response head ---------------------------------------------


async def leave_while_waiting_for_the_head(
    tmp_path: Path, nursery: trio.Nursery, request: bytes
) -> tuple[RecordingBackend, int]:
    """Send ``request``, close the connection 0.5 s later (the backend has all of it by
    then, and answers 4 s after it arrived); the backend and the request's logged status
    once the backend either answered or saw the proxy close its connection."""
    backend = RecordingBackend("scripted", delay=CANCEL_DELAY, reply=json_reply(REQUEST_ID))
    await nursery.start(backend.serve)
    with proxy_to(tmp_path, backend) as proxy:
        client = await open_client(proxy.port)
        await client.send(request)
        sent_at = trio.current_time()
        await backend.wait_for(lambda b: bool(b.connections) and bool(b.connections[0].bodies))
        await trio.sleep_until(sent_at + LEAVE_AFTER)
        await client.aclose()
        upstream = backend.connections[0]
        await eventually(lambda: upstream.eof or upstream.answered, within=CANCEL_DELAY + 5)
        return backend, await access_status(proxy, client)


async def test_2026_era_disconnect_before_the_head_cancels_upstream(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend, status = await leave_while_waiting_for_the_head(tmp_path, nursery, modern_tools_call())
    (upstream,) = backend.connections
    assert (upstream.eof, upstream.answered) == (True, False), (
        "the backend answered without seeing the proxy close the cancelled request"
    )
    assert status == 499


async def test_2025_era_disconnect_before_the_head_lets_the_backend_finish(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The control: no cancellation in this era, so the backend answers undisturbed."""
    backend, _ = await leave_while_waiting_for_the_head(tmp_path, nursery, handshake_tools_call())
    (upstream,) = backend.connections
    assert (upstream.eof, upstream.answered) == (False, True)


# -- how long the response head may take ----------------------------------------------------


async def call_slow_backend(
    tmp_path: Path,
    nursery: trio.Nursery,
    request: bytes,
    *,
    kind: str = "mcp",
    mcp_response_timeout: float | None = None,
    **route: Any,
) -> tuple[int, int]:
    """(status the client got, status logged) for ``request`` answered after 2.5 s, with
    upstream.response_timeout at 1 s."""
    backend = RecordingBackend("scripted", delay=SLOW_ANSWER, reply=json_reply(REQUEST_ID))
    await nursery.start(backend.serve)
    upstream = {"response_timeout": HEAD_TIMEOUT}
    if mcp_response_timeout is not None:
        upstream["mcp_response_timeout"] = mcp_response_timeout
    with proxy_to(tmp_path, backend, kind=kind, upstream=upstream, **route) as proxy:
        client = await open_client(proxy.port)
        try:
            await client.send(request)
            response = await client.read_response(within=SLOW_ANSWER + 10)
        finally:
            await client.aclose()
        return response.status, await access_status(proxy, client)


async def test_mcp_route_waits_longer_than_the_http_response_timeout(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """No timeout on the route: the MCP default (300 s) applies, not the 1 s that
    upstream.response_timeout sets for http routes."""
    assert await call_slow_backend(tmp_path, nursery, modern_tools_call()) == (200, 200)


async def test_mcp_route_with_its_own_response_timeout_gets_504(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    statuses = await call_slow_backend(
        tmp_path, nursery, modern_tools_call(), response_timeout=HEAD_TIMEOUT
    )
    assert statuses == (504, 504)


async def test_route_response_timeout_of_zero_means_the_kind_default(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    statuses = await call_slow_backend(tmp_path, nursery, modern_tools_call(), response_timeout=0)
    assert statuses == (200, 200)


async def test_mcp_routes_follow_upstream_mcp_response_timeout(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The MCP default is an option of its own: set to 1 s, the same call gets 504."""
    statuses = await call_slow_backend(
        tmp_path, nursery, modern_tools_call(), mcp_response_timeout=HEAD_TIMEOUT
    )
    assert statuses == (504, 504)


async def test_http_route_keeps_the_upstream_response_timeout(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The control: a plain route still gets 504 after upstream.response_timeout."""
    request = b"GET /plain HTTP/1.1\r\nHost: example.test\r\n\r\n"
    assert await call_slow_backend(tmp_path, nursery, request, kind="http") == (504, 504)
