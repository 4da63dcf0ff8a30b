"""Raise kernel limits a large run needs, where /proc/sys is writable, and put them back.

Everything stays on loopback, so what matters is: accept queues for connection bursts,
ephemeral ports, the system-wide file limit, conntrack (when the module is loaded it
tracks loopback connections too, and a full table drops new ones), and TCP memory.
Values already high enough are left alone; nothing is lowered.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import JSON, progress

_SYS = Path("/proc/sys")


def _wanted(streams: int) -> dict[str, str]:
    sockets = streams * 4  # client, proxy x 2, backend
    return {
        "net/core/somaxconn": "65535",
        "net/ipv4/tcp_max_syn_backlog": "65535",
        "net/ipv4/ip_local_port_range": "1024 65535",
        "net/ipv4/tcp_tw_reuse": "1",
        "fs/file-max": str(max(4_194_304, sockets * 2)),
        "fs/nr_open": "1048576",
        "net/netfilter/nf_conntrack_max": str(max(262_144, sockets)),
        "net/ipv4/tcp_max_orphans": str(max(262_144, sockets)),
    }


def _higher(current: str, wanted: str) -> bool:
    """True when ``wanted`` raises ``current`` (for a range, when it widens it)."""
    cur, want = current.split(), wanted.split()
    if len(cur) == 2 and len(want) == 2:
        return int(want[0]) < int(cur[0]) or int(want[1]) > int(cur[1])
    return int(want[-1]) > int(cur[-1])


@contextmanager
def tune_kernel(streams: int) -> Iterator[JSON]:
    """For ``streams`` > 0: raise what is too low and writable; yields what was changed
    and what could not be (restored on exit)."""
    changed: dict[str, tuple[str, str]] = {}
    skipped: dict[str, str] = {}
    if streams > 0:
        for key, wanted in _wanted(streams).items():
            path = _SYS / key
            try:
                current = " ".join(path.read_text().split())
            except OSError:
                continue  # not on this kernel (conntrack not loaded, ...)
            if not _higher(current, wanted):
                continue
            try:
                path.write_text(wanted)
                changed[key] = (current, wanted)
            except OSError as exc:
                skipped[key] = f"{current} (wanted {wanted}: {exc.strerror})"
        for key, (old, new) in changed.items():
            progress(f"sysctl {key.replace('/', '.')}: {old} -> {new} (restored afterwards)")
        for key, why in skipped.items():
            progress(f"sysctl {key.replace('/', '.')} left at {why}")
    try:
        yield {
            "changed": {k.replace("/", "."): {"was": o, "set": n} for k, (o, n) in changed.items()},
            "not_writable": {k.replace("/", "."): v for k, v in skipped.items()},
        }
    finally:
        for key, (old, _) in changed.items():
            try:
                (_SYS / key).write_text(old)
            except OSError:
                progress(f"could not restore sysctl {key}")
