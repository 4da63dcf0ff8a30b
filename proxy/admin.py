"""The admin endpoints, served by the supervisor on their own port (hypercorn on Trio).

- ``GET /health``: liveness; 200 while the supervisor's loop runs.
- ``GET /ready``: readiness; 503 while starting, reloading, draining, or when the control
  plane reports itself degraded past its grace period; else 200. HAProxy's
  ``option httpchk GET /ready`` uses it.
- ``GET /metrics``: Prometheus text format, aggregated across all workers
  (``proxy.metrics``).
- ``GET /services``: routes, their backends and the configured limits, as JSON.

A deliberately tiny ASGI app: four fixed routes do not need a framework.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from proxy.config import Config, parse_hostport
from proxy.metrics import render

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass(slots=True, eq=False)
class AdminState:
    config: Config
    ready: bool = False
    reloading: bool = False
    draining: bool = False
    degraded_reason: str | None = None
    """Set by the control plane when it is degraded past its grace period."""

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.ready:
            return False, "starting"
        if self.reloading:
            return False, "reloading"
        if self.degraded_reason:
            return False, f"degraded: {self.degraded_reason}"
        return True, "ready"


def services(config: Config) -> dict[str, Any]:
    return {
        "routes": [
            {
                "prefix": route.prefix,
                "backends": [{"url": url} for url in route.backends],
                "host": route.host or config.forwarding.host,
                "strip_prefix": route.strip_prefix,
            }
            for route in config.routes
        ],
        "listen": list(config.server.listen),
        "workers": config.server.workers,
    }


def build_app(
    state: AdminState, metrics_dir: str
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def respond(send: Send, status: int, body: bytes, content_type: str) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            await respond(send, 405, b"method not allowed\n", "text/plain")
        elif path == "/health":
            await respond(send, 200, b"ok\n", "text/plain")
        elif path == "/ready":
            ok, reason = state.readiness()
            await respond(send, 200 if ok else 503, reason.encode() + b"\n", "text/plain")
        elif path == "/metrics":
            body, content_type = render(metrics_dir)
            await respond(send, 200, body, content_type)
        elif path == "/services":
            await respond(
                send, 200, msgspec.json.encode(services(state.config)), "application/json"
            )
        else:
            await respond(send, 404, b"not found\n", "text/plain")

    return app


async def serve_admin(
    state: AdminState,
    metrics_dir: str,
    sock: socket.socket | None = None,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoints on ``sock`` (bound by the caller, which hands it over:
    hypercorn closes it), else on admin.listen."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve

    hc = HypercornConfig()
    if sock is not None:
        hc.bind = [f"fd://{sock.detach()}"]
    else:
        host, port = parse_hostport(state.config.admin.listen)
        hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.accesslog = None
    hc.errorlog = None
    hc.graceful_timeout = 1.0
    app: Any = build_app(state, metrics_dir)
    await serve(app, hc, task_status=task_status)
