"""Usage records to PostgreSQL in the background, through disk while it is down.

``AuditSink.record()`` only appends to an in-memory ``AuditBuffer``; the ``run()`` task
takes batches from it every ``flush_interval`` (sooner when ``batch_size`` records
wait), writes each to a journal file it holds locked, then to PostgreSQL
(``proxy.store.postgres.write_usage``), and removes the file once the transaction
committed. A batch that cannot be written is sealed as a spill file instead, and so are
the oldest records when the buffer is over ``max_buffer``; once PostgreSQL takes writes
again every spill file in ``spill_dir`` is replayed, whichever process wrote it (file
formats and claiming: ``proxy.net.audit_files``). ``close()`` is the final flush.

Each record carries an idempotency key and ``usage_records.record_key`` is unique, so a
batch written twice — retried after its commit reply was lost, replayed after a crash
between the commit and the unlink, or committed by an abandoned write at shutdown —
inserts each record once: exactly once in PostgreSQL. What can be lost is what exists
only in this process's memory when it is killed (SIGKILL, OOM): the records not yet
taken into a batch. A batch being written is in its journal file, which the next scan
of any worker replays once this process is gone.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from proxy.audit import AuditBuffer, UsageRecord
from proxy.net.audit_files import (
    PREFIX,
    Claim,
    claim_file,
    finish_claim,
    journal_file,
    release_claim,
    replay_candidates,
    safe_tag,
    seal_claim,
    write_spill_file,
)
from proxy.net.database import Database
from proxy.store.postgres import StoreUnavailable, write_usage

REPLAY_FILES_PER_FLUSH = 50
"""A long outage leaves many files: replay them a slice at a time between flushes."""

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
        # A flush at once: what a dead worker left (its journal) is replayed on start.
        while True:
            await self._flush()
            with trio.move_on_after(self.flush_interval):
                await self._batch_ready.wait()
            self._batch_ready = trio.Event()

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
        claim = await self._journal(batch)
        try:
            error = await self._db_write(batch)
        except BaseException:
            # Cancelled (close() or shutdown). An abandoned thread may still commit the
            # batch: the keys make a later replay of it insert nothing twice.
            with trio.CancelScope(shield=True):
                if claim is None or not await self._seal(claim, "write abandoned"):
                    self._buffer.restore(batch)  # for the final flush
            raise
        if error is None:
            if claim is not None:
                with trio.CancelScope(shield=True):
                    await self._settle(finish_claim, claim)
            self._count("written", len(batch))
            return
        rest = self._buffer.take_all() if self._down else []
        if claim is None or not await self._seal(claim, error):
            rest = [*batch, *rest]
        await self._spill(rest, error)

    async def _journal(self, batch: list[UsageRecord]) -> Claim | None:
        """The batch in a locked journal file before it is sent; None (sent without one,
        as if the process could not die) when the disk refuses."""
        stem = f"{PREFIX}{self.tag}-{time.time_ns()}-{next(self._seq):06d}"
        try:
            # Shielded: a cancelled write would leave it unknown whether the file exists.
            with trio.CancelScope(shield=True):
                claim = await trio.to_thread.run_sync(
                    journal_file, self.spill_dir, stem, self.tag, batch
                )
        except OSError as exc:
            self.log.error("audit_journal_failed", records=len(batch), error=str(exc))
            return None
        return claim

    async def _seal(self, claim: Claim, reason: str) -> bool:
        """A journaled batch that was not written becomes a spill file; False when even
        that fails (the caller keeps the records)."""
        try:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(seal_claim, claim)
        except OSError as exc:
            self.log.error("audit_spill_failed", records=len(claim.records), error=str(exc))
            with contextlib.suppress(OSError):
                claim.path.unlink()  # the records stay in memory: never both
            return False
        self._count("spilled", len(claim.records))
        self.log.warning(
            "audit_spilled", records=len(claim.records), path=str(claim.sealed), reason=reason
        )
        self._replay_due = True
        return True

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
