"""Requests the proxy must refuse at once, with the right status, before any backend.

Each malformed request is written byte for byte to the real ``switchboard`` process (one
worker, shared by the tests of this module) with a recording backend behind it. Every
case asserts:

- the status (400, 505 or 426), answered at once: ``header_timeout`` and
  ``body_timeout`` are 30 s and the client waits 10 s at most, so a proxy that waits for
  more bytes fails the test rather than answering 408 late;
- that nothing followed the refusal on the connection (no second answer);
- that the backend received nothing: a well-formed request sent afterwards (the
  "sentinel") must be the only thing the backend got since the case began, and its
  answer proves that anything forwarded earlier would have arrived by then;
- exactly one access-log line for the refused connection, with the status and an
  ``error``.

Refusal bodies must also never carry a Python repr of the offending bytes (checked over
a range of refusals, each still with its 400).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
from collections.abc import Iterator

import pytest
import trio

from tests.support.proxy_process import ProxyProcess, run_proxy
from tests.support.raw_backend import (
    RawResponse,
    RecordingBackend,
    backend_in_thread,
    eventually,
    open_client,
    wait_for_access,
)

ANSWER_WITHIN = 10.0
"""The client's read deadline: far below the proxy's 30 s header and body timeouts."""
PROXY_TIMEOUTS = 30.0
REPR_MARKERS = ("bytearray(", "b'", 'b"', "\\x")
"""What a Python repr of bytes looks like inside a refusal body."""

GET = b"GET / HTTP/1.1\r\nHost: example.test\r\n"
CHUNKED = b"POST / HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
GOOD_WS_KEY = base64.b64encode(b"sixteen byte key")


@pytest.fixture(scope="module")
def backend() -> Iterator[RecordingBackend]:
    with backend_in_thread(RecordingBackend("ok")) as running:
        yield running


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, backend: RecordingBackend
) -> Iterator[ProxyProcess]:
    sections = {
        "server": {"drain_timeout": 1.0},
        "limits": {"header_timeout": PROXY_TIMEOUTS, "body_timeout": PROXY_TIMEOUTS},
    }
    with run_proxy(
        tmp_path_factory.mktemp("strictness"),
        [{"prefix": "/", "backends": [backend.url]}],
        workers=1,
        sections=sections,
    ) as running:
        yield running


_sentinels = itertools.count()


def _received_lengths(backend: RecordingBackend) -> list[int]:
    return [len(connection.received) for connection in list(backend.connections)]


def _received_since(backend: RecordingBackend, lengths: list[int]) -> bytes:
    new = bytearray()
    for index, connection in enumerate(list(backend.connections)):
        new += connection.received[lengths[index] if index < len(lengths) else 0 :]
    return bytes(new)


async def _sentinel(proxy: ProxyProcess) -> bytes:
    """Send a well-formed request and wait for its answer and its access line; the
    request line the backend will have received for it."""
    target = b"/sentinel-%d" % next(_sentinels)
    client = await open_client(proxy.port)
    try:
        await client.send(b"GET " + target + b" HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert (await client.read_response()).status == 200
    finally:
        await client.aclose()
    await wait_for_access(proxy, client.logged)
    return b"GET " + target + b" HTTP/1.1\r\n"


async def refused(
    proxy: ProxyProcess, backend: RecordingBackend, raw: bytes, status: int
) -> RawResponse:
    """Send ``raw`` on a new connection; check that it was refused with ``status`` and
    everything else every refusal must satisfy; the response."""
    before = _received_lengths(backend)
    client = await open_client(proxy.port)
    try:
        await client.send(raw)
        try:
            response = await client.read_response(within=ANSWER_WITHIN)
        except trio.TooSlowError:
            forwarded = _received_since(backend, before)
            pytest.fail(
                f"no answer within {ANSWER_WITHIN} s (the proxy waits for more bytes); "
                f"the backend received {forwarded[:300]!r}"
            )
        assert response.status == status, response
        # Half-close (ends the proxy's linger, or a keep-alive): nothing may follow.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await client.send_eof()
        assert await client.read_eof(within=5) == b"", "bytes after the refusal"
    finally:
        await client.aclose()
    line = await wait_for_access(proxy, client.logged)
    sentinel = await _sentinel(proxy)
    forwarded = _received_since(backend, before)
    assert forwarded.startswith(sentinel), f"the backend received {forwarded[:300]!r}"
    assert forwarded.count(b" HTTP/1.") == 1, f"the backend received {forwarded[:300]!r}"
    lines = [entry for entry in proxy.access_lines() if client.logged(entry)]
    assert len(lines) == 1, lines
    assert line["status"] == response.status, line
    assert isinstance(line["error"], str), line
    assert line["error"], line
    return response


# -- chunk sizes of 2^64 and more ------------------------------------------------------------

HUGE_CHUNK_SIZES = [
    b"10000000000000000",  # 2^64: 17 hex digits
    b"FFFFFFFFFFFFFFFFF",
    b"1" + b"0" * 19,
    b"FFFFFFFFFFFFFFFFFFFF",  # 20 hex digits
]


@pytest.mark.parametrize("size", HUGE_CHUNK_SIZES, ids=[s.decode() for s in HUGE_CHUNK_SIZES])
async def test_chunk_size_of_2_to_the_64_or_more_gets_400(
    proxy: ProxyProcess, backend: RecordingBackend, size: bytes
) -> None:
    await refused(proxy, backend, CHUNKED + size + b"\r\nhello\r\n0\r\n\r\n", 400)


# -- control characters in header values ---------------------------------------------------

# Every C0 control but HTAB (allowed in a field value) and LF (the line end), and DEL.
# NUL, VT, FF and CR are in the list too: every one must be refused alike.
CONTROL_CHARACTERS = [c for c in [*range(0x00, 0x20), 0x7F] if c not in (0x09, 0x0A)]


@pytest.mark.parametrize("char", CONTROL_CHARACTERS, ids=[f"0x{c:02x}" for c in CONTROL_CHARACTERS])
async def test_control_character_in_header_value_gets_400(
    proxy: ProxyProcess, backend: RecordingBackend, char: int
) -> None:
    raw = GET + b"X-Control: a" + bytes([char]) + b"b\r\n\r\n"
    await refused(proxy, backend, raw, 400)


# -- framing the proxy cannot read: refused at once, not after a timeout -------------------

UNREADABLE = {
    "bare-lf-in-chunk-framing": CHUNKED + b"5\nhello\n0\n\n",
    "http-0.9-request-line": b"GET /\r\n",
}


@pytest.mark.parametrize("raw", list(UNREADABLE.values()), ids=list(UNREADABLE))
async def test_unreadable_framing_gets_400_at_once(
    proxy: ProxyProcess, backend: RecordingBackend, raw: bytes
) -> None:
    await refused(proxy, backend, raw, 400)


# -- HTTP versions ---------------------------------------------------------------------------

UNSUPPORTED_VERSIONS = [b"HTTP/1.2", b"HTTP/2.0"]


@pytest.mark.parametrize(
    "version", UNSUPPORTED_VERSIONS, ids=[v.decode() for v in UNSUPPORTED_VERSIONS]
)
async def test_unsupported_http_version_gets_505(
    proxy: ProxyProcess, backend: RecordingBackend, version: bytes
) -> None:
    raw = b"GET / " + version + b"\r\nHost: example.test\r\n\r\n"
    await refused(proxy, backend, raw, 505)


async def test_chunked_http_1_0_request_gets_400(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    """RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing."""
    raw = (
        b"POST / HTTP/1.0\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    await refused(proxy, backend, raw, 400)


# -- WebSocket upgrades ----------------------------------------------------------------------


def upgrade(key: bytes | None, version: bytes = b"13") -> bytes:
    head = (
        b"GET /ws HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    )
    if key is not None:
        head += b"Sec-WebSocket-Key: " + key + b"\r\n"
    return head + b"Sec-WebSocket-Version: " + version + b"\r\n\r\n"


BAD_KEYS: dict[str, bytes | None] = {
    "not-base64-of-16-bytes": b"abc",
    "base64-of-15-bytes": base64.b64encode(b"fifteen bytes!!"),
    "base64-of-17-bytes": base64.b64encode(b"seventeen bytes!!"),
    "missing": None,
}


@pytest.mark.parametrize("key", list(BAD_KEYS.values()), ids=list(BAD_KEYS))
async def test_websocket_upgrade_with_bad_key_gets_400(
    proxy: ProxyProcess, backend: RecordingBackend, key: bytes | None
) -> None:
    await refused(proxy, backend, upgrade(key), 400)


async def test_websocket_upgrade_with_version_12_gets_426_naming_13(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    response = await refused(proxy, backend, upgrade(GOOD_WS_KEY, b"12"), 426)
    assert response.header(b"sec-websocket-version") == b"13"


async def test_valid_websocket_upgrade_reaches_the_backend(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    """The control for the refusals above: version 13 and a good key go through (the
    recording backend declines the upgrade; the relay itself is tested elsewhere)."""
    seen = len(backend.requests)
    client = await open_client(proxy.port)
    try:
        await client.send(upgrade(GOOD_WS_KEY))
        await eventually(lambda: len(backend.requests) > seen)
    finally:
        await client.aclose()
    request = backend.requests[seen]
    assert request.target == b"/ws"
    headers = dict(request.headers)
    assert headers[b"sec-websocket-key"] == GOOD_WS_KEY
    assert headers[b"sec-websocket-version"] == b"13"


# -- refusal bodies --------------------------------------------------------------------------

REFUSED_WITH_400 = {
    "vt-in-header-value": GET + b"X-a: b\x0bc\r\n\r\n",
    "nul-in-header-value": GET + b"X-a: b\x00c\r\n\r\n",
    "obs-fold": GET + b"X-Folded: one\r\n two\r\n\r\n",
    "control-character-in-header-name": GET + b"X\x01a: b\r\n\r\n",
    "bad-chunk-size": CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n",
    "bad-content-length": (
        b"POST / HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5x\r\n\r\nhello"
    ),
    "two-content-lengths": (
        b"POST / HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5\r\n"
        b"Content-Length: 6\r\n\r\nhello!"
    ),
    "bad-request-line": b"GET /a b HTTP/1.1\r\nHost: example.test\r\n\r\n",
    "control-character-in-method": b"G\x01T / HTTP/1.1\r\nHost: example.test\r\n\r\n",
}


@pytest.mark.parametrize("raw", list(REFUSED_WITH_400.values()), ids=list(REFUSED_WITH_400))
async def test_refusal_body_carries_no_python_repr(
    proxy: ProxyProcess, backend: RecordingBackend, raw: bytes
) -> None:
    body = (await refused(proxy, backend, raw, 400)).body.decode("latin-1")
    assert [marker for marker in REPR_MARKERS if marker in body] == [], body
