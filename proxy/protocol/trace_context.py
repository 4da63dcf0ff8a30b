"""W3C trace context on the request path: which requests are traced, under which parent,
and what the backend is told. Sans-IO.

A traced request has a server span (the proxy's handling of it, a child of the client's
span where the request named one) and a client span per attempt to reach a backend (a
child of the server span). The client's span comes from the ``traceparent`` header, or
for a 2026-07-28 message without one, from ``params._meta.traceparent`` (SEP-414). The
backend gets ``traceparent`` naming the attempt's client span, so its own spans join the
same trace, and ``tracestate`` as the client sent it.

Sampling follows the parent: a request whose parent says sampled is traced, one whose
parent says not sampled is not; a request without a parent is traced with the configured
ratio. The spans themselves are built when the exchange is accounted for
(``proxy.net.tracing``), from the ids chosen here and the times noted on the way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import msgspec

if TYPE_CHECKING:
    from proxy.routing import Backend

TRACEPARENT: Final = b"traceparent"
TRACESTATE: Final = b"tracestate"
_HEX = frozenset(b"0123456789abcdef")
_random = random.Random()  # ids and sampling need no secrecy, only uniqueness


@dataclass(slots=True)
class Attempt:
    """One try at a backend: its client span."""

    span_id: int
    backend: Backend
    started: float
    """perf_counter() when the request was sent."""
    ended: float | None = None


@dataclass(slots=True)
class Trace:
    """The trace of one exchange."""

    trace_id: int
    parent_span_id: int
    """The client's span (0: the request named none: the server span is a root)."""
    server_span_id: int
    tracestate: bytes = b""
    attempts: list[Attempt] = field(default_factory=list)
    next_span_id: int = 0
    """The next attempt's span id, where it had to be known before (a message's _meta
    names it); 0: chosen when the attempt starts."""
    session_id: str = ""
    protocol_version: str = ""

    def attempt(self, backend: Backend, now: float) -> bytes:
        """A new attempt's ``traceparent`` for the backend (the one before it ends)."""
        if self.attempts and self.attempts[-1].ended is None:
            self.attempts[-1].ended = now
        span_id = self.next_span_id or _span_id()
        self.next_span_id = 0
        self.attempts.append(Attempt(span_id, backend, now))
        return format_traceparent(self.trace_id, span_id)

    def reserve(self) -> bytes:
        """The next attempt's ``traceparent``, chosen now."""
        self.next_span_id = self.next_span_id or _span_id()
        return format_traceparent(self.trace_id, self.next_span_id)


def parse_traceparent(value: bytes | str) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a ``traceparent`` value; None where it is
    not one (W3C Trace Context §3.2: version 00, or a later version's first fields)."""
    raw = value.encode("latin-1") if isinstance(value, str) else value
    raw = raw.strip(b" \t")
    if len(raw) < 55 or raw[2:3] != b"-" or raw[35:36] != b"-" or raw[52:53] != b"-":
        return None
    version, trace, span, flags = raw[:2], raw[3:35], raw[36:52], raw[53:55]
    if version == b"ff" or (len(raw) > 55 and (version == b"00" or raw[55:56] != b"-")):
        return None  # a later version may add fields after a dash; 00 adds none
    if not set(raw[:55].replace(b"-", b"")) <= _HEX:
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def format_traceparent(trace_id: int, span_id: int) -> bytes:
    return b"00-%032x-%016x-01" % (trace_id, span_id)


def start_trace(
    header: bytes | None, tracestate: bytes | None, meta: str | None, ratio: float
) -> Trace | None:
    """The trace of a request, or None where it is not traced. ``header``: its
    ``traceparent``; ``meta``: ``params._meta.traceparent``; ``ratio``: for roots."""
    parent = parse_traceparent(header) if header is not None else None
    if parent is None and meta is not None:
        parent = parse_traceparent(meta)
        tracestate = None  # the header's state belongs to the header's parent
    if parent is not None:
        trace_id, parent_span, sampled = parent
        if not sampled:
            return None
        return Trace(trace_id, parent_span, _span_id(), tracestate or b"")
    if _random.random() >= ratio:
        return None
    return Trace(_random.getrandbits(128) or 1, 0, _span_id())


def _span_id() -> int:
    return _random.getrandbits(64) or 1


def with_meta_traceparent(body: bytes, traceparent: bytes) -> bytes | None:
    """``body`` (one JSON-RPC message) with ``params._meta.traceparent`` replaced, so a
    backend that reads trace context from the message (the MCP SDK does) joins the
    trace under the proxy's span; None where the body has no such member."""
    try:
        message = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    params = message.get("params") if isinstance(message, dict) else None
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict) or "traceparent" not in meta:
        return None
    meta["traceparent"] = traceparent.decode("ascii")
    return msgspec.json.encode(message)
