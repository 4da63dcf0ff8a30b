"""Small helpers shared by the benchmark modules: ports, progress lines, statistics,
JSON-line child processes, the machine description."""

from __future__ import annotations

import json
import os
import platform
import queue
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

JSON = dict[str, Any]
REPO = Path(__file__).resolve().parents[1]
_T0 = time.monotonic()


def progress(message: str) -> None:
    """One progress line on stderr, prefixed with the seconds since the run started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def median(values: Iterable[float]) -> float:
    data = [v for v in values if v == v]  # drop NaN
    return statistics.median(data) if data else float("nan")


def ratio(numerator: float, denominator: float) -> float:
    if denominator == 0 or denominator != denominator or numerator != numerator:
        return float("nan")
    return numerator / denominator


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine() -> JSON:
    """What the numbers were measured on."""
    mem_gib = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def tool_version(cmd: Sequence[str]) -> str:
        if shutil.which(cmd[0]) is None:
            return "missing"
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        text = (out.stdout or out.stderr).strip().splitlines()
        return text[0] if text else ""

    free = subprocess.run(["free", "-g"], capture_output=True, text=True, check=False).stdout
    return {
        "nproc": os.cpu_count(),
        "free_g": free.rstrip(),
        "cpu_model": cpu_model,
        "mem_total_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "haproxy": tool_version(["haproxy", "-v"]),
        "wrk": tool_version(["wrk", "-v"]).split(" Copyright")[0],
        "shared": True,
    }


def revision() -> JSON:
    """Which code was measured: the commit, and the files changed since (read-only git)."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
            )
        except OSError:
            return ""
        return out.stdout.rstrip()

    # A tree copied to another machine (its .git missing or stale) is named by
    # BENCH_COMMIT, set by whoever copied it there.
    named = os.environ.get("BENCH_COMMIT")
    if named:
        return {"commit": named, "proxy_changes": []}
    changed = [line[3:] for line in git("status", "--porcelain", "--", "proxy").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "proxy_changes": changed}


class JsonChild:
    """A subprocess speaking JSON lines: commands on stdin, messages on stdout.

    A reader thread parses stdout; messages carrying an ``id`` answer a ``request``, the
    latest ``progress`` message is kept, every other message is queued for ``expect``.
    """

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None):
        self.name = name
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        self.latest_progress: JSON = {}
        self._replies: dict[int, JSON] = {}
        self._events: queue.Queue[JSON] = queue.Queue()
        self._cond = threading.Condition()
        self._next_id = 0
        self._thread = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        stdout: IO[str] | None = self.process.stdout
        assert stdout is not None
        for line in stdout:
            try:
                msg: JSON = json.loads(line)
            except ValueError:
                continue
            if msg.get("type") == "progress":
                self.latest_progress = msg
            elif "id" in msg:
                with self._cond:
                    self._replies[int(msg["id"])] = msg
                    self._cond.notify_all()
            else:
                self._events.put(msg)
        self._events.put({"type": "eof"})
        with self._cond:
            self._cond.notify_all()

    def send(self, cmd: JSON) -> int:
        """Send a command; returns its id (answers carry it)."""
        with self._cond:
            self._next_id += 1
            ident = self._next_id
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(json.dumps({**cmd, "id": ident}) + "\n")
        stdin.flush()
        return ident

    def reply(self, ident: int, timeout: float = 60.0) -> JSON:
        deadline = time.monotonic() + timeout
        with self._cond:
            while ident not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise TimeoutError(f"{self.name}: no answer to command {ident}")
                self._cond.wait(min(left, 0.2))
            return self._replies.pop(ident)

    def request(self, cmd: JSON, timeout: float = 60.0) -> JSON:
        return self.reply(self.send(cmd), timeout)

    def expect(self, kind: str, timeout: float = 600.0) -> JSON:
        """The next unsolicited message of type ``kind`` (others are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {kind!r} message")
            try:
                msg = self._events.get(timeout=left)
            except queue.Empty:
                continue
            if msg.get("type") == kind:
                return msg
            if msg.get("type") == "eof":
                raise RuntimeError(f"{self.name} exited ({self.process.poll()}) before {kind!r}")

    def poll_event(self, kind: str) -> JSON | None:
        """A queued message of type ``kind`` if one has arrived (others are dropped)."""
        while True:
            try:
                msg = self._events.get_nowait()
            except queue.Empty:
                return None
            if msg.get("type") == kind:
                return msg

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            try:
                stdin = self.process.stdin
                if stdin is not None:
                    stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._thread.join(timeout=5)


def stop_process(process: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()
