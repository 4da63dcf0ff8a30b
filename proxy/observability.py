"""Structured logging (structlog, JSON lines on stdout), the buffered access log, and
per-worker statistics.

Tuned for the request path: a filtering bound logger (disabled levels cost a no-op call),
cached on first use, rendering with msgspec straight to bytes; access lines kept as
structs and encoded a batch at a time.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, BinaryIO

import msgspec
import structlog
from msgspec import UNSET, UnsetType

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


_access_stream: BinaryIO | None = None
_access_bound: dict[str, Any] = {}


def configure_logging(level: str = "info", *, stream: BinaryIO | None = None, **bound: Any) -> None:
    """Configure structlog once per process; ``bound`` values go on every line."""
    global _access_stream, _access_bound
    _access_stream = stream or sys.stdout.buffer
    _access_bound = dict(bound)
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]
    if bound:
        fixed = dict(bound)

        def _add_bound(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
            event.update(fixed)
            return event

        processors.append(_add_bound)
    processors.append(structlog.processors.format_exc_info)
    processors.append(structlog.processors.JSONRenderer(serializer=_encode))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.BytesLoggerFactory(file=stream or sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )


def _encode(obj: Any, **_: Any) -> bytes:
    return msgspec.json.encode(obj, enc_hook=str)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


class AccessLine(msgspec.Struct, kw_only=True):
    """One access-log line: the same JSON object as every other line (``event``,
    ``level``, ``ts``, the process's bound fields), in this field order. The MCP fields
    appear on MCP routes only. ``ts`` is filled in when the line is written."""

    event: str
    level: str
    ts: str
    client: str
    port: int
    method: str | None
    path: str | None
    status: int
    route: str | None
    upstream: str | None
    bytes_in: int
    bytes_out: int
    duration_ms: float
    error: str | None
    mcp_era: str | UnsetType = UNSET
    mcp_method: str | UnsetType | None = UNSET
    mcp_name: str | UnsetType | None = UNSET
    replica: str | UnsetType | None = UNSET
    mcp_backend_era: str | UnsetType = UNSET
    mcp_translated: bool | UnsetType = UNSET
    worker: int | UnsetType | None = UNSET
    pid: int | UnsetType | None = UNSET


BATCH_LINES = 64
BATCH_SECONDS = 0.25


class AccessLog:
    """Access lines, written without structlog's processor chain and in batches:
    ``add`` keeps a line (stamped with the time it was made), ``flush`` writes what is
    kept in one write. Whoever owns the log flushes it when ``full`` says so, at most
    ``BATCH_SECONDS`` after a first line, and on drain and exit; with ``per_line`` it
    is full after every line."""

    __slots__ = ("_bound", "_encode_lines", "_lines", "_second", "_stamp", "_stream", "per_line")

    def __init__(self, *, per_line: bool = False) -> None:
        self._stream = _access_stream or sys.stdout.buffer
        bound = dict(_access_bound)
        self._bound = (bound.get("worker"), bound.get("pid"))
        self._encode_lines = msgspec.json.Encoder(enc_hook=str).encode_lines
        self._lines: list[tuple[AccessLine, float]] = []
        self._second = -1
        self._stamp = ""
        self.per_line = per_line

    def add(self, line: AccessLine) -> None:
        worker, pid = self._bound
        if worker is not None:
            line.worker = worker
        if pid is not None:
            line.pid = pid
        self._lines.append((line, time.time()))

    @property
    def full(self) -> bool:
        """Time to flush (each line, with ``per_line``): the owner publishes the counts
        first, so that what is logged has been counted."""
        return self.per_line or len(self._lines) >= BATCH_LINES

    def __bool__(self) -> bool:
        return bool(self._lines)

    def flush(self) -> None:
        lines = self._lines
        if not lines:
            return
        self._lines = []
        for line, when in lines:
            line.ts = self._timestamp(when)
        self._stream.write(self._encode_lines([line for line, _ in lines]))
        self._stream.flush()

    def _timestamp(self, when: float) -> str:
        """ISO 8601 UTC with microseconds, the seconds part formatted once a second."""
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((when - second) * 1_000_000):06d}Z"


@dataclass(slots=True)
class WorkerStats:
    """What a worker needs to know about itself at once (limits, drain); everything an
    operator looks at goes to Prometheus metrics (proxy.metrics)."""

    requests: int = 0
    active_connections: int = 0
