"""HTTP/1.1 bodies through the real proxy (``--workers 2``) to a real backend and back.

GET, POST with Content-Length, chunked POST and 50 MB bodies in both directions must
arrive byte-identical (sha256 compared at the client, at the backend and on the way
back), streamed: the worker's peak RSS grows far less than the body size. Also the
forwarding rules the backend observes: X-Forwarded-*, Via, hop-by-hop removal, Host.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.backends import (
    HttpBackend,
    HttpClient,
    backend_route,
    pattern_chunks,
    pattern_sha256,
    poll_until,
    proxy_running,
    wait_for_line,
)
from tests.support.proxy_process import ProxyProcess

LARGE = 50 * 1024 * 1024
# "Far below the body size": a worker may use a few receive buffers per connection, never
# a sizeable fraction of the body.
MAX_RSS_GROWTH = 15 * 1024 * 1024
BIG_LIMITS = {"limits": {"max_body_bytes": 200_000_000}}


@pytest.fixture
async def backend(nursery: trio.Nursery) -> HttpBackend:
    server = HttpBackend()
    await nursery.start(server.serve)
    return server


# -- worker memory ------------------------------------------------------------------------


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, in bytes."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                number, unit = rest.split()
                assert unit == "kB"
                values[key] = int(number) * 1024
    return values


def _reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


class _PeakRss:
    """Each worker's RSS before a transfer and its peak (VmHWM) afterwards."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.pids = proxy.worker_pids()
        assert len(self.pids) == 2
        self.before: dict[int, int] = {}
        self.reset: dict[int, bool] = {}
        for pid in self.pids:
            self.reset[pid] = _reset_peak(pid)
            self.before[pid] = _proc_status(pid)["VmRSS"]

    def growth(self) -> dict[int, int]:
        """Peak minus pre-transfer RSS per worker. Without a successful reset the peak may
        include start-up, so this only overestimates."""
        return {pid: _proc_status(pid)["VmHWM"] - self.before[pid] for pid in self.pids}

    def report(self, label: str) -> str:
        growth = self.growth()
        parts = [
            f"pid {pid}: rss before {self.before[pid] / 2**20:.1f} MiB, "
            f"peak growth {growth[pid] / 2**20:.2f} MiB (peak reset: {self.reset[pid]})"
            for pid in self.pids
        ]
        return f"{label}: " + "; ".join(parts)


def _assert_streamed(peak: _PeakRss, label: str) -> None:
    report = peak.report(label)
    print(report)
    for pid, grew in peak.growth().items():
        assert grew < MAX_RSS_GROWTH, f"worker {pid} grew {grew} bytes: {report}"


# -- small bodies ---------------------------------------------------------------------------


async def test_get_small(tmp_path: Path, backend: HttpBackend) -> None:
    async with proxy_running(tmp_path, [backend_route(backend.port)]) as proxy:
        with trio.fail_after(10):
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.get("/hello/world?x=1")
                assert response.status_code == 200
                assert json.loads(response.content)["path"] == "/hello/world"
                for chunked in ("0", "1"):
                    blob = await client.get(f"/blob?size=100000&seed=3&chunked={chunked}")
                    assert blob.status_code == 200
                    assert hashlib.sha256(blob.content).hexdigest() == pattern_sha256(
                        100_000, seed=3
                    )
                    if chunked == "1":
                        assert "content-length" not in blob.headers
                        assert blob.headers["transfer-encoding"] == "chunked"
                    else:
                        assert blob.headers["content-length"] == "100000"
    seen = [(r.method, r.target) for r in backend.requests]
    assert seen == [
        ("GET", "/hello/world?x=1"),
        ("GET", "/blob?size=100000&seed=3&chunked=0"),
        ("GET", "/blob?size=100000&seed=3&chunked=1"),
    ]
    assert all(r.body_length == 0 for r in backend.requests)


async def test_post_with_content_length(tmp_path: Path, backend: HttpBackend) -> None:
    body = b"".join(pattern_chunks(300_000, seed=1))
    async with proxy_running(tmp_path, [backend_route(backend.port)]) as proxy:
        with trio.fail_after(10):
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.post("/echo", content=body)
    assert response.status_code == 200
    assert response.headers["x-backend"] == "echo"
    assert response.headers["content-length"] == str(len(body))
    assert response.content == body
    [seen] = backend.requests
    assert (seen.method, seen.target) == ("POST", "/echo")
    assert seen.header("content-length") == [str(len(body))]
    assert seen.header("transfer-encoding") == []
    assert (seen.body_length, seen.body_sha256) == (len(body), hashlib.sha256(body).hexdigest())


