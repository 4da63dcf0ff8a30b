"""Each limit and timeout is exercised and returns its status.

Every test starts the real ``switchboard`` process (one worker) with the limit under test
set small, drives it over a raw loopback socket, asserts the status (or the silent
close), whether the recording backend saw anything, and the request's access-log line
(matched by the client's port) with its status and ``error``. Timeouts are one second,
so the file runs in well under a minute.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from tests.support.proxy_process import ProxyProcess, free_port, run_proxy
from tests.support.raw_backend import (
    BACKEND_BODY,
    Behaviour,
    RawClient,
    RecordingBackend,
    open_client,
    wait_for_access,
)

SETTLE = 0.3
"""Time allowed for a (wrongly) forwarded request to show up at the backend."""
MAX_HEADER = 1024
MAX_BODY = 1000
TIMEOUT = 1.0
"""The timeout under test. Each test starts its clock before the proxy's timer can
start, so the timer firing is at least TIMEOUT later: never early."""
GUARD = 30.0
"""How long a test waits for the answer: far beyond TIMEOUT, far below every other timer
(all at least LONG), so an answer within it came from the timer under test."""
LONG = 10 * GUARD


def get(path: str = "/mcp", extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: example.test\r\n" + extra + b"\r\n"


def post_head(length: int) -> bytes:
    return b"POST /mcp HTTP/1.1\r\nHost: example.test\r\nContent-Length: %d\r\n\r\n" % length


CHUNKED_HEAD = b"POST /mcp HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@contextmanager
def proxy_to(
    tmp_path: Path,
    backend_url: str,
    *,
    prefix: str = "/",
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> Iterator[ProxyProcess]:
    merged: dict[str, dict[str, Any]] = {"server": {"drain_timeout": 1.0}}
    for name, values in (sections or {}).items():
        merged.setdefault(name, {}).update(values)
    with run_proxy(
        tmp_path, [{"prefix": prefix, "backends": [backend_url]}], workers=1, sections=merged
    ) as proxy:
        yield proxy


async def start_backend(nursery: trio.Nursery, behaviour: Behaviour = "ok") -> RecordingBackend:
    backend = RecordingBackend(behaviour)
    await nursery.start(backend.serve)
    return backend


async def access_line(proxy: ProxyProcess, client: RawClient) -> dict[str, Any]:
    return await wait_for_access(proxy, client.logged)


async def assert_logged(proxy: ProxyProcess, client: RawClient, status: int) -> None:
    line = await access_line(proxy, client)
    assert line["status"] == status, line
    assert isinstance(line["error"], str), line
    assert line["error"], line


async def assert_backend_saw_nothing(backend: RecordingBackend) -> None:
    await trio.sleep(SETTLE)
    assert backend.connections == []
    assert backend.bytes_received == 0


async def assert_timed_out_with_408(
    proxy: ProxyProcess, backend: RecordingBackend, sent: bytes
) -> None:
    """Send ``sent`` and go silent: a 408 no sooner than TIMEOUT later, the connection
    closed, the refusal logged, and nothing reached the backend."""
    started = trio.current_time()  # before the connection exists: a first head's time
    client = await open_client(proxy.port)  # runs from the accept
    await client.send(sent)
    response = await client.read_response(within=GUARD)
    elapsed = trio.current_time() - started
    assert response.status == 408
    assert elapsed >= TIMEOUT, elapsed
    await assert_closed(client)
    await assert_logged(proxy, client, 408)
    await assert_backend_saw_nothing(backend)


async def assert_closed(client: RawClient) -> None:
    """The proxy closed the connection after its response: nothing more, then EOF.
    Half-closing ours ends the proxy's linger, so the access line is written."""
    assert await client.read_eof(within=GUARD) == b""
    await client.send_eof()


# -- header size -----------------------------------------------------------------------

HEADER_LIMITS = {"limits": {"max_header_bytes": MAX_HEADER}}


