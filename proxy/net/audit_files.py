"""Audit spill and journal files: the blocking file operations of the audit sink (called
through ``trio.to_thread``).

Files, in a directory shared by every worker and by later processes:

- ``audit-<tag>-<time_ns>-<seq>.tmp``: being written; renamed once complete.
- ``audit-<tag>-<time_ns>-<seq>.jsonl``: sealed (fsync'd), never modified again; JSON
  lines, replayed by whichever worker claims it.
- ``<sealed name>.replaying-<tag>``: claimed by the worker with that tag, which holds an
  exclusive ``flock`` on it for as long as it works on it: a file it is replaying, or a
  batch it journaled before sending it to PostgreSQL.

To claim a file a worker opens it, takes ``flock(LOCK_EX | LOCK_NB)``, checks the name
still points at the locked inode, and renames it to ``.replaying-<own tag>`` while
holding the lock. A held lock means another worker is on the file; a ``.replaying-``
file whose lock is free belonged to a process that died (the kernel drops the lock with
it) and is claimed like a sealed one. So two workers never replay one file, and the
batch of a worker killed mid-write is replayed by the next scan of any worker. After a
committed write the file is unlinked; after a failed one it is sealed again as
``.jsonl``.
"""

from __future__ import annotations

import fcntl
import os
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from proxy.audit import UsageRecord, decode_lines, encode_lines

PREFIX = "audit-"
SEALED = ".jsonl"
TEMP = ".tmp"
CLAIMED = ".replaying-"
STALE_TEMP_SECONDS = 60.0
"""A ``.tmp`` file this old lost its writer (a write takes milliseconds): replay it."""

_TAG_CHARS = frozenset(string.ascii_letters + string.digits + "_-")


def safe_tag(tag: str) -> str:
    """``tag`` usable inside a spill file name (no dots, slashes or spaces)."""
    return "".join(c if c in _TAG_CHARS else "_" for c in tag) or "worker"


# --- spill files (blocking: called through trio.to_thread) -------------------------------


@dataclass
class Claim:
    """A spill file this process holds locked under its ``.replaying-`` name."""

    fd: int
    path: Path
    sealed: Path
    """The name to give it back under."""
    records: list[UsageRecord]
    bad_lines: int


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_spill_file(directory: Path, stem: str, records: Sequence[UsageRecord]) -> Path:
    """Write ``records`` to ``<stem>.jsonl`` atomically and durably (temp file, fsync,
    rename, fsync of the directory), so a replayer never sees half a file."""
    temp = directory / (stem + TEMP)
    final = directory / (stem + SEALED)
    data = encode_lines(records)
    try:
        with open(temp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return final


def _sealed_name(path: Path) -> Path:
    name = path.name
    if CLAIMED in name:
        name = name[: name.index(CLAIMED)]
    elif name.endswith(TEMP):
        name = name[: -len(TEMP)] + SEALED
    return path.with_name(name)


def replay_candidates(directory: Path, now: float) -> list[Path]:
    """Files that may be claimable: sealed ones, claimed ones (free only if their owner
    died: ``claim_file`` finds out), and temp files old enough to be abandoned."""
    found: list[Path] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            if not name.startswith(PREFIX) or not entry.is_file(follow_symlinks=False):
                continue
            if name.endswith(SEALED) or CLAIMED in name:
                found.append(Path(entry.path))
            elif name.endswith(TEMP):
                try:
                    age = now - entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                if age > STALE_TEMP_SECONDS:
                    found.append(Path(entry.path))
    return sorted(found)


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def claim_file(path: Path, tag: str) -> Claim | None:
    """Lock ``path``, rename it to ``.replaying-<tag>`` and read it; None when another
    live worker holds it or it is gone (see the module docstring)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # Between open and lock another worker may have claimed, replayed and unlinked
        # this inode, or renamed it: the lock is only ours to use if the name still
        # points at it.
        held = os.fstat(fd)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            return None
        if (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
            os.close(fd)
            return None
        sealed = _sealed_name(path)
        claimed = sealed.with_name(sealed.name + CLAIMED + tag)
        os.rename(path, claimed)
        records, bad = decode_lines(_read_all(fd), sealed.name)
    except BaseException:
        # Leaves at most an unlocked .replaying- file, which the next scan reclaims.
        os.close(fd)
        raise
    return Claim(fd=fd, path=claimed, sealed=sealed, records=records, bad_lines=bad)


def finish_claim(claim: Claim) -> None:
    """The records are in PostgreSQL: remove the file (still locked while unlinked)."""
    try:
        claim.path.unlink()
    finally:
        os.close(claim.fd)


def release_claim(claim: Claim) -> None:
    """The records are not in PostgreSQL: give the file back under its sealed name."""
    try:
        os.rename(claim.path, claim.sealed)
    finally:
        os.close(claim.fd)


def journal_file(directory: Path, stem: str, tag: str, records: Sequence[UsageRecord]) -> Claim:
    """``records`` in a file claimed by this process (locked before its name is visible
    to a scan), written before they are sent to PostgreSQL: if the process dies
    mid-write, the kernel drops the lock and any worker's next scan replays the file.
    Not fsync'd: it outlives the process, not the machine (``seal_claim`` makes it
    durable when it has to stay)."""
    temp = directory / (stem + TEMP)
    sealed = directory / (stem + SEALED)
    claimed = sealed.with_name(sealed.name + CLAIMED + tag)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = memoryview(encode_lines(records))
        while data:
            data = data[os.write(fd, data) :]
        os.rename(temp, claimed)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    return Claim(fd=fd, path=claimed, sealed=sealed, records=list(records), bad_lines=0)


def seal_claim(claim: Claim) -> None:
    """The records of a journaled batch were not written: make the file durable and give
    it up as a sealed spill file, for a replay."""
    try:
        os.fsync(claim.fd)
        os.rename(claim.path, claim.sealed)
        _fsync_dir(claim.sealed.parent)
    finally:
        os.close(claim.fd)
