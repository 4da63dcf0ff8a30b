"""An OTLP/HTTP trace receiver for tests: accepts ``POST /v1/traces`` in the protobuf
encoding collectors take, decodes it with opentelemetry-proto, and keeps every span.
Served by hypercorn on trio in the test's nursery. ``local_tracer`` gives a test spans
of its own (a client's), exported to such a receiver.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.asgi import serve_asgi
from tests.support.proxy_process import free_port

KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@dataclass(eq=False)
class OtlpReceiver:
    port: int = field(default_factory=free_port)
    spans: list[ReceivedSpan] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def build_app(self) -> Starlette:
        async def traces(request: Request) -> Response:
            message = ExportTraceServiceRequest()
            message.ParseFromString(await request.body())
            for resource_spans in message.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            ReceivedSpan(
                                service=str(resource.get("service.name", "")),
                                name=span.name,
                                kind=KINDS.get(span.kind, str(span.kind)),
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_span_id=span.parent_span_id.hex(),
                                attributes={a.key: _value(a.value) for a in span.attributes},
                            )
                        )
            body = ExportTraceServiceResponse().SerializeToString()
            return Response(body, media_type="application/x-protobuf")

        return Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_asgi, self.build_app(), self.port))
            task_status.started(self.port)


@contextmanager
def local_tracer(endpoint: str, service: str) -> Iterator[ProcessTracing]:
    """A tracer of this test's own (not the process-wide provider, which would start
    tracing every later test's SDK clients), exporting to ``endpoint`` from a batch
    processor's thread (a blocking export would stall the trio loop the receiver runs
    in)."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    processor = BatchSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint, timeout=5), schedule_delay_millis=100
    )
    provider.add_span_processor(processor)
    try:
        yield ProcessTracing(provider.get_tracer("switchboard-tests"), processor)
    finally:
        provider.shutdown()


@dataclass
class ProcessTracing:
    tracer: trace.Tracer
    processor: BatchSpanProcessor

    async def flush(self) -> None:
        """Export what has ended (in a thread: the receiver runs in this trio loop)."""
        await trio.to_thread.run_sync(self.processor.force_flush)
