"""Usage records to PostgreSQL in the background, through disk while it is down.

``AuditSink.record()`` only appends to an in-memory ``AuditBuffer``; the ``run()`` task
writes batches with one COPY each (``proxy.store.postgres.write_usage``). A batch that
cannot be written, and the oldest records when the buffer is over ``max_buffer``, go to
a spill file instead; once PostgreSQL takes writes again every spill file in
``spill_dir`` is replayed, whichever process wrote it. ``close()`` is the final flush.

Delivery is at-least-once: a record is removed from disk only after the COPY holding it
committed, so a crash (or a commit whose reply was lost, or a write abandoned at
shutdown) between the commit and the unlink replays it again. Duplicates are possible
after such a failure; a lost record is not (short of SIGKILL with records in memory).

Spill files, in a directory shared by every worker and by later processes:

- ``audit-<tag>-<time_ns>-<seq>.tmp``: being written; renamed once complete and fsync'd.
- ``audit-<tag>-<time_ns>-<seq>.jsonl``: sealed, never modified again; JSON lines.
- ``<sealed name>.replaying-<tag>``: claimed by the worker with that tag, which holds an
  exclusive ``flock`` on it for as long as it works on it.

To claim a file a worker opens it, takes ``flock(LOCK_EX | LOCK_NB)``, checks the name
still points at the locked inode, and renames it to ``.replaying-<own tag>`` while
holding the lock. A held lock means another worker is on the file; a ``.replaying-``
file whose lock is free belonged to a process that died (the kernel drops the lock with
it) and is claimed like a sealed one. So two workers never replay one file, and one that
crashes mid-replay leaves a file the next scan picks up. After a committed COPY the file
is unlinked; after a failed one it is renamed back to ``.jsonl``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import os
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from proxy.audit import AuditBuffer, UsageRecord, decode_lines, encode_lines
from proxy.net.database import Database
from proxy.store.postgres import StoreUnavailable, write_usage

PREFIX = "audit-"
SEALED = ".jsonl"
TEMP = ".tmp"
CLAIMED = ".replaying-"
STALE_TEMP_SECONDS = 60.0
"""A ``.tmp`` file this old lost its writer (a write takes milliseconds): replay it."""

REPLAY_FILES_PER_FLUSH = 50
"""A long outage leaves many files: replay them a slice at a time between flushes."""

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
        records, bad = decode_lines(_read_all(fd))
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


# --- the sink ------------------------------------------------------------------------------


class AuditSink:
    """Batches usage records to PostgreSQL off the request path; see the module doc."""

    def __init__(
        self,
        db: Database | None,
        spill_dir: Path,
        worker_tag: str,
        *,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        max_buffer: int = 10000,
        log: Any,
        on_count: Callable[[str, int], None] | None = None,
        retry_interval: float = 5.0,
        rescan_interval: float = 30.0,
    ) -> None:
        self.db = db
        """None: spill only (the files wait for a process that has a database)."""
        self.spill_dir = spill_dir
        self.tag = safe_tag(worker_tag)
        self.batch_size = max(1, batch_size)
        self.flush_interval = flush_interval
        self.retry_interval = retry_interval
        """While PostgreSQL is down, how often to try it again."""
        self.rescan_interval = rescan_interval
        """How often to look for spill files left by other processes."""
        self.log = log
        self.on_count = on_count
        self._buffer = AuditBuffer(max_buffer)
        self._batch_ready = trio.Event()
        self._overflow = trio.Event()
        self._down = False
        self._retry_at = 0.0
        self._replay_due = db is not None
        self._next_scan = 0.0
        self._seq = itertools.count()
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self._closing = False
        self._closed = False

    def __len__(self) -> int:
        """Records held in memory."""
        return len(self._buffer)

    def record(self, rec: UsageRecord) -> None:
        """Queue one record: O(1), never awaits, never raises. From the Trio thread."""
        if self._closed:
            self._spill_late(rec)
            return
        if not self._buffer.add(rec):
            self._overflow.set()
        elif len(self._buffer) >= self.batch_size:
            self._batch_ready.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The background writer, until ``close()`` (or cancellation: the records stay in
        memory for ``close()``)."""
        if self._scope is not None:
            raise RuntimeError("AuditSink.run() is already running")
        self._scope = trio.CancelScope()
        try:
            with self._scope:
                await trio.to_thread.run_sync(
                    functools.partial(self.spill_dir.mkdir, parents=True, exist_ok=True)
                )
                task_status.started()
                if self._closing:
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._overflow_loop)
                    await self._write_loop()
        finally:
            self._stopped.set()

    # A parameter, not the caller's move_on_after: the timeout bounds the PostgreSQL part
    # only; the spill of whatever is left must run whatever time remains.
    async def close(self, timeout: float) -> None:  # noqa: ASYNC109
        """Stop ``run()``, write what is left to PostgreSQL within ``timeout`` seconds and
        spill the rest to disk. Shielded, so it completes even in a cancelled scope;
        records passed to ``record()`` afterwards are spilled synchronously."""
        if self._closing:
            return
        self._closing = True
        with trio.CancelScope(shield=True):
            if self._scope is not None:
                self._scope.cancel()
                await self._stopped.wait()
            self._report_dropped()
            with trio.move_on_after(timeout):
                if self.db is not None and self._may_try_db():
                    while len(self._buffer):
                        await self._write_batch(self._buffer.take(self.batch_size))
                        if self._down:
                            break
            if len(self._buffer):
                with contextlib.suppress(OSError):  # if it still fails, the spill says so
                    await trio.to_thread.run_sync(
                        functools.partial(self.spill_dir.mkdir, parents=True, exist_ok=True)
                    )
            # Again while records keep arriving during the spill: after _closed is set
            # (no checkpoint in between) record() writes through instead.
            while len(self._buffer):
                if not await self._spill(self._buffer.take_all(), "shutdown"):
                    break
            self._closed = True
            if len(self._buffer):
                self.log.error("audit_lost", records=len(self._buffer), reason="spill failed")

    # --- the loops ---

    async def _write_loop(self) -> None:
        while True:
            with trio.move_on_after(self.flush_interval):
                await self._batch_ready.wait()
            self._batch_ready = trio.Event()
            await self._flush()

    async def _overflow_loop(self) -> None:
        while True:
            await self._overflow.wait()
            self._overflow = trio.Event()
            self._report_dropped()
            if not await self._spill(self._buffer.take_overflow(), "buffer full"):
                await trio.sleep(self.flush_interval)  # the disk is failing: do not spin

    async def _flush(self) -> None:
        self._report_dropped()
        if self.db is None:
            await self._spill(self._buffer.take_all(), "no database")
            return
        if not self._may_try_db():
            await self._spill(self._buffer.take_all(), "database down")
            return
        # Only what is here now: a steady stream must not starve the replay below.
        pending = len(self._buffer)
        while pending > 0:
            batch = self._buffer.take(min(self.batch_size, pending))
            pending -= len(batch)
            await self._write_batch(batch)
            if self._down:
                return  # that batch and the rest are on disk; next try after retry_interval
        # While down with nothing buffered, the first replayed file is the retry.
        if self._replay_due or trio.current_time() >= self._next_scan:
            await self._replay()

    def _may_try_db(self) -> bool:
        # Another task's success on the shared Database (the snapshot poller) is news
        # that PostgreSQL is back before our own retry time.
        return (
            not self._down
            or trio.current_time() >= self._retry_at
            or (self.db is not None and self.db.up is True)
        )

    # --- writing ---

    async def _db_write(self, records: Sequence[UsageRecord]) -> str | None:
        """Write one batch; None on success, else why not."""
        assert self.db is not None
        try:
            # partial, not a closure: an abandoned thread must keep its own batch.
            await self.db.run(functools.partial(write_usage, records=records))
        except StoreUnavailable as exc:
            if not self._down:
                self.log.warning("audit_database_down", reason=str(exc))
            self._down = True
            self._retry_at = trio.current_time() + self.retry_interval
            return str(exc)
        except Exception as exc:
            # Not an outage (schema missing, a rejected value): keep the records on disk
            # and keep going; the error log says why.
            reason = f"{type(exc).__name__}: {exc}"
            self.log.error("audit_write_failed", records=len(records), error=reason)
            return reason
        if self._down:
            self.log.info("audit_database_back")
            self._down = False
            self._replay_due = True
        return None

    async def _write_batch(self, batch: list[UsageRecord]) -> None:
        try:
            error = await self._db_write(batch)
        except BaseException:
            # Cancelled (close() or shutdown): the batch goes back for the final flush.
            # An abandoned thread may still commit it: a duplicate, never a loss.
            self._buffer.restore(batch)
            raise
        if error is None:
            self._count("written", len(batch))
        elif self._down:
            await self._spill([*batch, *self._buffer.take_all()], error)
        else:
            await self._spill(batch, error)

    async def _spill(self, records: list[UsageRecord], reason: str) -> bool:
        """Records to a new spill file; on failure they go back to the buffer."""
        if not records:
            return True
        stem = f"{PREFIX}{self.tag}-{time.time_ns()}-{next(self._seq):06d}"
        try:
            # Shielded: a cancelled spill would leave it unknown whether the file exists.
            with trio.CancelScope(shield=True):
                path = await trio.to_thread.run_sync(
                    write_spill_file, self.spill_dir, stem, records
                )
        except OSError as exc:
            self._buffer.restore(records)
            self.log.error("audit_spill_failed", records=len(records), error=str(exc))
            return False
        self._count("spilled", len(records))
        self.log.warning("audit_spilled", records=len(records), path=str(path), reason=reason)
        self._replay_due = True
        return True

    def _spill_late(self, rec: UsageRecord) -> None:
        # After close() nothing flushes the buffer: write through, blocking (shutdown only).
        stem = f"{PREFIX}{self.tag}-{time.time_ns()}-{next(self._seq):06d}"
        try:
            path = write_spill_file(self.spill_dir, stem, [rec])
        except OSError as exc:
            self.log.error("audit_lost", records=1, reason=str(exc))
            return
        self._count("spilled", 1)
        self.log.warning("audit_spilled", records=1, path=str(path), reason="after close")

    # --- replay ---

    async def _replay(self) -> None:
        self._replay_due = False
        self._next_scan = trio.current_time() + self.rescan_interval
        try:
            paths = await trio.to_thread.run_sync(replay_candidates, self.spill_dir, time.time())
        except OSError as exc:
            self.log.error("audit_replay_failed", path=str(self.spill_dir), error=str(exc))
            return
        if len(paths) > REPLAY_FILES_PER_FLUSH:
            paths = paths[:REPLAY_FILES_PER_FLUSH]
            self._replay_due = True  # the rest on the next flush, after new records
        for path in paths:
            try:
                claim = await trio.to_thread.run_sync(claim_file, path, self.tag)
            except OSError as exc:
                self.log.error("audit_replay_failed", path=str(path), error=str(exc))
                continue
            if claim is not None and not await self._replay_claim(claim):
                return

    async def _replay_claim(self, claim: Claim) -> bool:
        """Write one claimed file; False when PostgreSQL went down (stop replaying)."""
        try:
            error = await self._db_write(claim.records) if claim.records else None
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._settle(release_claim, claim)
            raise
        if claim.bad_lines:
            self.log.error("audit_spill_corrupt", path=str(claim.sealed), lines=claim.bad_lines)
        if error is not None:
            with trio.CancelScope(shield=True):
                await self._settle(release_claim, claim)
            if not self._down:
                # Rejected, not an outage: the file stays for the next scan.
                self.log.error("audit_replay_failed", path=str(claim.sealed), error=error)
            return not self._down
        with trio.CancelScope(shield=True):
            await self._settle(finish_claim, claim)
        self._count("replayed", len(claim.records))
        self.log.info("audit_replayed", records=len(claim.records), path=str(claim.sealed))
        return True

    async def _settle(self, fn: Callable[[Claim], None], claim: Claim) -> None:
        try:
            await trio.to_thread.run_sync(fn, claim)
        except OSError as exc:
            # The file stays under its .replaying- name, unlocked: the next scan (here or
            # in another worker) reclaims it; after a commit that means a duplicate.
            self.log.error("audit_replay_failed", path=str(claim.path), error=str(exc))

    # --- reporting ---

    def _count(self, outcome: str, n: int) -> None:
        if self.on_count is None or n == 0:
            return
        try:
            self.on_count(outcome, n)
        except Exception as exc:
            self.log.error("audit_count_failed", outcome=outcome, error=repr(exc))

    def _report_dropped(self) -> None:
        dropped = self._buffer.take_dropped()
        if dropped:
            # Only when spilling itself keeps failing (see AuditBuffer): never silent.
            self.log.error("audit_dropped", records=dropped, reason="buffer hard limit")
            self._count("dropped", dropped)
