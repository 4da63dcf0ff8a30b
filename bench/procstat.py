"""CPU seconds and resident memory of process trees, and kernel socket memory, from /proc.

Only the processes of the proxy under test are counted (for Switchboard: the supervisor
and its workers; for HAProxy: its one process), never the load generators or backends.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces; fields follow the last ")".
    return text[text.rfind(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads' children)."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out.extend(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    seen = [pid]
    i = 0
    while i < len(seen):
        seen.extend(c for c in children(seen[i]) if c not in seen)
        i += 1
    return seen


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (their threads included)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / _TICKS


def rss_bytes(pids: list[int]) -> int:
    """Sum of VmRSS of these processes."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


@dataclass(frozen=True, slots=True)
class KernelMem:
    tcp_inuse: int
    tcp_mem_bytes: int
    """TCP buffer memory (sockstat "mem", pages) of the whole host."""
    slab_bytes: int
    """Kernel slab memory of the whole host (socket structures live there); noisy."""

    def minus(self, other: KernelMem) -> KernelMem:
        return KernelMem(
            self.tcp_inuse - other.tcp_inuse,
            self.tcp_mem_bytes - other.tcp_mem_bytes,
            self.slab_bytes - other.slab_bytes,
        )


def kernel_mem() -> KernelMem:
    inuse = mem = slab = 0
    try:
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                parts = line.split()
                values = dict(zip(parts[1::2], parts[2::2], strict=False))
                inuse = int(values.get("inuse", 0))
                mem = int(values.get("mem", 0)) * PAGE
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Slab:"):
                slab = int(line.split()[1]) * 1024
    except OSError:
        pass
    return KernelMem(inuse, mem, slab)


class ProcessTree:
    """The processes of one target (re-listed on every reading, workers may restart)."""

    def __init__(self, root: int) -> None:
        self.root = root

    def pids(self) -> list[int]:
        return tree(self.root)

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def cpu_by_pid(self) -> dict[int, float]:
        """CPU seconds of each process (the root first)."""
        return {pid: cpu_seconds([pid]) for pid in self.pids()}

    def rss(self) -> int:
        return rss_bytes(self.pids())
