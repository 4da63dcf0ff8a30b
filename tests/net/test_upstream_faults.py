"""Backends that fail mid-answer or refuse connections.

A response cut by the backend after its head must not reach the client as a complete
message, and is logged and counted as the failure it is (502), not as the 200 its head
said. A replica that refuses connections got no byte of the request, so the proxy must
take the request to another replica at once rather than answer 502 each time the
refusing one comes back from ejection; and it never tries more than one extra replica.

Each test starts the real ``switchboard`` (one worker) in front of scripted raw backends
and reads /metrics from its admin port.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h11
import trio

from tests.ops.test_admin_metrics import fetch_metrics, parse_metrics, total
from tests.support.proxy_process import ProxyProcess, free_port, run_proxy
from tests.support.raw_backend import (
    RecordingBackend,
    eventually,
    open_client,
    wait_for_access,
)

GET = b"GET /resource HTTP/1.1\r\nHost: example.test\r\n\r\n"
DECLARED = 1000
SENT = 100
CUT_CONTENT_LENGTH = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Length: %d\r\n\r\n" % DECLARED + b"x" * SENT
)
CUT_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % SENT + b"x" * SENT + b"\r\n"
)
CUT_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: appl"
EJECT_SECONDS = 0.5
REQUESTS = 200
PACE = 0.01
"""Seconds between the sequential requests: 200 of them span at least four ejections."""
ATTEMPTS = 10


@contextmanager
def proxy_to(tmp_path: Path, backends: Sequence[str], **route: Any) -> Iterator[ProxyProcess]:
    with run_proxy(
        tmp_path,
        [{"prefix": "/", "backends": list(backends), **route}],
        workers=1,
        sections={"server": {"drain_timeout": 1.0}},
    ) as proxy:
        yield proxy


async def scripted_backend(nursery: trio.Nursery, reply: bytes) -> RecordingBackend:
    backend = RecordingBackend("scripted", reply=reply)
    await nursery.start(backend.serve)
    return backend


async def metric_samples(proxy: ProxyProcess) -> dict[str, list[tuple[dict[str, str], float]]]:
    return parse_metrics(await fetch_metrics(proxy))


async def requests_counted(proxy: ProxyProcess, count: int) -> dict[str, float]:
    """switchboard_requests_total by status, once it adds up to ``count``."""
    by_status: dict[str, float] = {}

    async def counted() -> bool:
        samples = await metric_samples(proxy)
        by_status.clear()
        for labels, value in samples.get("switchboard_requests_total", []):
            by_status[labels["status"]] = by_status.get(labels["status"], 0.0) + value
        return sum(by_status.values()) >= count

    with trio.fail_after(5):
        while True:
            if await counted():
                return by_status
            await trio.sleep(0.05)


def decode(raw: bytes) -> tuple[int | None, bytes, bool]:
    """A response as a client reads it up to the connection's end: (status, body bytes,
    whether the message was complete)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/resource", headers=[(b"host", b"example.test")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    status = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return status, bytes(body), False  # the connection ended mid-message
        if type(event) is h11.Response:
            status = event.status_code
        elif type(event) is h11.Data:
            body += event.data
        elif type(event) is h11.EndOfMessage:
            return status, bytes(body), True
        else:
            return status, bytes(body), False


async def assert_cut_response_is_a_failure(
    tmp_path: Path, nursery: trio.Nursery, reply: bytes
) -> bytes:
    """The client sees the cut (no complete message, then the connection's end); the
    access line and switchboard_requests_total say 502. The body the client got."""
    backend = await scripted_backend(nursery, reply)
    with proxy_to(tmp_path, [backend.url]) as proxy:
        client = await open_client(proxy.port)
        await client.send(GET)
        raw = await client.read_eof(within=10)
        await client.aclose()
        status, body, complete = decode(raw)
        assert status == 200, raw[:300]  # the head had gone out before the cut
        assert not complete, raw[-200:]
        line = await wait_for_access(proxy, client.logged)
        assert (line["status"], bool(line["error"])) == (502, True), f"{line}"
        assert await requests_counted(proxy, 1) == {"502": 1.0}
        assert [entry for entry in proxy.access_lines() if client.logged(entry)] == [line]
    return body


