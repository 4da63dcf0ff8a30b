"""The PROXY protocol listener behind a real HAProxy, and against spoofers.

Switchboard runs with ``[proxy_protocol] enabled``, ``trusted_networks =
["127.0.0.1/32"]`` and a one-second header timeout. The client that must be recognised
binds its socket to 127.0.0.23 (any 127/8 address is local on Linux), so its address
differs from HAProxy's (127.0.0.1, the trusted one):

- through HAProxy (``send-proxy-v2``, then ``send-proxy``) the backend's X-Forwarded-For
  and the access log name 127.0.0.23 and the client's own port, never 127.0.0.1;
- HAProxy's health checks (``check-send-proxy``: a v2 LOCAL header, or a v1 line naming
  the check connection itself) are served, and HAProxy's stats socket shows the server
  UP with its layer-7 check passing;
- a PROXY header from an untrusted address, a malformed header or a missing one from the
  trusted address, and a header that stalls are all closed without a byte of answer,
  logged as ``proxy_header_refused``, counted, and never reach the backend; a plain
  request from an untrusted address is served as usual.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from proxy.protocol.proxy_header import V2_SIGNATURE
from tests.support.backends import (
    HttpBackend,
    HttpClient,
    backend_route,
    poll_until,
    wait_for_line,
)
from tests.support.haproxy import HAProxyProcess, SendProxy, haproxy_running
from tests.support.proxy_process import ProxyProcess, run_proxy
from tests.support.raw_backend import RawClient, wait_for_access

CLIENT_IP = "127.0.0.23"
"""The end client's address: on loopback, but not in trusted_networks."""
TRUSTED_IP = "127.0.0.1"
PP_TIMEOUT = 1.0
PP_SECTIONS: dict[str, dict[str, Any]] = {
    "proxy_protocol": {
        "enabled": True,
        "trusted_networks": [f"{TRUSTED_IP}/32"],
        "timeout": PP_TIMEOUT,
    }
}
SETTLE = 0.3
"""Time allowed for a (wrongly) forwarded request to show up at the backend."""
REFUSED = "proxy_header_refused"


@pytest.fixture
async def backend(nursery: trio.Nursery) -> HttpBackend:
    server = HttpBackend()
    await nursery.start(server.serve)
    return server


@contextmanager
def pp_proxy(
    tmp_path: Path, backend: HttpBackend, *, workers: int = 1, **extra: dict[str, Any]
) -> Iterator[ProxyProcess]:
    """Switchboard with the PROXY protocol on. Its start blocks the trio loop, which is
    fine: nothing reaches the backend before it is ready."""
    with run_proxy(
        tmp_path, [backend_route(backend.port)], workers=workers, sections={**PP_SECTIONS, **extra}
    ) as proxy:
        yield proxy


async def connect_from(source: str, port: int) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:``port`` whose source address is ``source``."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def local_port(stream: trio.SocketStream) -> int:
    return int(stream.socket.getsockname()[1])


def v2_header(
    command: int = 0x1,
    family: int = 0x11,
    source: tuple[str, int] = ("192.0.2.7", 4242),
    destination: tuple[str, int] = ("198.51.100.1", 443),
) -> bytes:
    """A PROXY v2 header; command 0x0 is LOCAL (no addresses), 0x1 PROXY over TCP4."""
    if command == 0x0:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + b"\x00\x00"
    block = (
        ipaddress.IPv4Address(source[0]).packed
        + ipaddress.IPv4Address(destination[0]).packed
        + struct.pack("!HH", source[1], destination[1])
    )
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(block)) + block


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: switchboard.test\r\n\r\n".encode()


async def access_for(proxy: ProxyProcess, path: str) -> dict[str, Any]:
    """The access line of the request for ``path`` (waiting for the log reader)."""
    return await wait_for_access(proxy, lambda line: line.get("path") == path)


def refused_lines(proxy: ProxyProcess) -> list[dict[str, Any]]:
    return [line for line in list(proxy.lines) if line.get("event") == REFUSED]


async def proxy_protocol_refusals(proxy: ProxyProcess) -> float:
    """``switchboard_limit_rejections_total{limit="proxy_protocol"}`` from /metrics."""
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{proxy.admin_url}/metrics")
    assert response.status_code == 200
    total = 0.0
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if (
                sample.name == "switchboard_limit_rejections_total"
                and sample.labels.get("limit") == "proxy_protocol"
            ):
                total += sample.value
    return total


