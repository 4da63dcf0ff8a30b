"""What one worker's connections share: config, routes, pools, statistics, loggers."""

from __future__ import annotations

import ipaddress
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from proxy.config import Config
from proxy.net.errors import StreamParked
from proxy.net.park import ParkedStream, StreamPark, Wake
from proxy.net.upstream import UpstreamPool
from proxy.observability import WorkerStats
from proxy.protocol.http1 import ForwardingPolicy
from proxy.protocol.session_token import SessionTokens
from proxy.routing import Backend, Route, RouteTable, pick_least_loaded

if TYPE_CHECKING:
    from proxy.net.control_plane import ControlPlane

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True, eq=False)
class WorkerContext:
    config: Config
    routes: RouteTable
    pools: dict[Backend, UpstreamPool]
    log: Any
    access_log: Any | None
    stats: WorkerStats = field(default_factory=WorkerStats)
    draining: bool = False
    idle_scopes: set[trio.CancelScope] = field(default_factory=set)
    """Cancel scopes of connections waiting for a request; cancelled on drain."""
    stream_scopes: set[trio.CancelScope] = field(default_factory=set)
    """Cancel scopes of SSE streams waiting for the backend; cancelled on drain so the
    stream can be ended at its next event boundary."""
    park: StreamPark = field(default_factory=StreamPark)
    """Where SSE streams wait for either of their sockets (proxy.net.park)."""
    tokens: SessionTokens | None = None
    """Signs and checks the MCP session tokens (None when no route is an MCP route)."""
    rng: random.Random = field(default_factory=random.Random)
    control: ControlPlane | None = None
    """Keys, JWTs, rate limits, caps and audit (set by the worker before it serves)."""
    _policies: dict[str | None, ForwardingPolicy] = field(default_factory=dict)
    _trusted: tuple[IPNetwork, ...] | None = None

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

    def choose_backend(self, route: Route, replica: str | None = None) -> Backend | None:
        """The backend for a request: its session's replica if it has one (None if that
        replica is gone or out of rotation), else a usable backend of the route (round
        robin for http routes, power of two choices on in-flight requests for mcp)."""
        now = time.monotonic()
        pools = self.pools
        if replica is not None:
            backend = route.replicas.get(replica)
            if backend is None or not pools[backend].usable(now):
                return None
            return backend
        if route.kind == "mcp":
            usable = [b for b in route.backends if pools[b].usable(now)]
            if not usable:
                return None
            return pick_least_loaded(usable, lambda b: pools[b].in_use, self.rng)
        for _ in range(len(route.backends)):
            backend = route.choose_backend()
            if pools[backend].usable(now):
                return backend
        return None

    async def idle_wait(
        self, member: ParkedStream, deadline: float, wake: Wake, *, parkable: bool
    ) -> bool:
        """Wait until ``member`` is ready for what it is interested in (True), or until
        ``deadline`` or a drain (False). Where the stream may be parked, it is: this
        raises StreamParked and ``wake`` carries the stream on in a new task."""
        if member.ready & member.interest:
            await trio.lowlevel.checkpoint()
            return True
        if parkable and self.park.can_park() and not self.draining:
            self.park.park(member, deadline, wake)
            raise StreamParked
        wait = trio.CancelScope(deadline=deadline)
        if not self.draining:
            self.stream_scopes.add(wait)  # a drain interrupts the wait
        try:
            with wait:
                await self.park.wait(member)
        finally:
            self.stream_scopes.discard(wait)
        return not wait.cancelled_caught

    def start_drain(self) -> None:
        self.draining = True
        for scope in [*self.idle_scopes, *self.stream_scopes]:
            scope.cancel()
        self.park.wake_all()  # parked streams too decide, in a task, how to end
