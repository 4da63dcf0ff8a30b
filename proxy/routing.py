"""Pure routing decisions: (request path, route table) -> route, backend, upstream target.

No I/O and no trio: the table is built once from the config snapshot and consulted per
request. Longest prefix wins; a prefix matches on a path-segment boundary, so ``/api``
matches ``/api`` and ``/api/x`` but not ``/apix``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from proxy.config import RouteConfig, parse_backend_url


@dataclass(frozen=True, slots=True)
class Backend:
    url: str
    host: str
    port: int
    base_path: bytes
    authority: bytes
    """host[:port] as sent in Host when the route rewrites it."""

    @classmethod
    def from_url(cls, url: str) -> Backend:
        host, port, path = parse_backend_url(url)
        shown = f"[{host}]" if ":" in host else host
        authority = shown if port == 80 else f"{shown}:{port}"
        return cls(url, host, port, path.encode("ascii"), authority.encode("ascii"))


@dataclass(slots=True)
class Route:
    prefix: str
    backends: tuple[Backend, ...]
    host_mode: Literal["preserve", "rewrite"] | None
    strip_prefix: bool
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

    __slots__ = ("_routes",)

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = tuple(sorted(routes, key=lambda r: len(r.prefix), reverse=True))

    @classmethod
    def from_config(cls, routes: Sequence[RouteConfig]) -> RouteTable:
        return cls(
            [
                Route(
                    prefix=r.prefix,
                    backends=tuple(Backend.from_url(u) for u in r.backends),
                    host_mode=r.host,
                    strip_prefix=r.strip_prefix,
                )
                for r in routes
            ]
        )

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
