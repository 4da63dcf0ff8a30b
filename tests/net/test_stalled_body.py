"""A request body that stalls gets its 408 after one ``body_timeout``, not two.

The proxy forwards the head and the first body bytes, then waits; the clock that runs
out must be the one started by the last body byte, and no second timer may start when
the request moves from one code path to another.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from tests.support.proxy_process import run_proxy
from tests.support.raw_backend import RecordingBackend, open_client, wait_for_access

BODY_TIMEOUT = 3.0


async def test_stalled_content_length_body_gets_408_after_one_body_timeout(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend = RecordingBackend("ok")
    await nursery.start(backend.serve)
    sections = {"server": {"drain_timeout": 1.0}, "limits": {"body_timeout": BODY_TIMEOUT}}
    routes: list[Mapping[str, Any]] = [{"prefix": "/", "backends": [backend.url]}]
    with run_proxy(tmp_path, routes, workers=1, sections=sections) as proxy:
        client = await open_client(proxy.port)
        await client.send(
            b"POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Length: 100\r\n\r\n0123456789"
        )
        last_byte_sent = trio.current_time()
        response = await client.read_response(within=3 * BODY_TIMEOUT)
        waited = trio.current_time() - last_byte_sent
        await client.aclose()
        assert response.status == 408
        # A time comparison, because the delay is the property under test: one
        # body_timeout is right, two are the fault. 1.5 x tells them apart and leaves
        # half a timeout of margin for a busy machine.
        assert waited < 1.5 * BODY_TIMEOUT, f"408 after {waited:.2f} s"
        assert waited >= BODY_TIMEOUT - 0.1, f"408 after {waited:.2f} s"  # not early
        line = await wait_for_access(proxy, client.logged)
        assert (line["status"], bool(line["error"])) == (408, True), f"{line}"