async def assert_closed_silently(client: RawClient) -> None:
    """The proxy closed the connection and sent nothing at all: no status line."""
    assert await client.read_eof(within=PP_TIMEOUT + 3) == b""


def client_lines(proxy: ProxyProcess) -> list[dict[str, Any]]:
    """Access lines of the test's own requests (not HAProxy's health checks)."""
    return [a for a in proxy.access_lines() if str(a.get("path", "")).startswith("/who/")]


# -- through HAProxy ---------------------------------------------------------------------


async def wait_server_up(haproxy: HAProxyProcess) -> dict[str, str]:
    """HAProxy's stats row once a layer-7 check has passed (rise 1: the first one)."""
    rows: list[dict[str, str]] = []

    def up() -> bool:
        rows.append(haproxy.server_stat())
        return rows[-1]["status"] == "UP" and rows[-1]["check_status"] == "L7OK"

    try:
        await poll_until(up, limit=5.0, interval=0.05)
    except TimeoutError:
        raise AssertionError(
            f"server never UP with L7OK: {rows[-1] if rows else None}\n{haproxy.log}"
        ) from None
    return rows[-1]


@pytest.mark.parametrize("send_proxy", ["send-proxy-v2", "send-proxy"])
async def test_haproxy_passes_the_real_client_address(
    tmp_path: Path, backend: HttpBackend, send_proxy: SendProxy
) -> None:
    with pp_proxy(tmp_path, backend, workers=2) as proxy:
        async with haproxy_running(
            tmp_path, proxy.port, send_proxy=send_proxy, source=TRUSTED_IP
        ) as haproxy:
            await wait_server_up(haproxy)
            client_ports: dict[str, int] = {}
            for i in range(4):
                stream = await connect_from(CLIENT_IP, haproxy.port)
                client = HttpClient(stream)
                try:
                    path = f"/who/{i}"
                    response = await client.request("GET", path)
                    assert response.status == 200, response
                    client_ports[path] = local_port(stream)
                finally:
                    await client.aclose()

            for path, port in client_ports.items():
                seen = [r for r in backend.requests if r.target == path]
                assert len(seen) == 1, [r.target for r in backend.requests]
                # HAProxy adds no X-Forwarded-For of its own (no ``option forwardfor``),
                # so the one Switchboard sets must be the client's, from the header.
                assert seen[0].header("x-forwarded-for") == [CLIENT_IP]
                line = await access_for(proxy, path)
                assert line["client"] == CLIENT_IP, line
                assert line["port"] == port, line
                assert line["status"] == 200, line

            # The health checks went through Switchboard to the backend and were answered;
            # HAProxy names the check connection itself (LOCAL for v2, the check socket's
            # own addresses for v1), so the log shows HAProxy's address there.
            await poll_until(
                lambda: len([a for a in proxy.access_lines() if a.get("path") == "/healthz"]) >= 2,
                limit=5.0,
            )
            checks = [a for a in proxy.access_lines() if a.get("path") == "/healthz"]
            assert {a["client"] for a in checks} == {TRUSTED_IP}, checks
            assert {a["status"] for a in checks} == {200}, checks
            assert any(r.target == "/healthz" for r in backend.requests)

            stat = haproxy.server_stat()
            assert stat["status"] == "UP", stat
            assert stat["check_status"] == "L7OK", stat
            assert stat["check_code"] == "200", stat
            assert stat["chkfail"] == "0", stat
            assert stat["chkdown"] == "0", stat
            assert "is DOWN" not in haproxy.log, haproxy.log
    assert refused_lines(proxy) == []
    assert not any(line.get("client") == TRUSTED_IP for line in client_lines(proxy))


