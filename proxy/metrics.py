"""Prometheus metrics, aggregated across all worker processes.

prometheus_client's multiprocess mode does the aggregation: every process (supervisor and
workers) writes its values to memory-mapped files in ``PROMETHEUS_MULTIPROC_DIR``, which
the supervisor sets before it starts workers; the admin endpoint's collector reads them
all. Counters are summed (a dead worker's counts stay: counters never go backwards when a
worker is restarted), histograms are merged bucket by bucket, and gauges are summed over
live processes (``livesum``; the supervisor marks a dead worker's files when it exits).

Metric objects are created on first use, after the environment is set, and the label
children used per request are cached so the request path pays a dict lookup and an
increment, not a label resolution.
"""

from __future__ import annotations

from functools import cache
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class Metrics:
    """The metric families; one instance per process (see ``metrics()``)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter(
            "switchboard_requests_total",
            "Requests answered, by route and status.",
            ["route", "status"],
        )
        self.request_duration = Histogram(
            "switchboard_request_duration_seconds",
            "Time from request head received to response end, by route (streams excluded).",
            ["route"],
            buckets=_LATENCY_BUCKETS,
        )
        self.request_bytes = Counter(
            "switchboard_request_body_bytes_total", "Request body bytes received.", ["route"]
        )
        self.response_bytes = Counter(
            "switchboard_response_body_bytes_total", "Response body bytes sent.", ["route"]
        )
        self.connections_active = Gauge(
            "switchboard_connections_active",
            "Open client connections by kind (http, sse, websocket), summed over workers.",
            ["kind"],
            multiprocess_mode="livesum",
        )
        self.connections = Counter("switchboard_connections_total", "Client connections accepted.")
        self.refusals = Counter(
            "switchboard_limit_rejections_total",
            "Requests or connections refused by a limit, by limit.",
            ["limit"],
        )
        self.upstream_connections = Gauge(
            "switchboard_upstream_connections",
            "Backend connections by backend and state (idle, in_use), summed over workers.",
            ["backend", "state"],
            multiprocess_mode="livesum",
        )
        self.upstream_failures = Counter(
            "switchboard_upstream_failures_total",
            "Backend exchanges that failed, by backend and reason.",
            ["backend", "reason"],
        )
        self.ejections = Counter(
            "switchboard_backend_ejections_total",
            "Times a backend was taken out of rotation after consecutive failures.",
            ["backend"],
        )
        self.backend_up = Gauge(
            "switchboard_backend_up",
            "1 when every worker's active health check passes for the backend, else 0.",
            ["backend"],
            multiprocess_mode="livemin",
        )
        self.mcp_requests = Counter(
            "switchboard_mcp_requests_total",
            "MCP messages by route, JSON-RPC method (or era-level kind) and HTTP status.",
            ["route", "method", "status"],
        )
        self.mcp_duration = Histogram(
            "switchboard_mcp_request_duration_seconds",
            "Time to answer an MCP message, by JSON-RPC method.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
        )
        self.worker_restarts = Counter(
            "switchboard_worker_restarts_total", "Workers restarted after dying."
        )
        self.workers = Gauge(
            "switchboard_workers",
            "Worker processes running and ready.",
            multiprocess_mode="livesum",
        )
        self.reloads = Counter(
            "switchboard_reloads_total", "Configuration reloads, by result.", ["result"]
        )
        self.redis_up = Gauge(
            "switchboard_redis_up",
            "1 when the worker is connected to Redis, else 0 (its limits are then local).",
            ["worker"],
            multiprocess_mode="livemin",
        )
        self.postgres_up = Gauge(
            "switchboard_postgres_up",
            "1 when the worker's last PostgreSQL call succeeded, else 0.",
            ["worker"],
            multiprocess_mode="livemin",
        )
        self.snapshot_version = Gauge(
            "switchboard_snapshot_version",
            "config_version of the control-plane snapshot the worker serves.",
            ["worker"],
            multiprocess_mode="livemin",
        )
        self.rate_limit_decisions = Counter(
            "switchboard_rate_limit_decisions_total",
            "Rate-limit decisions by result (allowed, limited, unavailable) and by who "
            "decided (redis, precheck, local).",
            ["result", "source"],
        )
        self.auth_failures = Counter(
            "switchboard_auth_failures_total",
            "Requests refused by authentication or authorization, by HTTP status.",
            ["status"],
        )
        self.audit_records = Counter(
            "switchboard_audit_records_total",
            "Usage records by outcome (written, spilled to disk, replayed from disk).",
            ["outcome"],
        )
        self.connection_cap_refusals = Counter(
            "switchboard_connection_cap_refusals_total",
            "Connections refused by a global concurrent-connection cap, by scope.",
            ["scope", "source"],
        )
        self._request_children: dict[tuple[str, int], Any] = {}

    def count_request(
        self, route: str, status: int, seconds: float | None, bytes_in: int, bytes_out: int
    ) -> None:
        """One answered request; ``seconds`` None for streams (SSE, WebSocket), whose
        duration is how long the stream lived, not how long the proxy took."""
        key = (route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, str(status)),
                self.request_duration.labels(route),
                self.request_bytes.labels(route),
                self.response_bytes.labels(route),
            )
            self._request_children[key] = children
        requests, duration, req_bytes, resp_bytes = children
        requests.inc()
        if seconds is not None:
            duration.observe(seconds)
        if bytes_in:
            req_bytes.inc(bytes_in)
        if bytes_out:
            resp_bytes.inc(bytes_out)


@cache
def metrics() -> Metrics:
    return Metrics()


# Which limit a refusal status stands for, for switchboard_limit_rejections_total.
LIMIT_BY_STATUS = {
    408: "timeout",
    413: "body_size",
    431: "header_size",
    429: "rate",
    503: "capacity",
}


def render(directory: str) -> tuple[bytes, str]:
    """The Prometheus text exposition of every process's metrics in ``directory``."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int, directory: str) -> None:
    from prometheus_client.multiprocess import mark_process_dead as _mark

    _mark(pid, path=directory)  # type: ignore[no-untyped-call]
