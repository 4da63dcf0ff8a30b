"""An OTLP/HTTP trace receiver for tests: accepts ``POST /v1/traces`` in the protobuf
encoding collectors take, decodes it with opentelemetry-proto, and keeps every span.
Served by hypercorn on trio in the test's nursery.

``traced_test_process(endpoint)`` also points this test process's own OpenTelemetry
spans (the test's client spans, and those the MCP SDK makes in in-process backends) at
a receiver, for as long as the ``with`` lasts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIFramework
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

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
        config = Config()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")
        config.graceful_timeout = 0.5
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(hypercorn_serve, cast("ASGIFramework", self.build_app()), config)
            )
            task_status.started(self.port)


class _Forwarding(SpanProcessor):
    """The process-wide processor: passes spans on to the current test's, if any."""

    def __init__(self) -> None:
        self.current: SpanProcessor | None = None

    def on_end(self, span: ReadableSpan) -> None:
        current = self.current
        if current is not None:
            current.on_end(span)


_forwarding = _Forwarding()
_installed = False


@dataclass
class ProcessTracing:
    tracer: trace.Tracer
    processor: BatchSpanProcessor

    async def flush(self) -> None:
        """Export what has ended (in a thread: the receiver runs in this trio loop)."""
        await trio.to_thread.run_sync(self.processor.force_flush)


@contextmanager
def traced_test_process(endpoint: str) -> Iterator[ProcessTracing]:
    """This process's spans exported to ``endpoint`` by a batch processor (its own
    thread: a blocking export would stall the trio loop the receiver runs in)."""
    global _installed
    if not _installed:
        provider = TracerProvider(resource=Resource.create({"service.name": "switchboard-tests"}))
        provider.add_span_processor(_forwarding)
        trace.set_tracer_provider(provider)
        _installed = True
    processor = BatchSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint, timeout=5), schedule_delay_millis=100
    )
    _forwarding.current = processor
    try:
        yield ProcessTracing(trace.get_tracer("switchboard-tests"), processor)
    finally:
        _forwarding.current = None
        processor.shutdown()  # type: ignore[no-untyped-call]
