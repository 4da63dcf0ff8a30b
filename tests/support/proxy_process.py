"""Run the real ``switchboard`` command (supervisor + workers) for a test.

The proxy is started as a subprocess with a TOML config written to a temp dir; its JSON
log lines are collected by a reader thread so tests can assert on access-log lines.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, and one this test process has not handed out
    before: the kernel may offer the same free port twice in a row, and two services of
    one test (a proxy and its admin listener, say) must not both get it."""
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something now accepts connections on ``port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    return repr(value)


def render_toml(sections: Mapping[str, Mapping[str, Any]], routes: list[Mapping[str, Any]]) -> str:
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    for route in routes:
        lines.append("[[routes]]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in route.items())
        lines.append("")
    return "\n".join(lines)


class ProxyProcess:
    def __init__(self, process: subprocess.Popen[bytes], port: int, admin: str = "") -> None:
        self.process = process
        self.port = port
        self.admin_url = f"http://{admin}" if admin else ""
        self.lines: list[dict[str, Any]] = []
        self.stderr = b""
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            self.lines.append(line)
            if line.get("event") == "ready" and line.get("role") == "supervisor":
                self._ready.set()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.process.poll() is not None:
                err = self.process.stderr.read() if self.process.stderr else b""
                raise RuntimeError(f"proxy exited with {self.process.returncode}: {err!r}")
            if time.monotonic() > deadline:
                errors = [line for line in self.lines if line.get("level") == "error"]
                raise TimeoutError(
                    f"proxy did not become ready; errors: {errors[-4:]}; last: {self.lines[-4:]}"
                )

    def access_lines(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == "access"]

    def wait_for_line(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if predicate(line):
                    return line
            time.sleep(0.02)
        raise TimeoutError("no matching log line")

    def worker_pids(self) -> list[int]:
        """The worker processes: ``proxy.worker`` children, without the standby (started
        with ``--standby``) until the supervisor reports it took a worker's slot."""
        started = {
            line.get("pid") for line in list(self.lines) if line.get("event") == "worker_started"
        }
        pids = []
        for child in psutil.Process(self.process.pid).children():
            try:
                cmdline = child.cmdline()
            except psutil.NoSuchProcess:  # includes ZombieProcess: died, not yet reaped
                continue
            if "proxy.worker" not in cmdline:
                continue
            if "--standby" in cmdline and child.pid not in started:
                continue
            pids.append(child.pid)
        return sorted(pids)

    def standby_pid(self) -> int | None:
        """The standby waiting to take a dead worker's slot, once the supervisor reports
        it ready."""
        lines = list(self.lines)
        started = {line.get("pid") for line in lines if line.get("event") == "worker_started"}
        waiting = [
            line["pid"]
            for line in lines
            if line.get("event") == "standby_ready" and line["pid"] not in started
        ]
        for pid in reversed(waiting):
            if psutil.pid_exists(pid):
                return int(pid)
        return None

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)
        return self.process.returncode


@contextmanager
def run_proxy(
    tmp_path: Path,
    routes: list[Mapping[str, Any]],
    *,
    workers: int = 2,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[ProxyProcess]:
    """Start ``switchboard run --config`` on a free port; stop it afterwards."""
    port = free_port()
    merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (sections or {}).items()}
    server = merged.setdefault("server", {})
    listen = server.setdefault("listen", [f"127.0.0.1:{port}"])
    port = int(listen[0].rsplit(":", 1)[1])  # a test may choose the address itself
    server.setdefault("workers", workers)
    admin = merged.setdefault("admin", {})
    admin.setdefault("listen", f"127.0.0.1:{free_port()}")
    config = tmp_path / f"switchboard-{port}.toml"
    config.write_text(render_toml(merged, routes))
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    proxy = ProxyProcess(process, port, admin["listen"])
    try:
        proxy.wait_ready()
        yield proxy
    finally:
        proxy.stop()
