"""Response shapes relayed end to end: a scripted backend whose answers cover what the
proxy relays (Content-Length, chunked, close-delimited, 1xx before the final answer,
204) and what it must turn into errors (not HTTP, truncated), with requests of both
head parsers (llhttp for ordinary heads, h11 for unusual ones) on one connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import h11
import pytest
import trio

from tests.support.backends import HttpClient, poll_until, proxy_running
from tests.support.proxy_process import ProxyProcess
from tests.support.raw_backend import open_client, wait_for_access

SCRIPT: dict[bytes, list[bytes]] = {
    b"/ok": [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Backend: yes\r\n\r\nhello"],
    b"/chunked": [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n",
        b"2\r\nlo\r\n0\r\n\r\n",
    ],
    b"/until-close": [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end", b""],
    b"/early": [
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    b"/empty": [b"HTTP/1.1 204 No Content\r\n\r\n"],
    b"/garbage": [b"this is not HTTP\r\n\r\n", b""],
    b"/truncated": [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", b""],
}


class ScriptedBackend:
    """Answers each request with the raw bytes its path names (``b""`` closes);
    ``/echo`` echoes the body with a Content-Length."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[h11.Request] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._read(stream, conn)
                if request is None:
                    return
                self.requests.append(request)
                if request.target == b"/echo":
                    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                    await stream.send_all(head + body)
                else:
                    for part in SCRIPT[request.target]:
                        if not part:
                            return
                        await stream.send_all(part)
                        await trio.sleep(0.01)
                conn = h11.Connection(h11.SERVER)  # the answers were written raw
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    @staticmethod
    async def _read(
        stream: trio.SocketStream, conn: h11.Connection
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            else:
                return None, b""


@pytest.fixture
async def proxy(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[ProxyProcess]:
    backend = ScriptedBackend()
    await nursery.start(backend.serve)
    sections = {"upstream": {"response_timeout": 5.0}}
    route = {"prefix": "/", "backends": [backend.url]}
    async with proxy_running(tmp_path, [route], workers=1, sections=sections) as running:
        yield running


async def test_response_shapes_on_one_connection(proxy: ProxyProcess) -> None:
    client = await HttpClient.connect(proxy.port)
    try:
        ok = await client.request("GET", "/ok")
        assert (ok.status, ok.body, ok.header("x-backend")) == (200, b"hello", ["yes"])
        assert ok.header("via") == ["1.1 switchboard"]
        chunked = await client.request("GET", "/chunked")
        assert (chunked.status, chunked.body) == (200, b"hello")
        early = await client.request("GET", "/early")
        assert (early.status, early.body) == (200, b"ok")
        empty = await client.request("GET", "/empty")
        assert (empty.status, empty.body) == (204, b"")
        echoed = await client.request("POST", "/echo", body=b'{"jsonrpc":"2.0"}')
        assert (echoed.status, echoed.body) == (200, b'{"jsonrpc":"2.0"}')
        # A chunked upload on the same connection: its body goes through the strict
        # chunked decoder and up re-chunked.
        uploaded = await client.request("POST", "/echo", body=[b"up", b"load"])
        assert (uploaded.status, uploaded.body) == (200, b"upload")
        again = await client.request("GET", "/ok")
        assert again.reused_connection and again.body == b"hello"
    finally:
        await client.aclose()

    def lines_of_interest() -> list[dict[str, object]]:
        return [line for line in proxy.access_lines() if line.get("path") in ("/ok", "/echo")]

    await poll_until(lambda: len(lines_of_interest()) >= 4, limit=5)
    lines = lines_of_interest()
    assert [(line["path"], line["status"], line["error"]) for line in lines] == [
        ("/ok", 200, None),
        ("/echo", 200, None),
        ("/echo", 200, None),
        ("/ok", 200, None),
    ]


async def test_close_delimited_body_then_close(proxy: ProxyProcess) -> None:
    client = await open_client(proxy.port)
    try:
        await client.send(b"GET /until-close HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await client.read_eof(within=10)
    finally:
        await client.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    # Re-framed for the client, or passed until close: either way the whole body arrives.
    assert b"to the end" in body


@pytest.mark.parametrize(
    ("path", "sent", "logged"), [(b"/garbage", 502, 502), (b"/truncated", 200, 502)]
)
async def test_broken_backend_answers(
    proxy: ProxyProcess, path: bytes, sent: int, logged: int
) -> None:
    """Garbage before any answer: 502. An answer cut short after its head went out: the
    client's connection is cut (the answer never looks complete) and the exchange is
    logged as the backend's failure."""
    client = await open_client(proxy.port)
    try:
        await client.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
        data = await client.read_eof(within=10)
    finally:
        await client.aclose()
    assert data.startswith(b"HTTP/1.1 %d " % sent), data
    if sent == 200:
        assert data.endswith(b"\r\n\r\nabc")  # never padded, only cut short
    line = await wait_for_access(proxy, lambda line: line.get("path") == path.decode())
    assert line["status"] == logged and line["error"]


async def test_pipelined_requests_answered_in_order(proxy: ProxyProcess) -> None:
    client = await open_client(proxy.port)
    try:
        await client.send(
            b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        first = await client.read_response()
        second = await client.read_response()
        third = await client.read_response()
        rest = await client.read_eof(within=10)
    finally:
        await client.aclose()
    assert [(r.status, r.body) for r in (first, second, third)] == [
        (200, b"hello"),
        (200, b"abc"),
        (200, b"hello"),
    ]
    assert third.header(b"connection") == b"close"
    assert rest == b""


async def test_refusals(proxy: ProxyProcess) -> None:
    """Heads refused by either parser, with the reference path's statuses."""
    for raw, status in [
        (b"GET /ok HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /ok HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"GET /ok HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", 400),  # obs-fold
        (b"GET /ok HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ]:
        client = await open_client(proxy.port)
        try:
            await client.send(raw)
            response = await client.read_response()
        finally:
            await client.aclose()
        assert response.status == status, raw[:60]