async def test_header_section_within_limit_is_forwarded(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend = await start_backend(nursery)
    with proxy_to(tmp_path, backend.url, sections=HEADER_LIMITS) as proxy:
        client = await open_client(proxy.port)
        head = get(extra=b"X-Pad: " + b"a" * (MAX_HEADER - 200) + b"\r\n")
        assert len(head) < MAX_HEADER
        await client.send(head)
        response = await client.read_response()
        assert response.status == 200
        assert response.body == BACKEND_BODY
        assert len(backend.requests) == 1
        await client.aclose()


async def test_incomplete_header_section_over_limit_gets_431(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """More than max_header_bytes of head and still no blank line: 431 at once (not
    after header_timeout, which is left at its default of 10 s)."""
    backend = await start_backend(nursery)
    with proxy_to(tmp_path, backend.url, sections=HEADER_LIMITS) as proxy:
        client = await open_client(proxy.port)
        with trio.fail_after(3):
            await client.send(get()[:-2] + b"X-Pad: " + b"a" * (2 * MAX_HEADER) + b"\r\n")
            response = await client.read_response()
        assert response.status == 431
        await assert_closed(client)
        await assert_logged(proxy, client, 431)
        await assert_backend_saw_nothing(backend)


async def test_complete_header_section_over_limit_gets_431(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The same oversized head, complete and arriving in one segment, must get 431 too:
    max_header_bytes bounds the head, not only the part of it still incomplete."""
    backend = await start_backend(nursery)
    with proxy_to(tmp_path, backend.url, sections=HEADER_LIMITS) as proxy:
        client = await open_client(proxy.port)
        head = get(extra=b"X-Pad: " + b"a" * (3 * MAX_HEADER) + b"\r\n")
        await client.send(head)
        response = await client.read_response()
        assert response.status == 431, (response.status, len(head))
        await assert_closed(client)
        await assert_logged(proxy, client, 431)
        await assert_backend_saw_nothing(backend)


# -- body size ---------------------------------------------------------------------------

BODY_LIMITS = {"limits": {"max_body_bytes": MAX_BODY, "body_timeout": LONG}}


async def test_body_at_limit_is_forwarded(tmp_path: Path, nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    with proxy_to(tmp_path, backend.url, sections=BODY_LIMITS) as proxy:
        client = await open_client(proxy.port)
        await client.send(post_head(MAX_BODY) + b"b" * MAX_BODY)
        response = await client.read_response()
        assert response.status == 200
        await backend.wait_for(lambda b: len(b.connections) == 1 and b.connections[0].bodies)
        assert backend.connections[0].bodies == [b"b" * MAX_BODY]
        await client.aclose()


async def test_content_length_over_limit_gets_413(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Refused from the head alone: the proxy does not wait for the body."""
    backend = await start_backend(nursery)
    with proxy_to(tmp_path, backend.url, sections=BODY_LIMITS) as proxy:
        client = await open_client(proxy.port)
        await client.send(post_head(MAX_BODY + 1) + b"b" * 10)
        response = await client.read_response(within=GUARD)  # body_timeout is LONG
        assert response.status == 413
        await assert_closed(client)
        await assert_logged(proxy, client, 413)
        await assert_backend_saw_nothing(backend)


async def test_chunked_first_chunk_over_limit_gets_413(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The body bytes that arrived with the head are read ahead before a backend is
    chosen, so an oversized first chunk is refused without any backend seeing it."""
    backend = await start_backend(nursery)
    with proxy_to(tmp_path, backend.url, sections=BODY_LIMITS) as proxy:
        client = await open_client(proxy.port)
        await client.send(CHUNKED_HEAD + chunk(b"c" * (MAX_BODY + 1)) + b"0\r\n\r\n")
        response = await client.read_response()
        assert response.status == 413
        await assert_closed(client)
        await assert_logged(proxy, client, 413)
        await assert_backend_saw_nothing(backend)


async def test_chunked_body_growing_over_limit_gets_413(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A small first chunk is forwarded (the body streams); when later chunks take the
    total past max_body_bytes the upload is aborted, the backend connection is closed
    with the request incomplete, and the client (not answered yet) gets 413."""
    backend = await start_backend(nursery)
    with proxy_to(tmp_path, backend.url, sections=BODY_LIMITS) as proxy:
        client = await open_client(proxy.port)
        first = b"c" * (MAX_BODY // 2 + 100)
        await client.send(CHUNKED_HEAD + chunk(first))
        await backend.wait_for(
            lambda b: len(b.requests) == 1 and first in b.connections[0].received
        )
        await client.send(chunk(b"d" * (MAX_BODY // 2 + 100)) + b"0\r\n\r\n")
        response = await client.read_response()
        assert response.status == 413
        await assert_closed(client)
        await assert_logged(proxy, client, 413)
        (upstream,) = backend.connections
        await backend.wait_for(lambda b: upstream.eof)
        assert upstream.bodies == []  # the backend never got a complete request
        # Never more than max_body_bytes of body went up.
        forwarded = bytes(upstream.received).partition(b"\r\n\r\n")[2]
        assert forwarded.startswith(chunk(first))
        assert forwarded.count(b"c") + forwarded.count(b"d") <= MAX_BODY


# -- client timeouts -------------------------------------------------------------------


async def test_slowloris_head_gets_408_after_header_timeout(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend = await start_backend(nursery)
    sections = {"limits": {"header_timeout": TIMEOUT}}
    with proxy_to(tmp_path, backend.url, sections=sections) as proxy:
        await assert_timed_out_with_408(
            proxy, backend, b"GET /mcp HTTP/1.1\r\nHost: example.test\r\nX-Slow: "
        )


async def test_silent_connection_closed_after_header_timeout_without_response(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend = await start_backend(nursery)
    sections = {"limits": {"header_timeout": TIMEOUT}}
    with proxy_to(tmp_path, backend.url, sections=sections) as proxy:
        started = trio.current_time()  # before the connection exists
        client = await open_client(proxy.port)
        assert await client.read_eof(within=GUARD) == b""
        elapsed = trio.current_time() - started
        assert elapsed >= TIMEOUT, elapsed
        await trio.sleep(SETTLE)
        assert [line for line in proxy.access_lines() if client.logged(line)] == []
        await assert_backend_saw_nothing(backend)
        await client.aclose()


async def test_idle_keepalive_connection_closed_after_keepalive_timeout(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """After a complete exchange the connection idles; the proxy closes it after
    keepalive_timeout (1 s), not header_timeout (LONG)."""
    backend = await start_backend(nursery)
    sections = {"limits": {"keepalive_timeout": TIMEOUT, "header_timeout": LONG}}
    with proxy_to(tmp_path, backend.url, sections=sections) as proxy:
        client = await open_client(proxy.port)
        started = trio.current_time()  # before the exchange after which the idling starts
        await client.send(get())
        response = await client.read_response()
        assert response.status == 200
        assert response.header(b"connection") != b"close"
        assert await client.read_eof(within=GUARD) == b""
        elapsed = trio.current_time() - started
        assert elapsed >= TIMEOUT, elapsed
        line = await access_line(proxy, client)
        assert (line["status"], line["error"]) == (200, None)
        await client.aclose()


async def test_body_timeout_before_any_body_byte_gets_408(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Head complete, no body byte at all: the proxy waits body_timeout for the first
    body bytes before choosing a backend, then answers 408; no backend saw it."""
    backend = await start_backend(nursery)
    sections = {"limits": {"body_timeout": TIMEOUT}}
    with proxy_to(tmp_path, backend.url, sections=sections) as proxy:
        await assert_timed_out_with_408(proxy, backend, post_head(100))


async def test_small_body_timeout_mid_body_gets_408_before_any_backend(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Content-Length 100, 10 bytes sent with the head, then silence: a body this small
    is collected whole before a backend is chosen, so after one body_timeout the client
    gets 408 and no backend saw anything."""
    backend = await start_backend(nursery)
    sections = {"limits": {"body_timeout": TIMEOUT}}
    with proxy_to(tmp_path, backend.url, sections=sections) as proxy:
        client = await open_client(proxy.port)
        started = trio.current_time()
        await client.send(post_head(100) + b"0123456789")
        response = await client.read_response(within=GUARD)
        elapsed = trio.current_time() - started
        assert response.status == 408
        assert elapsed >= TIMEOUT, elapsed
        await assert_closed(client)
        await assert_logged(proxy, client, 408)
        await assert_backend_saw_nothing(backend)


async def test_large_body_timeout_mid_body_gets_408_after_forwarding(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A body too large to collect first (over 64 KiB): its first bytes are checked and
    forwarded with the head, the rest streams; silence then times the upload out after
    body_timeout. The backend connection is closed with the request incomplete and the
    client, not answered yet, gets 408."""
    backend = await start_backend(nursery)
    sections = {"limits": {"body_timeout": TIMEOUT, "max_body_bytes": 1 << 20}}
    with proxy_to(tmp_path, backend.url, sections=sections) as proxy:
        client = await open_client(proxy.port)
        started = trio.current_time()  # the body's silence counts from its last byte,
        await client.send(post_head(200_000) + b"0123456789")  # which this sends
        await backend.wait_for(lambda b: b.bytes_received > 0 and b.requests)
        response = await client.read_response(within=GUARD)
        elapsed = trio.current_time() - started
        assert response.status == 408
        assert elapsed >= TIMEOUT, elapsed
        await assert_closed(client)
        await assert_logged(proxy, client, 408)
        (upstream,) = backend.connections
        await backend.wait_for(lambda b: upstream.eof)
        assert bytes(upstream.received).endswith(b"\r\n\r\n0123456789")
        assert upstream.requests[0].method == b"POST"
        assert upstream.bodies == []


# -- upstream failures -----------------------------------------------------------------


async def test_upstream_connect_refused_gets_502(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with proxy_to(tmp_path, dead) as proxy:
        client = await open_client(proxy.port)
        await client.send(get())
        response = await client.read_response()
        assert response.status == 502
        await assert_closed(client)
        await assert_logged(proxy, client, 502)


async def test_upstream_response_timeout_gets_504(tmp_path: Path, nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, "hang")
    sections = {"upstream": {"response_timeout": TIMEOUT}}
    with proxy_to(tmp_path, backend.url, sections=sections) as proxy:
        client = await open_client(proxy.port)
        started = trio.current_time()
        await client.send(get())
        response = await client.read_response(within=GUARD)
        elapsed = trio.current_time() - started
        assert response.status == 504
        assert elapsed >= TIMEOUT, elapsed
        await assert_closed(client)
        await assert_logged(proxy, client, 504)
        assert len(backend.connections) == 1
        assert bytes(backend.connections[0].received).startswith(b"GET /mcp HTTP/1.1\r\n")


async def test_upstream_slow_but_within_response_timeout_gets_200(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # Slow (the head comes TIMEOUT late) but well within response_timeout.
    backend = RecordingBackend("slow_headers", delay=TIMEOUT)
    await nursery.start(backend.serve)
    sections = {"upstream": {"response_timeout": GUARD}}
    with proxy_to(tmp_path, backend.url, sections=sections) as proxy:
        client = await open_client(proxy.port)
        await client.send(get())
        response = await client.read_response(within=GUARD)
        assert response.status == 200
        assert response.body == BACKEND_BODY
        await client.aclose()


# -- routing and capacity ----------------------------------------------------------------


async def test_path_without_route_gets_404(tmp_path: Path, nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    with proxy_to(tmp_path, backend.url, prefix="/mcp") as proxy:
        client = await open_client(proxy.port)
        await client.send(get("/elsewhere"))
        response = await client.read_response()
        assert response.status == 404
        await assert_closed(client)
        await assert_logged(proxy, client, 404)
        await assert_backend_saw_nothing(backend)


CAPACITY = {"server": {"max_connections_per_worker": 3, "retry_after_seconds": 7}}


async def _fill_worker(proxy: ProxyProcess) -> list[RawClient]:
    """Three keep-alive connections, each after one complete exchange."""
    held = []
    for _ in range(3):
        client = await open_client(proxy.port)
        await client.send(get())
        assert (await client.read_response()).status == 200
        held.append(client)
    return held


async def test_connection_over_max_connections_per_worker_gets_503(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend = await start_backend(nursery)
    with proxy_to(tmp_path, backend.url, sections=CAPACITY) as proxy:
        held = await _fill_worker(proxy)
        extra = await open_client(proxy.port)
        await extra.send(get())
        response = await extra.read_response()
        assert response.status == 503
        assert response.header(b"retry-after") == b"7"
        await assert_closed(extra)
        await trio.sleep(SETTLE)
        assert len(backend.requests) == 3
        # The held connections still work, and closing one makes room again.
        await held[0].send(get())
        assert (await held[0].read_response()).status == 200
        await held[1].aclose()
        # Once the worker has seen that close (no clock says when), there is room.
        with trio.fail_after(GUARD):
            while True:
                again = await open_client(proxy.port)
                await again.send(get())
                if (await again.read_response()).status == 200:
                    break
                await again.aclose()
                await trio.sleep(0.05)
        for client in (held[0], held[2], again):
            await client.aclose()


async def test_max_connections_refusal_is_in_access_log(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Every status the proxy answers appears in the access log with an error."""
    backend = await start_backend(nursery)
    with proxy_to(tmp_path, backend.url, sections=CAPACITY) as proxy:
        held = await _fill_worker(proxy)
        extra = await open_client(proxy.port)
        await extra.send(get())
        assert (await extra.read_response()).status == 503
        await assert_closed(extra)
        try:
            await assert_logged(proxy, extra, 503)
        finally:
            for client in held:
                await client.aclose()
