"""A real HAProxy (``/usr/sbin/haproxy``) in front of Switchboard, for tests.

``run_haproxy`` writes a config into the test's temp dir, runs ``haproxy -f CFG -db``
(foreground, no daemon) as a subprocess listening on a free loopback port, waits until
that port accepts connections, and stops it afterwards. One frontend, one backend with
one server (Switchboard); the server line sends the PROXY protocol (``send-proxy-v2`` or
``send-proxy``) on both traffic and health checks, from ``source`` (127.0.0.1 by
default). ``option httpchk`` health checks run every ``check_interval`` seconds.

A stats socket (``stats socket`` in ``global``) lets a test read the server's state as
HAProxy sees it: ``server_stat()`` answers the ``show stat`` CSV row of the server.
``haproxy_running`` is the async form for trio tests, whose backends must keep serving
(HAProxy's health checks reach them through Switchboard) while HAProxy starts and stops.
"""

from __future__ import annotations

import csv
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from tests.support.proxy_process import free_port
from tests.support.threads import entered_in_thread

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
BACKEND = "switchboard_be"
SERVER = "sb"
SendProxy = Literal["send-proxy-v2", "send-proxy"]


def haproxy_config(
    *,
    listen_port: int,
    server_port: int,
    stats_socket: Path,
    send_proxy: SendProxy,
    check_path: str,
    check_interval: float,
    source: str,
) -> str:
    # ``check-send-proxy`` makes the checks carry the PROXY header even if a later edit
    # adds ``port``/``addr`` to the server line (which would otherwise turn it off).
    interval_ms = max(1, round(check_interval * 1000))
    return "\n".join(
        [
            "global",
            "    maxconn 256",
            f"    stats socket {stats_socket} mode 600 level admin",
            "",
            "defaults",
            "    mode http",
            "    timeout connect 2s",
            "    timeout client 10s",
            "    timeout server 10s",
            "    timeout check 2s",
            "",
            "frontend fe",
            f"    bind 127.0.0.1:{listen_port}",
            f"    default_backend {BACKEND}",
            "",
            f"backend {BACKEND}",
            f"    option httpchk GET {check_path}",
            f"    server {SERVER} 127.0.0.1:{server_port} source {source} {send_proxy}"
            f" check check-send-proxy inter {interval_ms} rise 1 fall 1",
            "",
        ]
    )


@dataclass(eq=False)
class HAProxyProcess:
    process: subprocess.Popen[bytes]
    port: int
    stats_socket: Path
    log_path: Path
    config_path: Path

    @property
    def log(self) -> str:
        """HAProxy's own messages (stdout and stderr): state changes, alerts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def command(self, line: str, timeout: float = 5.0) -> str:
        """One command on the stats socket; its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode("ascii") + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def server_stat(self) -> dict[str, str]:
        """The ``show stat`` CSV row of the Switchboard server (``status``, ``check_status``,
        ``chkfail``, ``stot``...)."""
        text = self.command("show stat").lstrip("# ")
        for row in csv.DictReader(line for line in text.splitlines() if line):
            if row["pxname"] == BACKEND and row["svname"] == SERVER:
                return {key: value or "" for key, value in row.items() if key}
        raise AssertionError(f"no {BACKEND}/{SERVER} row in show stat:\n{text}")

    def wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.process.returncode}:\n{self.log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"haproxy did not listen on {self.port}:\n{self.log}"
                    ) from exc
                time.sleep(0.02)
                continue
            if self.stats_socket.exists():
                return

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # -db: immediate stop
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextmanager
def run_haproxy_config(
    tmp_path: Path, render: Callable[[int, Path], str], name: str = "haproxy"
) -> Iterator[HAProxyProcess]:
    """Start HAProxy with the config ``render(listen_port, stats_socket)`` returns, on a
    free port in its own directory; stop it afterwards."""
    port = free_port()
    directory = tmp_path / f"{name}-{port}"
    directory.mkdir()
    stats_socket = directory / "stats.sock"
    config_path = directory / "haproxy.cfg"
    config_path.write_text(render(port, stats_socket))
    log_path = directory / "haproxy.log"
    log_file: IO[bytes] = log_path.open("wb")
    try:
        process = subprocess.Popen(
            [HAPROXY, "-f", str(config_path), "-db"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        haproxy = HAProxyProcess(process, port, stats_socket, log_path, config_path)
        try:
            haproxy.wait_listening()
            yield haproxy
        finally:
            haproxy.stop()
    finally:
        log_file.close()


def run_haproxy(
    tmp_path: Path,
    server_port: int,
    *,
    send_proxy: SendProxy = "send-proxy-v2",
    check_path: str = "/healthz",
    check_interval: float = 0.2,
    source: str = "127.0.0.1",
) -> AbstractContextManager[HAProxyProcess]:
    """Start HAProxy in front of ``127.0.0.1:server_port``; stop it afterwards."""

    def render(port: int, stats_socket: Path) -> str:
        return haproxy_config(
            listen_port=port,
            server_port=server_port,
            stats_socket=stats_socket,
            send_proxy=send_proxy,
            check_path=check_path,
            check_interval=check_interval,
            source=source,
        )

    return run_haproxy_config(tmp_path, render)


@asynccontextmanager
async def haproxy_running(
    tmp_path: Path,
    server_port: int,
    *,
    send_proxy: SendProxy = "send-proxy-v2",
    check_path: str = "/healthz",
    check_interval: float = 0.2,
    source: str = "127.0.0.1",
) -> AsyncIterator[HAProxyProcess]:
    """``run_haproxy`` with its blocking start and stop in a thread."""
    manager = run_haproxy(
        tmp_path,
        server_port,
        send_proxy=send_proxy,
        check_path=check_path,
        check_interval=check_interval,
        source=source,
    )
    async with entered_in_thread(manager) as haproxy:
        yield haproxy