async def test_chunked_post(tmp_path: Path, backend: HttpBackend) -> None:
    size = 200_000
    expected = pattern_sha256(size, seed=2)

    async def generated() -> AsyncIterator[bytes]:
        for chunk in pattern_chunks(size, seed=2, chunk_size=7_000):
            yield chunk
            await trio.lowlevel.checkpoint()

    async with proxy_running(tmp_path, [backend_route(backend.port)]) as proxy:
        with trio.fail_after(10):
            # httpx sends a generator body with Transfer-Encoding: chunked.
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.post("/echo", content=generated())
            assert response.status_code == 200
            assert response.headers.get("transfer-encoding") == "chunked"
            assert hashlib.sha256(response.content).hexdigest() == expected

            # The same by hand, with small chunks in separate writes.
            raw = await HttpClient.connect(proxy.port)
            try:
                echoed = await raw.request(
                    "PUT", "/echo/raw", body=pattern_chunks(size, seed=2, chunk_size=1_000)
                )
            finally:
                await raw.aclose()
    assert echoed.status == 200
    assert (echoed.length, echoed.sha256) == (size, expected)
    assert echoed.header("content-length") == []
    assert len(backend.requests) == 2
    for seen in backend.requests:
        assert seen.header("transfer-encoding") == ["chunked"]
        assert seen.header("content-length") == []
        assert (seen.body_length, seen.body_sha256) == (size, expected)


# -- 50 MB each way -------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_large_upload_echoed(tmp_path: Path, backend: HttpBackend, framing: str) -> None:
    expected = pattern_sha256(LARGE, seed=5)
    length = LARGE if framing == "content-length" else None
    async with proxy_running(tmp_path, [backend_route(backend.port)], sections=BIG_LIMITS) as proxy:
        peak = _PeakRss(proxy)
        client = await HttpClient.connect(proxy.port)
        try:
            with trio.fail_after(60):
                start = trio.current_time()
                response = await client.request(
                    "POST",
                    "/echo/large",
                    body=pattern_chunks(LARGE, seed=5),
                    content_length=length,
                    keep_body=0,
                )
                elapsed = trio.current_time() - start
        finally:
            await client.aclose()
        print(f"50 MB upload+echo ({framing}): {elapsed:.2f} s")
        _assert_streamed(peak, f"upload {framing}")
        access = await wait_for_line(
            proxy, lambda line: line.get("event") == "access" and line.get("path") == "/echo/large"
        )
    assert response.status == 200
    assert (response.length, response.sha256) == (LARGE, expected)  # on the way back
    [seen] = backend.requests
    assert (seen.body_length, seen.body_sha256) == (LARGE, expected)  # at the backend
    if length is None:
        assert seen.header("transfer-encoding") == ["chunked"]
        assert response.header("transfer-encoding") == ["chunked"]
    else:
        assert seen.header("content-length") == [str(LARGE)]
        assert response.header("content-length") == [str(LARGE)]
    assert access["status"] == 200
    assert access["bytes_in"] == LARGE
    assert access["bytes_out"] == LARGE
    assert access["error"] is None


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_large_download(tmp_path: Path, backend: HttpBackend, framing: str) -> None:
    expected = pattern_sha256(LARGE, seed=6)
    chunked = "1" if framing == "chunked" else "0"
    async with proxy_running(tmp_path, [backend_route(backend.port)]) as proxy:
        peak = _PeakRss(proxy)
        client = await HttpClient.connect(proxy.port)
        try:
            with trio.fail_after(60):
                start = trio.current_time()
                response = await client.request(
                    "GET", f"/blob?size={LARGE}&seed=6&chunked={chunked}", keep_body=0
                )
                elapsed = trio.current_time() - start
        finally:
            await client.aclose()
        print(f"50 MB download ({framing}): {elapsed:.2f} s")
        _assert_streamed(peak, f"download {framing}")
    assert response.status == 200
    assert (response.length, response.sha256) == (LARGE, expected)
    if framing == "chunked":
        assert response.header("content-length") == []
        assert response.header("transfer-encoding") == ["chunked"]
    else:
        assert response.header("content-length") == [str(LARGE)]


async def test_large_upload_to_sink_with_httpx(tmp_path: Path, backend: HttpBackend) -> None:
    """A plain half-duplex client (httpx) uploading 50 MB that the backend only hashes."""
    expected = pattern_sha256(LARGE, seed=7)

    async def generated() -> AsyncIterator[bytes]:
        for chunk in pattern_chunks(LARGE, seed=7):
            yield chunk

    async with proxy_running(tmp_path, [backend_route(backend.port)], sections=BIG_LIMITS) as proxy:
        peak = _PeakRss(proxy)
        with trio.fail_after(60):
            async with httpx.AsyncClient(base_url=proxy.url, timeout=60) as client:
                response = await client.post(
                    "/sink", content=generated(), headers={"content-length": str(LARGE)}
                )
        _assert_streamed(peak, "httpx upload to sink")
    assert response.status_code == 200
    assert response.json() == {"length": LARGE, "sha256": expected}
    [seen] = backend.requests
    assert seen.header("content-length") == [str(LARGE)]


