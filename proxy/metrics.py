"""Prometheus metrics, aggregated across all worker processes.

prometheus_client's multiprocess mode does the aggregation: every process (supervisor and
workers) writes its values to memory-mapped files in ``PROMETHEUS_MULTIPROC_DIR``, which
the supervisor sets before it starts workers; the admin endpoint's collector reads them
all. Counters are summed (a dead worker's counts stay: counters never go backwards when a
worker is restarted), histograms are merged bucket by bucket, and gauges are summed over
live processes (``livesum``; the supervisor marks a dead worker's files when it exits).

The request path does not touch those files: each update of a multiprocess value costs a
``getpid()`` system call and a memory-mapped write, several per request. It counts in
plain per-worker dictionaries (``RequestMetrics``) instead, and ``publish`` adds what
changed to the shared values at most every 250 ms, when 64 access lines are buffered,
and on drain and exit (``proxy.net.context``). The access lines of a batch are written
after its counts are published, so a request is always counted before it is logged.
"""

from __future__ import annotations

from bisect import bisect_left
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
        self.mcp_translated = Counter(
            "switchboard_mcp_translated_total",
            "MCP messages translated between eras at the proxy, by route, the client's "
            "era and the backend's.",
            ["route", "client_era", "backend_era"],
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


class _Histogram:
    """One histogram child's observations since the last publish."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def clear(self) -> None:
        self.buckets = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.total = 0.0


class _Series:
    """What one (route, status) pair counted since the last publish."""

    __slots__ = ("bytes_in", "bytes_out", "count", "durations")

    def __init__(self, durations: _Histogram) -> None:
        self.count = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.durations = durations
        """The route's latency histogram (shared by its statuses)."""


class RequestMetrics:
    """The request path's counts, kept in plain objects and dictionaries; ``publish``
    hands them to the shared multiprocess values. Series names and labels are those of
    ``Metrics``."""

    __slots__ = (
        "_durations",
        "_mcp_durations",
        "_series",
        "active",
        "auth_failures",
        "connections",
        "mcp_requests",
        "mcp_translated",
        "refusals",
        "upstream_failures",
    )

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], _Series] = {}
        self._durations: dict[str, _Histogram] = {}
        self.mcp_requests: dict[tuple[str, str, str], int] = {}
        self.mcp_translated: dict[tuple[str, str, str], int] = {}
        self._mcp_durations: dict[tuple[str, str], _Histogram] = {}
        self.refusals: dict[str, int] = {}
        self.auth_failures: dict[str, int] = {}
        self.upstream_failures: dict[tuple[str, str], int] = {}
        self.connections = 0
        self.active: dict[str, int] = {"http": 0, "sse": 0, "websocket": 0}
        """Open connections by kind: a gauge, published whole."""

    def count_request(
        self, route: str, status: str, seconds: float | None, bytes_in: int, bytes_out: int
    ) -> None:
        """One answered request; ``seconds`` None for streams (SSE, WebSocket), whose
        duration is how long the stream lived, not how long the proxy took."""
        series = self._series.get((route, status))
        if series is None:
            series = self._new_series(route, status)
        series.count += 1
        if seconds is not None:
            histogram = series.durations
            histogram.buckets[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
            histogram.total += seconds
        series.bytes_in += bytes_in
        series.bytes_out += bytes_out

    def _new_series(self, route: str, status: str) -> _Series:
        histogram = self._durations.get(route)
        if histogram is None:
            histogram = self._durations[route] = _Histogram()
        series = self._series[(route, status)] = _Series(histogram)
        return series

    def count_mcp(self, route: str, method: str, status: str, seconds: float | None) -> None:
        key = (route, method, status)
        self.mcp_requests[key] = self.mcp_requests.get(key, 0) + 1
        if seconds is not None:
            hkey = (route, method)
            histogram = self._mcp_durations.get(hkey)
            if histogram is None:
                histogram = self._mcp_durations[hkey] = _Histogram()
            histogram.buckets[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
            histogram.total += seconds

    def publish(self, m: Metrics) -> None:
        """Add everything counted since the last publish to the shared values."""
        for (route, status), series in self._series.items():
            if series.count:
                m.requests.labels(route, status).inc(series.count)
                series.count = 0
            if series.bytes_in:
                m.request_bytes.labels(route).inc(series.bytes_in)
                series.bytes_in = 0
            if series.bytes_out:
                m.response_bytes.labels(route).inc(series.bytes_out)
                series.bytes_out = 0
        _publish_counts(self.mcp_requests, m.mcp_requests)
        _publish_counts(self.mcp_translated, m.mcp_translated)
        _publish_counts(self.refusals, m.refusals)
        _publish_counts(self.auth_failures, m.auth_failures)
        _publish_counts(self.upstream_failures, m.upstream_failures)
        _publish_histograms(self._durations, m.request_duration)
        _publish_histograms(self._mcp_durations, m.mcp_duration)
        if self.connections:
            m.connections.inc(self.connections)
            self.connections = 0
        for kind, count in self.active.items():
            m.connections_active.labels(kind).set(count)


def _publish_counts(counts: dict[Any, int], family: Any) -> None:
    if not counts:
        return
    for key, count in counts.items():
        child = family.labels(*key) if isinstance(key, tuple) else family.labels(key)
        child.inc(count)
    counts.clear()


def _publish_histograms(histograms: dict[Any, _Histogram], family: Any) -> None:
    for key, histogram in histograms.items():
        if not histogram.total and not any(histogram.buckets):
            continue
        child = family.labels(*key) if isinstance(key, tuple) else family.labels(key)
        # The child's own values, bucket by bucket (``observe`` would pay a shared-memory
        # write per observation): non-cumulative buckets, as prometheus_client keeps them.
        for i, count in enumerate(histogram.buckets):
            if count:
                child._buckets[i].inc(count)
        child._sum.inc(histogram.total)
        histogram.clear()
