"""A tiny systemd notification client (``sd_notify(3)``), no dependency.

Each message is one datagram of ``KEY=VALUE`` lines sent to ``$NOTIFY_SOCKET``. Without
that variable (not run by systemd, or not ``Type=notify``) every method is a no-op.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import trio


class Notifier:
    """Sends notifications to systemd; sending never raises and never blocks."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec if address is not None else None
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``."""
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            # Linux abstract namespace: systemd spells the leading NUL as '@'.
            address = "\0" + address[1:]
        return cls(address, _watchdog_usec(environ))

    @property
    def enabled(self) -> bool:
        """Whether there is a notification socket to talk to."""
        return self._address is not None

    def send(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; False if disabled or systemd is unreachable."""
        if self._address is None or not lines:
            return False
        payload = "\n".join(lines).encode()
        try:
            if self._sock is None:
                # CLOEXEC: worker processes exec'd by the supervisor must not inherit it.
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(payload, self._address)
        except OSError:
            # Missing or refused socket, full queue (BlockingIOError): systemd may be gone
            # or slow during shutdown, and a notification is never worth failing over.
            return False
        return True

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` fields as one datagram."""
        # A newline inside a value would start a bogus assignment.
        lines = (f"{key}={value}" for key, value in fields.items())
        return self.send(*(line.replace("\n", " ") for line in lines))

    def ready(self, status: str | None = None) -> bool:
        """Startup finished (``READY=1``), optionally with a status line."""
        extra = {} if status is None else {"STATUS": status}
        return self.notify(READY=1, **extra)

    def reloading(self) -> bool:
        """A reload started; ``MONOTONIC_USEC`` is required for ``Type=notify-reload``."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self) -> bool:
        """Shutdown started (``STOPPING=1``)."""
        return self.notify(STOPPING=1)

    def status(self, text: str) -> bool:
        """Free-form status shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Keep-alive ping (``WATCHDOG=1``)."""
        return self.notify(WATCHDOG=1)

    def mainpid(self, pid: int) -> bool:
        """Tell systemd which process is the service's main process."""
        return self.notify(MAINPID=pid)

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the watchdog timeout, as systemd recommends."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def close(self) -> None:
        """Close the socket (a later send opens a new one)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """``WATCHDOG_USEC`` if the watchdog is meant for this process, else None."""
    pid = environ.get("WATCHDOG_PID")
    # WATCHDOG_PID names the process the watchdog is for; our children may inherit it.
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    usec = environ.get("WATCHDOG_USEC", "").strip()
    return int(usec) if usec.isdecimal() and int(usec) > 0 else None


async def watchdog_loop(notifier: Notifier) -> None:
    """Ping the watchdog forever; return at once when it is disabled."""
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await trio.sleep(interval)
