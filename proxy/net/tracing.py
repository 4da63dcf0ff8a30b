"""OpenTelemetry traces of the worker's requests, exported over OTLP/HTTP.

The request path chooses ids and notes times (``proxy.protocol.trace_context``); when an
exchange is accounted for, its spans are made here as finished spans (the SDK's
``ReadableSpan``) and handed to a ``BatchSpanProcessor``, whose own thread exports them:
a request never waits for a collector, and when the queue is full a span is dropped,
not waited for. With ``tracing.sample_ratio = 0`` none of this exists.

Attributes follow OpenTelemetry's semantic conventions for HTTP and for MCP
(``mcp.method.name``, ``mcp.session.id``, ``mcp.protocol.version``, ``jsonrpc.request.id``,
``gen_ai.tool.name``, ``gen_ai.operation.name``) plus ``switchboard.backend.replica``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from proxy.config import TracingConfig

if TYPE_CHECKING:
    from proxy.protocol.exchange import Exchange
    from proxy.protocol.trace_context import Trace

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SCOPE = InstrumentationScope("switchboard")


class Tracer:
    """One worker's exporter and the spans it makes of finished exchanges."""

    def __init__(self, config: TracingConfig, worker: int) -> None:
        self._resource = Resource.create(
            {"service.name": config.service_name, "service.instance.id": f"worker-{worker}"}
        )
        self._processor = BatchSpanProcessor(
            OTLPSpanExporter(endpoint=config.endpoint, timeout=config.export_timeout),
            max_queue_size=config.max_queue_size,
            export_timeout_millis=config.export_timeout * 1000,
        )
        # perf_counter() readings (what the request path notes) to Unix time in ns.
        self._offset_ns = time.time_ns() - time.perf_counter_ns()

    def record(self, x: Exchange, trace: Trace, client_ip: str) -> None:
        """The server span of ``x`` and a client span per attempt at a backend."""
        end = self._ns(time.perf_counter())
        name, attributes = _describe(x)
        server = SpanContext(trace.trace_id, trace.server_span_id, False, _SAMPLED)
        parent = (
            SpanContext(trace.trace_id, trace.parent_span_id, True, _SAMPLED)
            if trace.parent_span_id
            else None
        )
        failed = x.status >= 500 or (x.error is not None and not x.refused)
        status = Status(StatusCode.ERROR, x.error) if failed else Status(StatusCode.UNSET)
        server_attributes = dict(attributes)
        server_attributes["client.address"] = client_ip
        if x.status:
            server_attributes["http.response.status_code"] = x.status
        if failed:
            server_attributes["error.type"] = str(x.status) if x.status >= 500 else "error"
        spans = [
            ReadableSpan(
                name,
                server,
                parent,
                self._resource,
                server_attributes,
                kind=SpanKind.SERVER,
                status=status,
                start_time=self._ns(x.started),
                end_time=end,
                instrumentation_scope=_SCOPE,
            )
        ]
        last = len(trace.attempts) - 1
        for i, attempt in enumerate(trace.attempts):
            backend = attempt.backend
            client_attributes: dict[str, Any] = {
                **attributes,
                "server.address": backend.host,
                "server.port": backend.port,
                "switchboard.backend.replica": backend.replica,
            }
            if i == last and x.status and not x.refused:
                client_attributes["http.response.status_code"] = x.status
            ended = attempt.ended
            spans.append(
                ReadableSpan(
                    name,
                    SpanContext(trace.trace_id, attempt.span_id, False, _SAMPLED),
                    server,
                    self._resource,
                    client_attributes,
                    kind=SpanKind.CLIENT,
                    status=status if i == last else Status(StatusCode.ERROR, "retried"),
                    start_time=self._ns(attempt.started),
                    end_time=self._ns(ended) if ended is not None else end,
                    instrumentation_scope=_SCOPE,
                )
            )
        for span in spans:
            self._processor.on_end(span)

    def shutdown(self) -> None:
        """Export what is queued (blocking: at worker exit, in a thread)."""
        self._processor.shutdown()  # type: ignore[no-untyped-call]

    def _ns(self, perf_seconds: float) -> int:
        return int(perf_seconds * 1e9) + self._offset_ns


def _describe(x: Exchange) -> tuple[str, dict[str, Any]]:
    """A span name and the attributes both kinds of span share."""
    method = x.method.decode("ascii", "replace")
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.path": x.target.partition(b"?")[0].decode("latin-1"),
    }
    route = x.route
    if route is not None:
        attributes["http.route"] = route.prefix
    decision = x.mcp
    envelope = decision.envelope if decision is not None else None
    trace = x.trace
    if trace is not None and trace.session_id:
        attributes["mcp.session.id"] = trace.session_id
    if trace is not None and trace.protocol_version:
        attributes["mcp.protocol.version"] = trace.protocol_version
    if envelope is None or envelope.method is None:
        return f"{method} {route.prefix if route is not None else ''}".rstrip(), attributes
    attributes["mcp.method.name"] = envelope.method
    if envelope.id is not None:
        attributes["jsonrpc.request.id"] = str(envelope.id)
    target = envelope.name or envelope.uri
    if envelope.method == "tools/call":
        attributes["gen_ai.operation.name"] = "execute_tool"
        if envelope.name is not None:
            attributes["gen_ai.tool.name"] = envelope.name
    elif envelope.uri is not None:
        attributes["mcp.resource.uri"] = envelope.uri
    return f"{envelope.method} {target}" if target else envelope.method, attributes
