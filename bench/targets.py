"""What the benchmarks run against: backends, Switchboard, and HAProxy as the anchor.

- ``responder``: HAProxy answering a fixed JSON-RPC result itself (``http-request
  return``), the small-POST backend; never the bottleneck, and the same for every target.
- ``sdk_backend``: the demo MCP server (official ``mcp`` SDK on hypercorn/trio).
- ``stream_backends``: ``bench.stream_backend`` processes (SSE + WebSocket), one port each.
- ``switchboard``: ``python -m proxy run --config`` with N workers, access log and admin
  off; its process tree (supervisor + workers) is what is measured.
- ``haproxy_proxy``: the anchor, HAProxy as an equivalent plain reverse proxy: ``mode
  http``, keep-alive both sides, ``http-reuse always``, ``option forwardfor`` (Switchboard
  adds X-Forwarded-For too), ``nbthread`` = Switchboard's workers, round-robin backends.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.common import JsonChild, free_port, stop_process, wait_port
from bench.procstat import ProcessTree


@dataclass(frozen=True, slots=True)
class Target:
    """One side of a comparison: where to connect and which processes are the proxy."""

    name: str
    ports: tuple[int, ...]
    """Where clients connect (several for a multi-process backend reached directly)."""
    proxy: ProcessTree | None
    """The proxy's processes, None for the backend reached directly."""
    server: ProcessTree | None = None
    """For a backend: its processes (to see how much CPU it got)."""

    @property
    def port(self) -> int:
        return self.ports[0]


def _haproxy(cfg: Path) -> subprocess.Popen[bytes]:
    with cfg.with_suffix(".log").open("wb") as log:
        return subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=log)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


@contextmanager
def handshake_responder(tmp: Path, result: str) -> Iterator[Target]:
    """HAProxy as a 2025-11-25 MCP backend: ``initialize`` (the proxy's, whose id is
    ``switchboard-initialize``) opens session ``bench-session``, ``notifications/
    initialized`` gets 202, anything else ``result`` (JSON)."""
    port = free_port()
    cfg = tmp / f"handshake-{port}.cfg"
    init = tmp / f"handshake-{port}.init"
    body = tmp / f"handshake-{port}.body"
    init.write_text(
        '{"jsonrpc":"2.0","id":"switchboard-initialize","result":{"protocolVersion":'
        '"2025-11-25","capabilities":{"tools":{}},"serverInfo":{"name":"bench","version":"1"}}}'
    )
    body.write_text(result)
    cfg.write_text(
        "global\n  maxconn 4000\n  nbthread 1\n"
        "defaults\n  mode http\n  timeout client 60s\n  timeout server 60s\n"
        "  timeout connect 5s\n  timeout http-keep-alive 60s\n"
        f"frontend backend\n  bind 127.0.0.1:{port}\n  option http-buffer-request\n"
        f"  http-request return status 200 content-type application/json file {init} "
        "hdr mcp-session-id bench-session if { req.body -m sub switchboard-initialize }\n"
        "  http-request return status 202 if { req.body -m sub notifications/initialized }\n"
        f"  http-request return status 200 content-type application/json file {body}\n"
    )
    process = _haproxy(cfg)
    try:
        wait_port(port)
        yield Target("direct-2025", (port,), None, ProcessTree(process.pid))
    finally:
        stop_process(process)


@contextmanager
def responder(tmp: Path, result: str, content_type: str = "application/json") -> Iterator[Target]:
    """HAProxy answering every request with ``result`` itself (from a file, so that any
    bytes, newlines included, are answered exactly; with a Content-Length)."""
    port = free_port()
    cfg = tmp / f"responder-{port}.cfg"
    body = tmp / f"responder-{port}.body"
    body.write_text(result)
    cfg.write_text(
        "global\n  maxconn 4000\n  nbthread 1\n"
        "defaults\n  mode http\n  timeout client 60s\n  timeout server 60s\n"
        "  timeout connect 5s\n  timeout http-keep-alive 60s\n"
        f"frontend backend\n  bind 127.0.0.1:{port}\n"
        f"  http-request return status 200 content-type {content_type} file {body}\n"
    )
    process = _haproxy(cfg)
    try:
        wait_port(port)
        yield Target("direct", (port,), None, ProcessTree(process.pid))
    finally:
        stop_process(process)


