"""The systemd notification client against real AF_UNIX datagram sockets playing systemd."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from proxy.sdnotify import Notifier, watchdog_loop


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd, and its NOTIFY_SOCKET value."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    with sock:
        yield sock, str(path)


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def drain(sock: socket.socket) -> list[str]:
    """Every datagram already queued, without waiting."""
    sock.setblocking(False)
    received: list[str] = []
    while True:
        try:
            received.append(recv(sock))
        except BlockingIOError:
            return received


def test_helpers_send_exact_fields(systemd: tuple[socket.socket, str]) -> None:
    sock, path = systemd
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled

    assert notifier.ready()
    assert recv(sock) == "READY=1"
    assert notifier.ready("serving on :8080")
    assert recv(sock) == "READY=1\nSTATUS=serving on :8080"
    assert notifier.status("2 workers")
    assert recv(sock) == "STATUS=2 workers"
    assert notifier.watchdog()
    assert recv(sock) == "WATCHDOG=1"
    assert notifier.stopping()
    assert recv(sock) == "STOPPING=1"
    assert notifier.mainpid(4242)
    assert recv(sock) == "MAINPID=4242"
    assert notifier.send("A=1", "B=2")
    assert recv(sock) == "A=1\nB=2"
    notifier.close()


def test_reloading_carries_monotonic_usec(systemd: tuple[socket.socket, str]) -> None:
    sock, path = systemd
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    before = time.monotonic_ns() // 1000
    assert notifier.reloading()
    after = time.monotonic_ns() // 1000
    reloading, monotonic = recv(sock).split("\n")
    assert reloading == "RELOADING=1"
    key, value = monotonic.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    notifier.close()


def test_newline_in_value_cannot_inject_a_field(systemd: tuple[socket.socket, str]) -> None:
    sock, path = systemd
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.status("bad\nREADY=1")
    assert recv(sock) == "STATUS=bad READY=1"
    notifier.close()


def test_abstract_namespace_socket() -> None:
    name = f"switchboard-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert recv(sock) == "READY=1"
        notifier.close()


def test_disabled_when_notify_socket_unset() -> None:
    notifier = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.reloading()
    assert not notifier.stopping()
    assert not notifier.watchdog()
    assert notifier.watchdog_interval() is None
    assert not Notifier.from_env({"NOTIFY_SOCKET": ""}).enabled


def test_vanished_socket_returns_false(tmp_path: Path) -> None:
    path = tmp_path / "gone.sock"
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    assert notifier.enabled
    assert not notifier.ready()  # never existed
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert notifier.ready()
    assert not notifier.stopping()  # file still there, nobody bound: refused
    path.unlink()
    assert not notifier.stopping()  # file removed
    notifier.close()


def test_watchdog_interval_parsing() -> None:
    def interval(**env: str) -> float | None:
        return Notifier.from_env({"NOTIFY_SOCKET": "/nonexistent", **env}).watchdog_interval()

    assert interval() is None
    assert interval(WATCHDOG_USEC="3000000") == 1.5
    assert interval(WATCHDOG_USEC="3000000", WATCHDOG_PID=str(os.getpid())) == 1.5
    assert interval(WATCHDOG_USEC="3000000", WATCHDOG_PID=str(os.getpid() + 1)) is None
    assert interval(WATCHDOG_USEC="0") is None
    assert interval(WATCHDOG_USEC="soon") is None


async def test_watchdog_loop_pings_repeatedly(systemd: tuple[socket.socket, str]) -> None:
    sock, path = systemd
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    assert notifier.watchdog_interval() == 0.05
    pings: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog_loop, notifier)
        with trio.fail_after(30):  # a guard: the pings come every 50 ms
            while len(pings) < 3:
                await trio.lowlevel.wait_readable(sock)
                pings += drain(sock)
        nursery.cancel_scope.cancel()
    assert set(pings) == {"WATCHDOG=1"}
    notifier.close()


async def test_watchdog_loop_returns_when_disabled(systemd: tuple[socket.socket, str]) -> None:
    sock, path = systemd
    with trio.fail_after(30):  # a guard: a disabled loop returns without waiting
        await watchdog_loop(Notifier.from_env({"NOTIFY_SOCKET": path}))
        await watchdog_loop(Notifier.from_env({}))
    assert drain(sock) == []
