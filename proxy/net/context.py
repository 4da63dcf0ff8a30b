"""What one worker's connections share: config, routes, backend pools, keys, the clock,
and where finished exchanges are counted, logged and audited. This is the ``Env`` the
connection machines (``proxy.protocol.connection``) read.

Accounting is cheap on purpose: counts go to plain dictionaries (``RequestMetrics``),
access lines to a buffer (``AccessLog``); ``flush`` publishes the counts, then writes the
lines, so a request is counted before it is logged. The reactor's owner calls ``flush``
every 250 ms, and it runs by itself when 64 lines are waiting.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from proxy.admission import connection_cap, rate_buckets
from proxy.audit import UsageRecord
from proxy.auth import AuthFailure, Identity, authenticate, check_access
from proxy.config import Config
from proxy.labels import status_label
from proxy.mcp_routing import method_label
from proxy.metrics import LIMIT_BY_STATUS, RequestMetrics, metrics
from proxy.net.session_opener import SessionOpener
from proxy.net.upstream import UpstreamPool
from proxy.oauth import authenticate_oauth
from proxy.observability import AccessLine, AccessLog
from proxy.protocol.era_probe import RouteEras
from proxy.protocol.exchange import Check, Exchange
from proxy.protocol.http1 import ForwardingPolicy
from proxy.protocol.session_token import SessionTokens
from proxy.protocol.upstream_sessions import UpstreamSessions
from proxy.routing import Backend, Route, RouteTable, pick_least_loaded

if TYPE_CHECKING:
    from proxy.net.control_plane import ControlPlane
    from proxy.net.reactor import Reactor
    from proxy.net.tracing import Tracer

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class WorkerContext:
    def __init__(
        self,
        config: Config,
        routes: RouteTable,
        pools: dict[str, UpstreamPool],
        log: Any,
        access_log: AccessLog | None,
        tokens: SessionTokens | None = None,
    ) -> None:
        self.config = config
        self.routes = routes
        self.pools = pools
        """Backend URL -> its pool."""
        self.log = log
        self.access_log = access_log
        self.tokens = tokens
        self.upstream_sessions = UpstreamSessions()
        """Sessions the worker holds with 2025-11-25 backends for 2026-07-28 clients
        (``proxy.protocol.upstream_sessions``)."""
        self.route_eras = RouteEras()
        """What the worker learnt of its ``auto`` routes' eras (``proxy.protocol.era_probe``)."""
        self.session_opener = SessionOpener(
            self.upstream_sessions, config.upstream.response_timeout
        )
        """Signs and checks the MCP session tokens (None when no route is an MCP route)."""
        self.control: ControlPlane | None = None
        """Keys, JWTs, rate limits, caps and audit (set by the worker before it serves)."""
        self.draining = False
        self.via = config.forwarding.via.encode("ascii")
        self.checking = config.auth.required
        """Some request may need an admission check (see ``update_checking``)."""
        self.trace_ratio = config.tracing.sample_ratio
        self.tracer: Tracer | None = None
        """Makes and exports the spans of traced requests (set by the worker)."""
        self.nursery: trio.Nursery = None  # type: ignore[assignment]  # set by the worker
        self.reactor: Reactor | None = None
        """The worker's reactor, once it serves (set by the worker)."""
        self.counts = RequestMetrics()
        self.requests = 0
        self.active_connections = 0
        self.rng = random.Random()
        self.now = time.monotonic
        self._policies: dict[str | None, ForwardingPolicy] = {}
        self._trusted: tuple[IPNetwork, ...] | None = None

    def update_checking(self) -> None:
        """Whether admission may have work: connection caps, rate limits, or auth by
        default (a route with ``auth = "required"`` is checked whatever this says)."""
        control = self.control
        self.checking = self.config.auth.required or (
            control is not None and (control.caps is not None or control.rate_limited)
        )

    # -- what the machines read --------------------------------------------------------------

    def choose_backend(
        self, route: Route, replica: str | None = None, avoid: Backend | None = None
    ) -> Backend | None:
        """The backend for a request: its session's replica if it has one (None if that
        replica is gone or out of rotation), else a usable backend of the route other
        than ``avoid`` (round robin for http routes, power of two choices on in-flight
        requests for mcp)."""
        now = time.monotonic()
        pools = self.pools
        if replica is not None:
            backend = route.replicas.get(replica)
            if backend is None or not pools[backend.url].usable(now):
                return None
            return backend
        if route.kind == "mcp":
            usable = [b for b in route.backends if b is not avoid and pools[b.url].usable(now)]
            if not usable:
                return None
            return pick_least_loaded(usable, lambda b: pools[b.url].in_use, self.rng)
        for _ in range(len(route.backends)):
            backend = route.choose_backend()
            if backend is not avoid and pools[backend.url].usable(now):
                return backend
        return None

    def policy_for(self, route: Route | None) -> ForwardingPolicy:
        mode = route.host_mode if route is not None else None
        policy = self._policies.get(mode)
        if policy is None:
            fwd = self.config.forwarding
            policy = ForwardingPolicy(
                host_mode=mode or fwd.host,
                xff_mode=fwd.x_forwarded_for,
                via=fwd.via.encode("ascii"),
            )
            self._policies[mode] = policy
        return policy

    def is_trusted_proxy(self, ip: str) -> bool:
        """Whether ``ip`` may (and must) send a PROXY protocol header."""
        if self._trusted is None:
            self._trusted = tuple(
                ipaddress.ip_network(cidr, strict=False)
                for cidr in self.config.proxy_protocol.trusted_networks
            )
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def auth_required(self, route: Route) -> bool:
        return route.auth == "required" or (route.auth == "default" and self.config.auth.required)

    def authenticate(
        self, headers: Sequence[tuple[bytes, bytes]], route: Route
    ) -> Identity | AuthFailure:
        control = self.control
        assert control is not None  # routes with auth need the control plane
        if route.oauth is not None:
            result = authenticate_oauth(headers, control.jwt, route.oauth, now=time.time())
        else:
            result = authenticate(
                list(headers),
                control.keys,
                control.jwt,
                now=time.time(),
                header_name=control.auth_header,
            )
        if isinstance(result, Identity):
            result = check_access(result, route.tenants) or result
        if isinstance(result, AuthFailure):
            label = status_label(result.status)
            self.counts.auth_failures[label] = self.counts.auth_failures.get(label, 0) + 1
        return result

    def auth_header(self) -> bytes:
        control = self.control
        return control.auth_header if control is not None else b"authorization"

    def rate_check(self, peer_ip: str, identity: Identity | None, tool: str | None) -> Check | None:
        control = self.control
        if control is None or not control.rate_limited:
            return None
        buckets = rate_buckets(control.config.rate_limits, peer_ip, identity, tool)
        return Check(Check.RATE, buckets) if buckets else None

    def cap_check(self, scope: str, identity: Identity | None) -> Check | None:
        control = self.control
        if control is None or control.caps is None:
            return None
        if identity is None:
            limit = self.config.rate_limits.max_connections_per_ip
        else:
            limit = connection_cap(control.config.rate_limits, identity)
        return Check(Check.CAP, (scope, limit)) if limit > 0 else None

    # -- accounting ---------------------------------------------------------------------------

    def account(self, x: Exchange, peer: tuple[str, int], *, refused_early: bool = False) -> None:
        """Metrics, the access line and the usage record of a finished exchange."""
        self.requests += 1
        route = x.route
        prefix = route.prefix if route is not None else "none"
        elapsed = 0.0 if refused_early else time.perf_counter() - x.started
        latency = None if x.streamed else elapsed
        code = x.status
        status = status_label(code)
        counts = self.counts
        counts.count_request(prefix, status, latency, x.bytes_in, x.bytes_out)
        if x.refused and code in LIMIT_BY_STATUS:
            limit = LIMIT_BY_STATUS[code]
            counts.refusals[limit] = counts.refusals.get(limit, 0) + 1
        decision = x.mcp
        if decision is not None:
            counts.count_mcp(prefix, method_label(decision, x.method), status, latency)
            if decision.translated_to is not None:
                key = (prefix, decision.era.value, decision.translated_to)
                counts.mcp_translated[key] = counts.mcp_translated.get(key, 0) + 1
        log = self.access_log
        if log is not None:
            if refused_early:
                method = path = None
            else:
                method = x.method.decode("ascii", "replace")
                target = x.target
                query_at = target.find(b"?")
                path = (target if query_at < 0 else target[:query_at]).decode("ascii", "replace")
            line = AccessLine(
                event="access",
                level="info",
                ts="",
                client=peer[0],
                port=peer[1],
                method=method,
                path=path,
                status=x.status,
                route=route.prefix if route is not None else None,
                upstream=x.backend.url if x.backend is not None else None,
                bytes_in=x.bytes_in,
                bytes_out=x.bytes_out,
                duration_ms=round(elapsed * 1000, 3),
                error=x.error,
            )
            if decision is not None:
                line.mcp_era = decision.era.value
                line.mcp_method = decision.method
                line.mcp_name = decision.name
                line.replica = x.backend.replica if x.backend is not None else None
                if route is not None and route.backend_era != "any":
                    line.mcp_backend_era = decision.backend_era or route.backend_era
                    line.mcp_translated = decision.translated_to is not None
            log.add(line)
            if log.full:
                self.flush()
        control = self.control
        if route is not None and control is not None and control.audit is not None:
            control.audit.record(usage_record(x, elapsed))
        trace = x.trace
        if trace is not None and self.tracer is not None:
            self.tracer.record(x, trace, peer[0])

    def flush(self) -> None:
        """Publish the counts, then write the access lines they cover."""
        self.counts.publish(metrics())
        if self.access_log is not None:
            self.access_log.flush()

    def count_kind(self, old: str, new: str) -> None:
        active = self.counts.active
        active[old] -= 1
        active[new] += 1

    def connection_opened(self) -> None:
        self.active_connections += 1
        self.counts.connections += 1
        self.counts.active["http"] += 1

    def connection_closed(self) -> None:
        self.active_connections -= 1
        self.counts.active["http"] -= 1

    def overloaded(self, address: tuple[str, int]) -> None:
        """A connection closed unanswered in an overload flood."""
        self.counts.refusals["capacity"] = self.counts.refusals.get("capacity", 0) + 1

    def proxy_header_refused(self, peer: tuple[str, int], reason: str) -> None:
        metrics().refusals.labels("proxy_protocol").inc()
        self.log.warning("proxy_header_refused", client=peer[0], port=peer[1], reason=reason)

    def tool_denied(self) -> None:
        failures = self.counts.auth_failures
        failures["tool"] = failures.get("tool", 0) + 1

    def backend_outcome(self, pool: UpstreamPool, ok: bool) -> None:
        """Passive health: an exchange with this backend succeeded or failed."""
        if pool.health.record(ok, time.monotonic()):
            m = metrics()
            m.ejections.labels(pool.backend.url).inc()
            m.backend_up.labels(pool.backend.url).set(0)

    def upstream_failure(self, pool: UpstreamPool, reason: str) -> None:
        key = (pool.backend.url, reason)
        failures = self.counts.upstream_failures
        failures[key] = failures.get(key, 0) + 1

    def report_pools(self) -> None:
        family = metrics().upstream_connections
        for pool in self.pools.values():
            pool.write_gauges(family)


def usage_record(x: Exchange, elapsed: float) -> UsageRecord:
    """What the audit trail keeps of an exchange."""
    identity = x.identity
    decision = x.mcp
    method = decision.method if decision is not None and decision.method else None
    return UsageRecord(
        ts=time.time(),
        key_id=identity.key_id if identity is not None else None,
        tenant_id=identity.tenant_id if identity is not None else None,
        route=x.route.prefix if x.route is not None else "",
        method=method or x.method.decode("ascii", "replace"),
        tool=decision.name if decision is not None and method == "tools/call" else None,
        status=x.status,
        bytes_in=x.bytes_in,
        bytes_out=x.bytes_out,
        duration_ms=round(elapsed * 1000, 3),
    )
