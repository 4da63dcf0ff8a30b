"""The reference "everything" MCP server (npm ``@modelcontextprotocol/server-everything``,
TypeScript SDK 1.x), for tests that need a backend the Python SDK is not: it still takes
2025-03-26 JSON-RPC batches.

``make test`` installs it (``npm ci`` in tests/support/node, from package-lock.json).
``running_everything(tmp_path)`` starts ``node dist/index.js streamableHttp`` on a free
loopback port (``PORT``), waits until it accepts connections, and stops it afterwards.
Its Streamable HTTP endpoint is ``/mcp``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.proxy_process import accepts, free_port

NODE_DIR = Path(__file__).resolve().parent / "node"
ENTRY = NODE_DIR / "node_modules/@modelcontextprotocol/server-everything/dist/index.js"


class EverythingServer:
    def __init__(self, port: int, process: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.process = process

    @property
    def url(self) -> str:
        """The base URL (what a proxy route lists)."""
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def running_everything(directory: Path, timeout: float = 30.0) -> Iterator[EverythingServer]:
    node = shutil.which("node")
    if node is None or not ENTRY.exists():
        raise RuntimeError(
            "the everything server is not installed: `make test` installs it "
            "(npm ci in tests/support/node)"
        )
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    log = (directory / "everything.log").open("wb")
    process = subprocess.Popen(
        [node, str(ENTRY), "streamableHttp"],
        env={"PATH": "/usr/bin:/bin", "PORT": str(port)},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout
        while not accepts(port):
            if process.poll() is not None:
                raise RuntimeError(f"the everything server exited: {_tail(directory)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the everything server did not start: {_tail(directory)}")
            time.sleep(0.05)
        yield EverythingServer(port, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _tail(directory: Path) -> str:
    return (directory / "everything.log").read_text(errors="replace")[-2000:]