# -- the header, sent by hand from the trusted address ----------------------------------


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(v2_header(command=0x0), id="v2-local"),
        pytest.param(b"PROXY UNKNOWN\r\n", id="v1-unknown"),
    ],
)
async def test_local_header_from_trusted_source_is_served_with_the_socket_address(
    tmp_path: Path, backend: HttpBackend, header: bytes
) -> None:
    with pp_proxy(tmp_path, backend) as proxy:
        stream = await connect_from(TRUSTED_IP, proxy.port)
        client = RawClient(stream)
        port = local_port(stream)
        await client.send(header + get("/local"))
        response = await client.read_response()
        assert response.status == 200
        await client.aclose()
        line = await wait_for_access(proxy, lambda a: a.get("path") == "/local")
        assert line["client"] == TRUSTED_IP, line
        assert line["port"] == port, line
        assert line["status"] == 200, line
        [seen] = [r for r in backend.requests if r.target == "/local"]
        assert seen.header("x-forwarded-for") == [TRUSTED_IP]
        assert refused_lines(proxy) == []


async def test_v2_header_sent_in_pieces_is_reassembled(
    tmp_path: Path, backend: HttpBackend
) -> None:
    """A header split over several segments (signature, fixed part, address block),
    with the request after a pause, names the address inside it."""
    with pp_proxy(tmp_path, backend) as proxy:
        stream = await connect_from(TRUSTED_IP, proxy.port)
        client = RawClient(stream)
        header = v2_header(source=("203.0.113.9", 5555))
        for piece in (header[:5], header[5:14], header[14:20], header[20:]):
            await client.send(piece)
            await trio.sleep(0.05)
        await client.send(get("/pieces"))
        response = await client.read_response()
        assert response.status == 200
        await client.aclose()
        line = await wait_for_access(proxy, lambda a: a.get("path") == "/pieces")
        assert (line["client"], line["port"]) == ("203.0.113.9", 5555), line
        [seen] = [r for r in backend.requests if r.target == "/pieces"]
        assert seen.header("x-forwarded-for") == ["203.0.113.9"]


# -- refusals ----------------------------------------------------------------------------
# Each test below drives several refused connections through one Switchboard (its start
# is most of a test's time); each connection's refusal is matched by its source port.


async def assert_refused(proxy: ProxyProcess, source: str, port: int, reason: str) -> None:
    """The ``proxy_header_refused`` line of the connection from ``source``:``port``."""
    line = await wait_for_line(
        proxy, lambda x: x.get("event") == REFUSED and x.get("port") == port, limit=5.0
    )
    assert line["client"] == source, line
    assert str(line["reason"]).startswith(reason), line


async def assert_nothing_forwarded(proxy: ProxyProcess, backend: HttpBackend) -> None:
    await trio.sleep(SETTLE)
    assert backend.requests == []
    assert backend.connections_accepted == 0
    assert proxy.access_lines() == []


async def send_and_expect_close(source: str, proxy: ProxyProcess, payload: bytes) -> int:
    """Connect from ``source``, send ``payload``: the proxy must close without a byte.
    Returns the connection's source port."""
    stream = await connect_from(source, proxy.port)
    client = RawClient(stream)
    port = local_port(stream)
    try:
        await client.send(payload)
        await assert_closed_silently(client)
    finally:
        await client.aclose()
    return port


SPOOFS = {
    "v1": b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\n",
    "v2": v2_header(source=("1.2.3.4", 1111)),
}


async def test_spoofed_header_from_untrusted_source_is_refused(
    tmp_path: Path, backend: HttpBackend
) -> None:
    with pp_proxy(tmp_path, backend) as proxy:
        for count, (name, spoof) in enumerate(SPOOFS.items(), start=1):
            port = await send_and_expect_close(CLIENT_IP, proxy, spoof + get(f"/spoofed/{name}"))
            await assert_refused(proxy, CLIENT_IP, port, "PROXY header from an untrusted source")
            assert await proxy_protocol_refusals(proxy) == count, name
        await assert_nothing_forwarded(proxy, backend)
        assert not any("1.2.3.4" in str(line) for line in proxy.lines)


MALFORMED = {
    "v1-bad-ip": b"PROXY TCP4 1.2.3.999 5.6.7.8 1111 2222\r\n" + get("/bad"),
    "v1-bad-port": b"PROXY TCP4 1.2.3.4 5.6.7.8 01111 2222\r\n" + get("/bad"),
    "v1-lone-lf": b"PROXY TCP4 1.2.3.4\n" + get("/bad"),
    "v2-bad-version": V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12) + get("/bad"),
    "v2-short-block": V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4) + get("/bad"),
    "no-header": get("/bad"),
}


