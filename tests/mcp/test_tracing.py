"""OpenTelemetry traces through the proxy, to a real OTLP/HTTP receiver (the protobuf
decoded with opentelemetry-proto): a client span, the proxy's server span and the span
of its attempt at the backend, and the backend's own span (the MCP SDK's), all in one
trace, each the child of the one before, with the MCP attributes; with tracing off, the
proxy exports nothing and leaves trace context as it came."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
from opentelemetry.propagate import inject

from tests.support.backends import HttpClient, poll_until, proxy_running
from tests.support.mcp_servers import MODERN_VERSION, McpBackend, modern_headers, modern_request
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan, local_tracer
from tests.support.proxy_process import ProxyProcess, accepts, free_port
from tests.support.traced_backend import SERVICE


async def call_whoami(proxy: ProxyProcess, carrier: dict[str, str]) -> int:
    """A 2026-07-28 tools/call carrying the client's trace context in its headers and
    in ``params._meta``, as the SDK client does."""
    params = {"name": "whoami", "arguments": {}, "_meta": dict(carrier)}
    body = json.dumps(modern_request(7, "tools/call", params)).encode()
    headers = [*modern_headers("tools/call", "whoami"), *carrier.items()]
    client = await HttpClient.connect(proxy.port)
    try:
        with trio.fail_after(15):
            response = await client.request("POST", "/mcp", headers=headers, body=body)
    finally:
        await client.aclose()
    return response.status


async def test_one_trace_across_client_proxy_and_backend(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    receiver = OtlpReceiver()
    await nursery.start(receiver.serve)
    port = free_port()
    backend = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.support.traced_backend", str(port), receiver.endpoint],
        stdin=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            if await trio.to_thread.run_sync(accepts, port):
                break
            assert backend.poll() is None, "the traced backend exited"
            await trio.sleep(0.05)
        route = {"prefix": "/mcp", "kind": "mcp", "backends": [f"http://127.0.0.1:{port}"]}
        tracing = {"sample_ratio": 1.0, "endpoint": receiver.endpoint, "service_name": "edge"}
        sections: dict[str, dict[str, Any]] = {
            "tracing": tracing,
            "mcp.session_keys": {"k1": "s" * 40},
        }
        with local_tracer(receiver.endpoint, "agent") as client_tracing:
            async with proxy_running(tmp_path, [route], sections=sections, workers=2) as proxy:
                with client_tracing.tracer.start_as_current_span("agent call") as client_span:
                    carrier: dict[str, str] = {}
                    inject(carrier)
                    assert await call_whoami(proxy, carrier) == 200
                trace_id = f"{client_span.get_span_context().trace_id:032x}"
            # The proxy has stopped: its workers exported what they held on the way out.
            await client_tracing.flush()

        def in_trace(service: str, kind: str) -> list[ReceivedSpan]:
            return [
                s
                for s in receiver.spans
                if s.trace_id == trace_id and s.service == service and s.kind == kind
            ]

        # The backend exports every 0.1 s.
        await poll_until(lambda: bool(in_trace(SERVICE, "SERVER")), limit=20, interval=0.05)
    finally:
        backend.terminate()
        with trio.fail_after(10):
            await backend.wait()

    [client] = in_trace("agent", "INTERNAL")
    [server] = in_trace("edge", "SERVER")
    [attempt] = in_trace("edge", "CLIENT")
    [handled] = in_trace(SERVICE, "SERVER")
    assert server.parent_span_id == client.span_id
    assert attempt.parent_span_id == server.span_id
    assert handled.parent_span_id == attempt.span_id  # the backend's span, under the proxy's
    assert server.name == attempt.name == handled.name == "tools/call whoami"
    for span in (server, attempt):
        assert span.attributes["mcp.method.name"] == "tools/call"
        assert span.attributes["gen_ai.tool.name"] == "whoami"
        assert span.attributes["gen_ai.operation.name"] == "execute_tool"
        assert span.attributes["jsonrpc.request.id"] == "7"
        assert span.attributes["mcp.protocol.version"] == MODERN_VERSION
        assert span.attributes["http.response.status_code"] == 200
    assert attempt.attributes["switchboard.backend.replica"]
    assert attempt.attributes["server.port"] == port
    assert server.attributes["client.address"] == "127.0.0.1"


async def test_with_tracing_off_nothing_is_exported_or_changed(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    receiver = OtlpReceiver()
    await nursery.start(receiver.serve)
    backend = McpBackend("r1", json_response=True)
    await nursery.start(backend.serve)
    route = {"prefix": "/mcp", "kind": "mcp", "backends": [backend.url]}
    sections = {"tracing": {"endpoint": receiver.endpoint}, "mcp.session_keys": {"k1": "s" * 40}}
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with proxy_running(tmp_path, [route], sections=sections) as proxy:
        assert await call_whoami(proxy, {"traceparent": traceparent}) == 200
    assert receiver.spans == []
    [post] = [r for r in backend.requests if r.method == "POST"]
    assert post.headers["traceparent"] == traceparent