@contextmanager
def sdk_backend() -> Iterator[Target]:
    """The demo MCP server (official SDK, hypercorn on trio), one process."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy.demo", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield Target("direct", (port,), None, ProcessTree(process.pid))
    finally:
        stop_process(process)


class StreamBackends:
    """``count`` stream backend processes, each on its own port (so proxy-to-backend
    connections spread over several 4-tuples' worth of ephemeral ports)."""

    def __init__(self, count: int) -> None:
        self.children: list[JsonChild] = []
        ports = []
        for i in range(count):
            port = free_port()
            ports.append(port)
            self.children.append(
                JsonChild(
                    f"stream-backend-{i}",
                    [sys.executable, "-m", "bench.stream_backend", "--port", str(port)],
                )
            )
        for port in ports:
            wait_port(port)
        self.ports = tuple(ports)

    def target(self) -> Target:
        return Target("direct", self.ports, None)

    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    def broadcast(self, seq: int, timeout: float = 120.0) -> list[dict[str, float]]:
        """Every backend writes event ``seq`` to all its streams; their fan-out reports."""
        ids = [c.send({"cmd": "broadcast", "seq": seq}) for c in self.children]
        return [c.reply(i, timeout) for c, i in zip(self.children, ids, strict=True)]

    def streams(self) -> int:
        return sum(int(c.request({"cmd": "stats"})["streams"]) for c in self.children)

    def stop(self) -> None:
        for child in self.children:
            child.stop()


@contextmanager
def stream_backends(count: int) -> Iterator[StreamBackends]:
    backends = StreamBackends(count)
    try:
        yield backends
    finally:
        backends.stop()


class _Switchboard:
    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.ready = threading.Event()
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if line.get("event") == "ready":
                self.ready.set()
            elif line.get("level") in ("warning", "error") and len(self.lines) < 200:
                self.lines.append(raw.decode(errors="replace").strip())


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


@contextmanager
def switchboard(
    tmp: Path,
    backend_ports: Sequence[int],
    *,
    workers: int,
    max_connections_per_worker: int = 9000,
    route_kind: str = "http",
    name: str = "switchboard",
    tracing: dict[str, object] | None = None,
    route_options: dict[str, object] | None = None,
    session_keys: dict[str, str] | None = None,
) -> Iterator[Target]:
    """Switchboard with ``workers`` workers, one route ``/`` to the backends round-robin
    (``tracing``: its [tracing] section; ``name``: the target's name in results;
    ``route_options``: more keys of the route; ``session_keys``: [mcp] session_keys)."""
    port = free_port()
    route: dict[str, object] = {
        "prefix": "/",
        "backends": [f"http://127.0.0.1:{p}" for p in backend_ports],
    }
    if route_kind != "http":
        route["kind"] = route_kind
    route.update(route_options or {})
    sections: dict[str, dict[str, object]] = {
        "server": {
            "listen": [f"127.0.0.1:{port}"],
            "workers": workers,
            "max_connections_per_worker": max_connections_per_worker,
            # The standby process waits idle, taking no traffic; measured beside the
            # workers it would only add its start-up to the first baseline.
            "standby_worker": False,
        },
        "log": {"access_log": False, "level": "info"},
        "admin": {"listen": ""},
    }
    if tracing is not None:
        sections["tracing"] = tracing
    lines = []
    if session_keys:
        # Before any other table: an inline table keeps the keys' own names.
        keys = ", ".join(f"{kid} = {_toml(secret)}" for kid, secret in session_keys.items())
        lines.append(f"mcp = {{ session_keys = {{ {keys} }} }}")
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml(v)}" for k, v in values.items())
    lines.append("[[routes]]")
    lines.extend(f"{k} = {_toml(v)}" for k, v in route.items())
    cfg = tmp / f"switchboard-{port}.toml"
    cfg.write_text("\n".join(lines) + "\n")
    stderr_path = cfg.with_suffix(".stderr")
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    sb = _Switchboard(process)
    try:
        deadline = time.monotonic() + 60
        while not sb.ready.wait(0.1):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"switchboard did not start ({process.poll()}): {_tail(stderr_path)}"
                )
        wait_port(port)
        yield Target(name, (port,), ProcessTree(process.pid))
    finally:
        stop_process(process, timeout=60)
        if sb.lines:
            print(
                f"switchboard logged {len(sb.lines)} warning/error line(s), first: {sb.lines[0]}",
                file=sys.stderr,
            )


@contextmanager
def haproxy_proxy(
    tmp: Path, backend_ports: Sequence[int], *, threads: int, maxconn: int = 4000
) -> Iterator[Target]:
    """The anchor: HAProxy as a plain HTTP reverse proxy, ``threads`` threads."""
    port = free_port()
    servers = "\n".join(f"  server s{i} 127.0.0.1:{p}" for i, p in enumerate(backend_ports))
    cfg = tmp / f"haproxy-{port}.cfg"
    cfg.write_text(
        f"global\n  nbthread {threads}\n  maxconn {maxconn}\n"
        "defaults\n  mode http\n  option http-keep-alive\n  option forwardfor\n"
        # Send streamed bodies (SSE events) at once: no MSG_MORE, as Switchboard does.
        "  option http-no-delay\n"
        "  http-reuse always\n"
        f"  maxconn {maxconn}\n"
        "  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
        "  timeout tunnel 1h\n  timeout http-keep-alive 60s\n  timeout http-request 10s\n"
        f"frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n"
        f"backend be\n  balance roundrobin\n{servers}\n"
    )
    process = _haproxy(cfg)
    try:
        wait_port(port)
        time.sleep(0.2)
        if process.poll() is not None:
            raise RuntimeError(f"haproxy exited: {_tail(cfg.with_suffix('.log'))}")
        yield Target("haproxy", (port,), ProcessTree(process.pid))
    finally:
        stop_process(process)