async def test_malformed_or_missing_header_from_trusted_source_is_refused(
    tmp_path: Path, backend: HttpBackend
) -> None:
    """A trusted source must send a valid header: anything else closes the connection
    (a plain request from HAProxy's address would otherwise be logged as HAProxy)."""
    with pp_proxy(tmp_path, backend) as proxy:
        for count, (name, payload) in enumerate(MALFORMED.items(), start=1):
            port = await send_and_expect_close(TRUSTED_IP, proxy, payload)
            await assert_refused(proxy, TRUSTED_IP, port, "malformed PROXY header")
            assert await proxy_protocol_refusals(proxy) == count, name
        await assert_nothing_forwarded(proxy, backend)


STALLS = {"v1": b"PROXY TCP4 1.2.3.4", "v2": v2_header()[:20], "nothing": b""}


async def test_stalled_header_from_trusted_source_times_out(
    tmp_path: Path, backend: HttpBackend
) -> None:
    """Partial headers (and silence), all at once: each connection is closed by the
    proxy_protocol.timeout (the refusal says so), not limits.header_timeout (10 s) or
    anything else, and not before it."""
    elapsed: dict[str, float] = {}
    ports: dict[str, int] = {}
    with pp_proxy(tmp_path, backend) as proxy:

        async def stall(name: str, partial: bytes) -> None:
            started = trio.current_time()
            ports[name] = await send_and_expect_close(TRUSTED_IP, proxy, partial)
            elapsed[name] = trio.current_time() - started

        async with trio.open_nursery() as nursery:
            for name, partial in STALLS.items():
                nursery.start_soon(stall, name, partial)
        for name in STALLS:
            # A timer never fires early (the 0.2 s: this clock started before the proxy's).
            assert elapsed[name] >= PP_TIMEOUT - 0.2, (name, elapsed)
            await assert_refused(
                proxy, TRUSTED_IP, ports[name], "timed out reading the PROXY header"
            )
        assert await proxy_protocol_refusals(proxy) == len(STALLS)
        await assert_nothing_forwarded(proxy, backend)


async def test_plain_request_from_untrusted_source_is_served(
    tmp_path: Path, backend: HttpBackend
) -> None:
    with pp_proxy(tmp_path, backend) as proxy:
        stream = await connect_from(CLIENT_IP, proxy.port)
        client = HttpClient(stream)
        port = local_port(stream)
        # Two requests on one connection: the second is read by the ordinary path.
        for path in ("/plain/1", "/plain/2"):
            response = await client.request("GET", path)
            assert response.status == 200
        await client.aclose()
        for path in ("/plain/1", "/plain/2"):
            line = await access_for(proxy, path)
            assert (line["client"], line["port"], line["status"]) == (CLIENT_IP, port, 200)
            [seen] = [r for r in backend.requests if r.target == path]
            assert seen.header("x-forwarded-for") == [CLIENT_IP]
        assert refused_lines(proxy) == []
        assert await proxy_protocol_refusals(proxy) == 0


# -- limits still apply after the PROXY header -------------------------------------------

MAX_HEADER = 1024


@pytest.mark.parametrize("source", [CLIENT_IP, TRUSTED_IP], ids=["untrusted", "trusted"])
async def test_oversized_head_in_the_same_segment_as_the_header_gets_431(
    tmp_path: Path, backend: HttpBackend, source: str
) -> None:
    """``limits.max_header_bytes`` bounds a complete request head that arrives in one
    segment (tests/net/test_limits.py checks it without the PROXY protocol). With the
    PROXY protocol on, the bytes read while looking for the header (all of them, for an
    untrusted source; those after the header for a trusted one) must count too."""
    with pp_proxy(tmp_path, backend, limits={"max_header_bytes": MAX_HEADER}) as proxy:
        stream = await connect_from(source, proxy.port)
        client = RawClient(stream)
        head = (
            b"GET /big HTTP/1.1\r\nHost: switchboard.test\r\nX-Pad: "
            + b"a" * (3 * MAX_HEADER)
            + b"\r\n\r\n"
        )
        header = v2_header(source=("192.0.2.44", 4444)) if source == TRUSTED_IP else b""
        await client.send(header + head)
        response = await client.read_response()
        await client.aclose()
        assert response.status == 431, (response.status, len(head))
        await trio.sleep(SETTLE)
        assert [r.target for r in backend.requests] == []
