"""What TCP connections a process holds on one local port, read from the kernel.

``held_connections(pid, port)`` counts the sockets among the process's open files
(``/proc/PID/fd``) whose local port is ``port`` in the kernel's TCP tables
(``/proc/net/tcp`` and ``tcp6``): the established ones, and the length of the accept
queue of its listening socket there (connections the kernel completed for the process
that it has not accepted yet). A crash test reads it with the process stopped
(``SIGSTOP``), so nothing changes between the reading and the kill.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_ESTABLISHED = "01"
_LISTEN = "0A"


@dataclass(frozen=True)
class HeldConnections:
    established: int
    queued: int  # completed by the kernel, waiting in the process's accept queue

    @property
    def total(self) -> int:
        return self.established + self.queued


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / entry)
        except FileNotFoundError:  # closed while we listed
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def held_connections(pid: int, port: int) -> HeldConnections:
    inodes = _socket_inodes(pid)
    established = queued = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            # sl local_address rem_address st tx_queue:rx_queue tr:when retrnsmt uid
            # timeout inode ...
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port != port or fields[9] not in inodes:
                continue
            if fields[3] == _ESTABLISHED:
                established += 1
            elif fields[3] == _LISTEN:
                # A listening socket's rx_queue is its accept queue's current length.
                queued += int(fields[4].split(":")[1], 16)
    return HeldConnections(established, queued)