# -- connection reuse and forwarding rules ----------------------------------------------------


async def test_keepalive_reuse(tmp_path: Path, backend: HttpBackend) -> None:
    async with proxy_running(tmp_path, [backend_route(backend.port)]) as proxy:
        client = await HttpClient.connect(proxy.port)
        try:
            with trio.fail_after(10):
                responses = [
                    await client.request("GET", "/a"),
                    await client.request("POST", "/echo", body=b"x" * 5000),
                    await client.request("POST", "/echo", body=pattern_chunks(70_000, seed=9)),
                    await client.request("GET", "/blob?size=70000&chunked=1"),
                    await client.request("PUT", "/sink", body=b"y" * 10),
                    await client.request("GET", "/b"),
                ]
        finally:
            await client.aclose()

        def mine() -> list[dict[str, object]]:
            return [line for line in proxy.access_lines() if line.get("port") == client.local_port]

        # Access lines are written after each response, and travel through a pipe.
        await poll_until(lambda: len(mine()) >= len(responses), limit=5)
        access = mine()
    assert [r.status for r in responses] == [200] * 6
    assert [r.reused_connection for r in responses] == [False] + [True] * 5
    assert json.loads(responses[0].body)["path"] == "/a"
    assert responses[1].body == b"x" * 5000
    assert responses[2].sha256 == pattern_sha256(70_000, seed=9)
    assert responses[3].sha256 == pattern_sha256(70_000)
    assert json.loads(responses[4].body) == {
        "length": 10,
        "sha256": hashlib.sha256(b"y" * 10).hexdigest(),
    }
    assert json.loads(responses[5].body)["path"] == "/b"
    # All six exchanges were logged for this one client connection...
    assert [line["path"] for line in access] == ["/a", "/echo", "/echo", "/blob", "/sink", "/b"]
    assert {line["pid"] for line in access} == {access[0]["pid"]}
    # ...and went over one pooled upstream connection.
    assert len(backend.requests) == 6
    assert len({r.peer_port for r in backend.requests}) == 1


async def test_forwarding_headers_and_hop_by_hop(tmp_path: Path, backend: HttpBackend) -> None:
    async with proxy_running(tmp_path, [backend_route(backend.port)]) as proxy:
        client = await HttpClient.connect(proxy.port)
        try:
            with trio.fail_after(10):
                response = await client.request(
                    "GET",
                    "/headers",
                    headers=[
                        ("Host", "api.example.test:8443"),
                        ("Connection", "keep-alive, X-Hop-Custom"),
                        ("X-Hop-Custom", "must not pass"),
                        ("Keep-Alive", "timeout=5"),
                        ("Proxy-Connection", "keep-alive"),
                        ("TE", "trailers"),
                        ("X-Forwarded-For", "203.0.113.7"),
                        ("X-Forwarded-Proto", "https"),
                        ("Via", "1.0 upstream-cache"),
                        ("X-End-To-End", "kept"),
                    ],
                )
        finally:
            await client.aclose()
    assert response.status == 200
    [seen] = backend.requests
    for hop in ("connection", "x-hop-custom", "keep-alive", "proxy-connection", "te"):
        assert seen.header(hop) == [], f"backend saw hop-by-hop header {hop}"
    assert seen.header("x-end-to-end") == ["kept"]
    assert seen.header("host") == ["api.example.test:8443"]
    assert seen.header("x-forwarded-for") == ["203.0.113.7, 127.0.0.1"]
    assert seen.header("x-forwarded-proto") == ["http"]
    assert seen.header("via") == ["1.0 upstream-cache, 1.1 switchboard"]
    # The response direction: the backend's hop-by-hop headers stay behind, Via is added.
    assert response.header("x-backend") == ["http"]
    assert response.header("x-backend-hop") == []
    assert response.header("keep-alive") == []
    assert "x-backend-hop" not in ",".join(response.header("connection")).lower()
    assert response.header("via") == ["1.1 switchboard"]


async def test_host_preserved_by_default_and_rewritten_per_route(
    tmp_path: Path, backend: HttpBackend
) -> None:
    routes = [
        backend_route(backend.port, "/keep"),
        backend_route(backend.port, "/swap", host="rewrite"),
    ]
    async with proxy_running(tmp_path, routes) as proxy:
        client = await HttpClient.connect(proxy.port)
        try:
            with trio.fail_after(10):
                for path in ("/keep/x", "/swap/x"):
                    response = await client.request(
                        "GET", path, headers=[("Host", "mcp.example.test")]
                    )
                    assert response.status == 200
        finally:
            await client.aclose()
    assert [(r.target, r.header("host")) for r in backend.requests] == [
        ("/keep/x", ["mcp.example.test"]),
        ("/swap/x", [f"127.0.0.1:{backend.port}"]),
    ]
    assert [r.header("x-forwarded-host") for r in backend.requests] == [["mcp.example.test"]] * 2
