"""A real ``redis-server`` for tests, stoppable and restartable on the same port.

``running_redis(tmp_path)`` starts ``redis-server docs/ops/redis.conf`` (the documented
production file: no persistence, so a restart comes back empty, like a crashed cache)
with only ``--port <free> --bind 127.0.0.1 --dir <tmp> --logfile`` overridden, waits
until it answers PING, and stops it afterwards. ``stop()`` / ``start()`` let an outage test
take it away and bring it back on the same port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.proxy_process import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CONF = Path(__file__).resolve().parents[2] / "docs" / "ops" / "redis.conf"


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "redis.log"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (on the same port as before) and wait until it answers."""
        assert self.process is None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        # ``--bind`` keeps it on loopback; ``--protected-mode no`` is not needed there.
        args = [
            REDIS_SERVER,
            str(REDIS_CONF),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.directory),
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._answers_ping():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not start in time")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait until it is gone."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
