"""Start-up problems an operator must fix: each stops ``switchboard run`` before anything
is started, with exit status 2 and one line on stderr naming the address and the setting
it came from (file, environment variable, flag or default)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from proxy.startup import DemoBackend, StartupError, check_free
from tests.support.proxy_process import free_port
from tests.test_cli import switchboard

ROUTE = '[[routes]]\nprefix = "/"\nbackends = ["http://127.0.0.1:9"]\n'
IN_USE = "Address already in use"


@contextmanager
def occupied(*, reuseport: bool = False) -> Iterator[str]:
    """A loopback address something else listens on; with ``reuseport`` that something
    set SO_REUSEPORT, as another switchboard would."""
    sock = socket.socket()
    try:
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sb.toml"
    path.write_text(text, encoding="utf-8")
    return path


def free() -> str:
    return f"127.0.0.1:{free_port()}"


def refused(*args: str, env: dict[str, str] | None = None) -> str:
    """Run ``switchboard run ARGS``; assert it stopped at start with status 2, started no
    worker and printed no banner; return its one stderr line."""
    result = switchboard("run", *args, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert '"worker_ready"' not in result.stdout
    assert '"worker_started"' not in result.stdout
    return lines[0]


def test_listen_address_in_use_from_the_file(tmp_path: Path) -> None:
    with occupied() as busy:
        path = config(tmp_path, f'[server]\nlisten = ["{busy}"]\n[admin]\nlisten = ""\n{ROUTE}')
        line = refused("--config", str(path))
    assert line == f"switchboard: cannot listen on {busy} (server.listen in {path}): {IN_USE}"


def test_listen_address_of_another_reuseport_listener_is_in_use(tmp_path: Path) -> None:
    # SO_REUSEPORT on both sides would let the kernel share the port between two proxies.
    with occupied(reuseport=True) as busy:
        path = config(tmp_path, f'[admin]\nlisten = ""\n{ROUTE}')
        line = refused("--config", str(path), "--listen", busy)
    assert line == f"switchboard: cannot listen on {busy} (--listen): {IN_USE}"


def test_admin_address_in_use_from_the_environment(tmp_path: Path) -> None:
    with occupied() as busy:
        path = config(tmp_path, f'[server]\nlisten = ["{free()}"]\n{ROUTE}')
        line = refused("--config", str(path), env={"SWITCHBOARD_ADMIN__LISTEN": busy})
    assert line == (
        f"switchboard: cannot listen on {busy} "
        f"(admin.listen from SWITCHBOARD_ADMIN__LISTEN): {IN_USE}"
    )


def test_demo_address_in_use_stops_the_start_before_the_demo_or_workers(tmp_path: Path) -> None:
    with occupied() as busy:
        text = (
            f'[server]\nlisten = ["{free()}"]\n[admin]\nlisten = "{free()}"\n'
            f'[demo]\nenabled = true\nlisten = "{busy}"\n{ROUTE}'
        )
        path = config(tmp_path, text)
        line = refused("--config", str(path))
    assert line == (
        f"switchboard: the demo backend cannot listen on {busy} (demo.listen in {path}): {IN_USE}"
    )


def test_environment_and_enum_errors_name_the_variable_and_the_values(tmp_path: Path) -> None:
    path = config(tmp_path, ROUTE)
    line = refused("--config", str(path), env={"SWITCHBOARD_SERVER__WORKERS": "abc"})
    assert line == (
        "switchboard: config error: environment variable SWITCHBOARD_SERVER__WORKERS: "
        "server.workers: Expected int, got str"
    )
    line = refused("--config", str(config(tmp_path, f'[log]\nlevel = "loud"\n{ROUTE}')))
    assert line == (
        f"switchboard: config error: {path}: log.level: "
        "Invalid enum value 'loud' (valid values: debug, info, warning, error)"
    )


def test_check_free_passes_a_free_address_and_names_a_busy_one() -> None:
    check_free(free(), "server.listen, the default")
    with occupied() as busy, pytest.raises(StartupError) as info:
        check_free(busy, "demo.listen, the default", who="the demo backend")
    assert str(info.value) == (
        f"the demo backend cannot listen on {busy} (demo.listen, the default): {IN_USE}"
    )


async def test_demo_backend_answers_once_started(tmp_path: Path) -> None:
    listen = free()
    demo = DemoBackend(listen, "demo.listen, the default")
    try:
        await demo.start()
        # Started means answering: the banner printed next may promise it.
        stream = await trio.open_tcp_stream("127.0.0.1", int(listen.rsplit(":", 1)[1]))
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := await stream.receive_some(4096):
            answer += chunk
        await stream.aclose()
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        await demo.stop()


async def test_demo_backend_that_cannot_start_is_a_startup_error() -> None:
    # Another listener with SO_REUSEPORT unset: the demo's own bind fails and it exits.
    with occupied() as busy:
        demo = DemoBackend(busy, "demo.listen, the default")
        with pytest.raises(StartupError) as info:
            await demo.start()
    assert str(info.value) == (
        f"the demo backend on {busy} (demo.listen, the default) exited at start"
    )
