"""What the supervisor makes sure of before it starts anything: addresses it can listen
on, a writable state directory, and a demo backend that really answers.

Every problem is a ``StartupError`` with one line for the operator, naming the address
and the setting it came from (``proxy.config_errors.Origins``); ``switchboard run``
prints it and exits with status 2.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import trio

from proxy.config import Config, parse_hostport

DEMO_START_TIMEOUT = 30.0
_DEMO_POLL = 0.05


class StartupError(Exception):
    """The proxy cannot start (address in use, a worker never became ready, ...)."""


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def cannot_listen(listen: str, setting: str, exc: OSError, *, who: str = "") -> StartupError:
    """The one line for an address that cannot be listened on; ``who`` names a listener
    other than the proxy itself (the demo backend)."""
    reason = exc.strerror or str(exc)
    subject = f"{who} cannot listen" if who else "cannot listen"
    return StartupError(f"{subject} on {listen} ({setting}): {reason}")


def check_free(listen: str, setting: str, *, who: str = "") -> None:
    """Raise StartupError if something already listens on ``listen``.

    The probe binds without SO_REUSEPORT: the proxy's own sockets set it, so a bind with
    it would succeed beside another process's SO_REUSEPORT socket (another switchboard
    of the same user) and silently share its port. SO_REUSEADDR lets the probe pass
    sockets merely in TIME_WAIT."""
    host, port = parse_hostport(listen)
    probe = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if probe.family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind((host, port))
    except OSError as exc:
        raise cannot_listen(listen, setting, exc, who=who) from None
    finally:
        probe.close()


def bind_admin_socket(listen: str, setting: str) -> socket.socket:
    """The admin endpoints' listening socket, bound before anything starts (hypercorn
    serves it as ``fd://``)."""
    host, port = parse_hostport(listen)
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise cannot_listen(listen, setting, exc) from None
    return sock


def check_state_dir(config: Config) -> None:
    """With a database, workers persist the snapshot and spill audit records under
    database.state_dir: refuse to start (or reload) when it cannot be written, rather
    than run without either."""
    if not config.database.url:
        return
    path = Path(config.database.state_dir)
    try:
        (path / "audit").mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(
            f"database.state_dir {str(path)!r} is not writable ({exc.strerror or exc}); "
            "create it for the service user, e.g. systemd StateDirectory=switchboard"
        ) from None


class DemoBackend:
    """The bundled demo MCP backend as a child process (``make run``)."""

    def __init__(self, listen: str, setting: str) -> None:
        self.listen = listen
        self.setting = setting
        self.process: trio.Process | None = None

    async def start(self) -> None:
        """Start it and wait until it answers ``GET /healthz`` with ``ok``: an open port
        alone could be another program's."""
        self.process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "proxy.demo", "--listen", self.listen]
        )
        with trio.move_on_after(DEMO_START_TIMEOUT):
            while not await self._answers():
                if self.process.poll() is not None:
                    raise StartupError(
                        f"the demo backend on {self.listen} ({self.setting}) exited at start"
                    )
                await trio.sleep(_DEMO_POLL)
            return
        raise StartupError(
            f"the demo backend on {self.listen} ({self.setting}) did not answer "
            f"within {DEMO_START_TIMEOUT:g} s"
        )

    async def _answers(self) -> bool:
        host, port = parse_hostport(self.listen)
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return False
        request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        answer = b""
        try:
            with trio.move_on_after(2.0):
                await stream.send_all(request.encode("ascii"))
                while chunk := await stream.receive_some(4096):
                    answer += chunk
        except (trio.BrokenResourceError, OSError):
            return False
        finally:
            await stream.aclose()
        return answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nok")

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