async def test_body_cut_short_of_its_content_length_is_not_a_complete_200(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    body = await assert_cut_response_is_a_failure(tmp_path, nursery, CUT_CONTENT_LENGTH)
    assert len(body) < DECLARED


async def test_chunked_body_cut_before_its_last_chunk_is_not_a_complete_200(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    body = await assert_cut_response_is_a_failure(tmp_path, nursery, CUT_CHUNKED)
    assert len(body) <= SENT


async def test_head_cut_before_its_end_gets_502(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Nothing reached the client yet: it gets a 502 of the proxy's own."""
    backend = await scripted_backend(nursery, CUT_HEAD)
    with proxy_to(tmp_path, [backend.url]) as proxy:
        client = await open_client(proxy.port)
        await client.send(GET)
        response = await client.read_response()
        await client.aclose()
        assert response.status == 502
        line = await wait_for_access(proxy, client.logged)
        assert (line["status"], bool(line["error"])) == (502, True), f"{line}"
        assert await requests_counted(proxy, 1) == {"502": 1.0}
        assert [entry for entry in proxy.access_lines() if client.logged(entry)] == [line]


# -- a replica that refuses connections ------------------------------------------------------


async def get_status(proxy: ProxyProcess, target: bytes) -> int:
    """One GET on a new connection; its status."""
    client = await open_client(proxy.port)
    try:
        await client.send(b"GET " + target + b" HTTP/1.1\r\nHost: example.test\r\n\r\n")
        return (await client.read_response()).status
    finally:
        await client.aclose()


async def upstream_failures(proxy: ProxyProcess, backend_url: str | None = None) -> float:
    samples = await metric_samples(proxy)
    if backend_url is None:
        return total(samples, "switchboard_upstream_failures_total")
    return total(samples, "switchboard_upstream_failures_total", backend=backend_url)


async def test_refused_connection_goes_to_another_replica_at_once(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The refusing replica is ejected after a few refusals and comes back every 0.5 s;
    each time, the requests it refuses must be served by the healthy replica."""
    healthy = RecordingBackend("ok")
    await nursery.start(healthy.serve)
    refusing = f"http://127.0.0.1:{free_port()}"
    with proxy_to(tmp_path, [healthy.url, refusing], eject_seconds=EJECT_SECONDS) as proxy:
        statuses: list[int] = []
        for number in range(REQUESTS):
            statuses.append(await get_status(proxy, b"/r-%d" % number))
            await trio.sleep(PACE)
        assert await upstream_failures(proxy, refusing) > 0  # it really was tried
        failed = [(number, status) for number, status in enumerate(statuses) if status != 200]
        assert failed == [], f"{len(failed)} of {REQUESTS} requests not answered 200"
        await eventually(lambda: len(healthy.requests) == REQUESTS)


async def test_both_replicas_refusing_costs_at_most_one_extra_try(tmp_path: Path) -> None:
    """No ejection (eject_after = 0), so every request meets two refusing replicas: 502,
    after at most two connection attempts."""
    replicas = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    with proxy_to(tmp_path, replicas, eject_after=0) as proxy:
        before = await upstream_failures(proxy)
        for number in range(ATTEMPTS):
            assert await get_status(proxy, b"/both-%d" % number) == 502
            # A worker publishes its counts a few times a second, a request's all at once.
            after = before
            with trio.move_on_after(10):
                while after == before:
                    await trio.sleep(0.05)
                    after = await upstream_failures(proxy)
            assert 1 <= after - before <= 2, (number, after - before)
            before = after

        def logged() -> list[tuple[int, bool]]:
            lines = [e for e in proxy.access_lines() if str(e.get("path")).startswith("/both-")]
            return [(line["status"], bool(line["error"])) for line in lines]

        await eventually(lambda: len(logged()) >= ATTEMPTS)
        assert logged() == [(502, True)] * ATTEMPTS
