"""An official-SDK MCP backend (``McpBackend``) in a process of its own, exporting the
spans the MCP SDK makes for each message it handles to an OTLP/HTTP endpoint. A process
of its own because OpenTelemetry's tracer provider is process-wide, and the test
process must not start tracing every later test's SDK clients and servers.

    python -m tests.support.traced_backend PORT OTLP_ENDPOINT
"""

from __future__ import annotations

import sys

import trio
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from tests.support.mcp_servers import McpBackend

SERVICE = "mcp-backend"


def main() -> None:
    port, endpoint = int(sys.argv[1]), sys.argv[2]
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=100)
    )
    trace.set_tracer_provider(provider)
    backend = McpBackend("traced", json_response=True, port=port)
    try:
        trio.run(backend.serve)
    except KeyboardInterrupt:
        pass
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main()
