"""Opening upstream sessions on real 2025-11-25 backends (``proxy.net.session_opener``):
the official SDK server answering ``initialize`` with an event stream and with JSON, one
opening shared by the requests that need it meanwhile, and what a backend that will not
open one gets its requests."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import trio

from proxy.config import UpstreamConfig
from proxy.net.session_opener import SessionOpener
from proxy.net.upstream import UpstreamPool
from proxy.protocol.era_probe import ProbeRequest, RouteEras
from proxy.protocol.upstream_sessions import (
    ClientEnvelope,
    SessionRefused,
    SessionRequest,
    UpstreamSession,
    UpstreamSessions,
)
from proxy.routing import Backend
from tests.support.asgi import serve_asgi
from tests.support.mcp_servers import McpBackend

CLIENT = ClientEnvelope({"experimental": {}}, {"name": "agent", "version": "1"})


def _request(backend: Backend, caller: str = "") -> SessionRequest:
    return SessionRequest(
        backend, CLIENT.key(backend.replica, caller), b"/mcp", CLIENT.initialize_body()
    )


def _pool(url: str) -> UpstreamPool:
    return UpstreamPool(Backend.from_url(url), UpstreamConfig())


async def test_sessions_are_opened_on_the_sdk_server_and_shared(nursery: trio.Nursery) -> None:
    for json_response in (False, True):
        backend = McpBackend("r1", json_response=json_response, handshake_only=True)
        await nursery.start(backend.serve)
        pool = _pool(backend.url)
        opener = SessionOpener(UpstreamSessions(), timeout=10)
        results: list[Any] = []

        async def open_one(request: SessionRequest) -> None:
            results.append(await opener.session(pool, request))  # noqa: B023

        async with trio.open_nursery() as openings:
            for _ in range(5):
                openings.start_soon(open_one, _request(pool.backend))
        assert all(isinstance(r, UpstreamSession) for r in results)
        assert len({r.id for r in results}) == 1  # one opening for all five
        assert opener.opened == 1 and backend.sessions_created == [results[0].id]
        assert results[0].result["serverInfo"]["name"] == "test-r1"
        methods = [r.message().get("method") for r in backend.mcp_posts()]
        assert methods == ["initialize", "notifications/initialized"]
        assert backend.mcp_posts()[0].message()["params"]["clientInfo"]["name"] == "agent"
        # Another caller gets a session of its own.
        other = await opener.session(pool, _request(pool.backend, "bob"))
        assert isinstance(other, UpstreamSession) and other.id != results[0].id


def _answer_with(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


async def test_a_backend_that_opens_no_session_is_refused_with_the_reason(
    nursery: trio.Nursery,
) -> None:
    json_type = [(b"content-type", b"application/json")]
    result = b'{"jsonrpc":"2.0","id":"switchboard-initialize","result":{}}'
    cases = [
        (500, json_type, b"{}", "status 500"),
        (200, json_type, result, "no session id"),
        (200, [*json_type, (b"mcp-session-id", b"s1")], b"{}", "no initialize result"),
    ]
    for status, headers, body, says in cases:
        port = await nursery.start(partial(serve_asgi, _answer_with(status, headers, body), 0))
        opener = SessionOpener(UpstreamSessions(), timeout=10)
        pool = _pool(f"http://127.0.0.1:{port}")
        refused = await opener.session(pool, _request(pool.backend))
        assert isinstance(refused, SessionRefused) and refused.status == 502
        assert says in refused.message
        assert opener.sessions.get(_request(pool.backend).key) is None


async def test_a_backend_that_cannot_be_reached_is_refused(nursery: trio.Nursery) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    opener = SessionOpener(UpstreamSessions(), timeout=10)
    pool = _pool(f"http://127.0.0.1:{port}")
    refused = await opener.session(pool, _request(pool.backend))
    assert isinstance(refused, SessionRefused) and "failed" in refused.message


async def test_a_notification_is_delivered_and_a_dead_backend_is_let_be(
    nursery: trio.Nursery,
) -> None:
    backend = McpBackend("r1", handshake_only=True)
    await nursery.start(backend.serve)
    pool = _pool(backend.url)
    opener = SessionOpener(UpstreamSessions(), timeout=10)
    session = await opener.session(pool, _request(pool.backend))
    assert isinstance(session, UpstreamSession)
    note = b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}'
    headers = ((b"mcp-session-id", session.id.encode()), (b"mcp-protocol-version", b"2025-11-25"))
    await opener.notify(pool, b"/mcp", headers, note)
    assert opener.notified == 1
    assert backend.mcp_posts()[-1].message()["method"] == "notifications/cancelled"
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    dead = _pool(f"http://127.0.0.1:{listener.getsockname()[1]}")
    listener.close()
    await opener.notify(dead, b"/mcp", headers, note)  # no exception, nothing delivered
    assert opener.notified == 1


async def test_a_listens_session_is_its_own_and_subscribes(nursery: trio.Nursery) -> None:
    backend = McpBackend("r1", handshake_only=True, subscriptions=True)
    await nursery.start(backend.serve)
    pool = _pool(backend.url)
    opener = SessionOpener(UpstreamSessions(), timeout=10)
    shared = await opener.session(pool, _request(pool.backend))
    subscribe = b'{"jsonrpc":"2.0","id":"s0","method":"resources/subscribe","params":{"uri":"test://replica"}}'
    plain = _request(pool.backend)
    listen = SessionRequest(
        pool.backend, plain.key, plain.target, plain.body, dedicated=True, subscribe=(subscribe,)
    )
    own = await opener.session(pool, listen)
    assert isinstance(shared, UpstreamSession) and isinstance(own, UpstreamSession)
    assert own.id != shared.id
    assert opener.sessions.get(plain.key) is shared  # the shared one stays the key's
    assert backend.subscribed == ["test://replica"]
    [seen] = [r for r in backend.mcp_posts() if r.message().get("method") == "resources/subscribe"]
    assert seen.headers["mcp-session-id"] == own.id


async def test_a_probe_finds_the_era_a_backend_speaks(nursery: trio.Nursery) -> None:
    cases = [
        (McpBackend("m", modern_only=True), "2026-07-28"),
        (McpBackend("h", handshake_only=True), "2025-11-25"),
        (McpBackend("b"), "any"),
    ]
    for backend, era in cases:
        await nursery.start(backend.serve)
        pool = _pool(backend.url)
        opener = SessionOpener(UpstreamSessions(), timeout=10)
        eras = RouteEras()
        probes: list[str] = []

        async def probe(
            pool: UpstreamPool, opener: SessionOpener, eras: RouteEras, probes: list[str]
        ) -> None:
            request = ProbeRequest("/mcp", pool.backend, b"/mcp")
            probes.append(await opener.probe(pool, request, eras))

        async with trio.open_nursery() as probing:
            for _ in range(3):
                probing.start_soon(probe, pool, opener, eras, probes)
        assert probes == [era] * 3, backend.replica
        assert eras.era("/mcp", time.monotonic()) == era
        # One probe for the three: a discover and an initialize (whose session ends).
        # (A guard that refuses a request does not read its body: count the POSTs.)
        assert len(backend.mcp_posts()) == 2, backend.replica
        assert backend.mcp_posts()[0].headers.get("mcp-method") == "server/discover"
        deletes = [r for r in backend.requests if r.method == "DELETE"]
        assert len(deletes) == len(backend.sessions_created), backend.replica
