"""Pure routing decisions: (request path, route table) -> route, backend, upstream target.

No I/O and no trio: the table is built once from the config snapshot and consulted per
request. Longest prefix wins; a prefix matches on a path-segment boundary, so ``/api``
matches ``/api`` and ``/api/x`` but not ``/apix``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from proxy.config import HealthCheckConfig, RouteConfig, UpstreamConfig, parse_backend_url
from proxy.oauth import OAuthResource, metadata_documents


def replica_id(url: str) -> str:
    """A short, stable, opaque id for a backend URL, carried in MCP session tokens
    (signed, not encrypted: clients can read it, so it must not reveal addresses)."""
    return hashlib.sha256(url.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Backend:
    url: str
    host: str
    port: int
    base_path: bytes
    authority: bytes
    """host[:port] as sent in Host when the route rewrites it."""
    replica: str = ""
    """``replica_id(url)``, worked out once per backend rather than per request."""

    @classmethod
    def from_url(cls, url: str) -> Backend:
        host, port, path = parse_backend_url(url)
        shown = f"[{host}]" if ":" in host else host
        authority = shown if port == 80 else f"{shown}:{port}"
        return cls(
            url, host, port, path.encode("ascii"), authority.encode("ascii"), replica_id(url)
        )


@dataclass(slots=True)
class BackendHealth:
    """Whether a backend may get new work: passive ejection after consecutive failures
    (connect errors, 5xx) for a while, and active probes with rise/fall thresholds."""

    eject_after: int = 3
    eject_seconds: float = 10.0
    rise: int = 2
    fall: int = 2
    failures: int = 0
    ejected_until: float = 0.0
    probe_down: bool = False
    _streak: int = 0

    def usable(self, now: float) -> bool:
        return not self.probe_down and now >= self.ejected_until

    def record(self, ok: bool, now: float) -> bool:
        """An exchange's outcome; True when this failure ejected the backend."""
        if ok:
            self.failures = 0
            return False
        self.failures += 1
        if self.eject_after and self.failures >= self.eject_after:
            self.failures = 0
            self.ejected_until = now + self.eject_seconds
            return True
        return False

    def probe(self, ok: bool) -> bool:
        """An active check's outcome; True when it changed the probe state."""
        if ok == (not self.probe_down):
            self._streak = 0
            return False
        self._streak += 1
        if self._streak >= (self.rise if self.probe_down else self.fall):
            self.probe_down = not ok
            self._streak = 0
            if ok:
                self.ejected_until = 0.0  # a passing probe also ends a passive ejection
            return True
        return False


def pick_least_loaded(
    candidates: Sequence[Backend], load: Callable[[Backend], int], rng: random.Random
) -> Backend:
    """Power of two choices: two random candidates, the less loaded wins. Nearly as
    good as least-loaded over all, without herding every worker onto the same one."""
    if len(candidates) == 1:
        return candidates[0]
    first, second = rng.sample(candidates, 2)
    return first if load(first) <= load(second) else second


@dataclass(slots=True)
class Route:
    prefix: str
    backends: tuple[Backend, ...]
    host_mode: Literal["preserve", "rewrite"] | None
    strip_prefix: bool
    kind: Literal["http", "mcp"] = "http"
    allowed_origins: frozenset[bytes] = frozenset()
    keepalive_interval: float = 0.0
    health: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    eject_after: int = 3
    eject_seconds: float = 10.0
    replicas: dict[str, Backend] = field(default_factory=dict)
    """Replica id (mcp_routing.replica_id) -> backend, for session affinity."""
    auth: Literal["default", "none", "required"] = "default"
    tenants: frozenset[str] | None = None
    """Tenants allowed on the route (None: any)."""
    forward_credentials: bool = False
    response_timeout: float = 60.0
    """Seconds to wait for a response head: the route's own, or its kind's default
    (``upstream.response_timeout``, ``upstream.mcp_response_timeout``)."""
    oauth: OAuthResource | None = None
    """The OAuth protected resource the route is (``proxy.oauth``), if it is one."""
    backend_era: str = "any"
    """The MCP revision the backends speak ("any", "2025-11-25", "2026-07-28")."""
    _next: int = field(default=0, repr=False)

    def choose_backend(self) -> Backend:
        """Round-robin over the route's backends."""
        backends = self.backends
        if len(backends) == 1:
            return backends[0]
        index = self._next
        self._next = (index + 1) % len(backends)
        return backends[index]

    def upstream_target(self, backend: Backend, target: bytes) -> bytes:
        """The origin-form target sent to ``backend`` for a client ``target``."""
        if self.strip_prefix and self.prefix != "/":
            rest = target[len(self.prefix.rstrip("/")) :]
            if not rest.startswith(b"/"):
                rest = b"/" + rest
            target = rest
        if backend.base_path:
            return backend.base_path + target
        return target


def _matches(prefix: str, path: str) -> bool:
    if not path.startswith(prefix):
        return False
    if prefix.endswith("/") or len(path) == len(prefix):
        return True
    return path[len(prefix)] == "/"


class RouteTable:
    """Routes sorted longest prefix first."""

    __slots__ = ("_routes", "documents")

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = tuple(sorted(routes, key=lambda r: len(r.prefix), reverse=True))
        self.documents = metadata_documents([r.oauth for r in self._routes if r.oauth])
        """Path -> the OAuth protected-resource metadata the proxy answers there."""

    @classmethod
    def from_config(
        cls, routes: Sequence[RouteConfig], upstream: UpstreamConfig | None = None
    ) -> RouteTable:
        upstream = upstream or UpstreamConfig()
        built = []
        for r in routes:
            default_timeout = (
                upstream.mcp_response_timeout if r.kind == "mcp" else upstream.response_timeout
            )
            backends = tuple(Backend.from_url(u) for u in r.backends)
            built.append(
                Route(
                    prefix=r.prefix,
                    backends=backends,
                    host_mode=r.host,
                    strip_prefix=r.strip_prefix,
                    kind=r.kind,
                    allowed_origins=frozenset(o.encode("latin-1") for o in r.origins),
                    keepalive_interval=r.keepalive_interval,
                    health=r.health,
                    eject_after=r.eject_after,
                    eject_seconds=r.eject_seconds,
                    replicas={b.replica: b for b in backends},
                    auth="required" if r.oauth.resource else r.auth,
                    tenants=frozenset(r.tenants) if r.tenants else None,
                    forward_credentials=r.forward_credentials,
                    response_timeout=r.response_timeout or default_timeout,
                    oauth=OAuthResource.from_config(r.oauth) if r.oauth.resource else None,
                    backend_era=r.backend_era,
                )
            )
        return cls(built)

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._routes

    def match(self, path: str) -> Route | None:
        for route in self._routes:
            if _matches(route.prefix, path):
                return route
        return None

    def backends(self) -> set[Backend]:
        return {b for r in self._routes for b in r.backends}
