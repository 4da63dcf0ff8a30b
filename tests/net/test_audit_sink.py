"""proxy.net.audit_sink against a real PostgreSQL through a real PgBouncer (transaction
pooling): batches arrive, outages spill to disk, replays deliver every record once."""

from __future__ import annotations

import fcntl
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.audit import UsageRecord, decode_lines, encode_lines
from proxy.net.audit_files import write_spill_file
from proxy.net.audit_sink import AuditSink
from proxy.net.database import Database
from proxy.store import postgres as store
from proxy.store.schema import migrate
from tests.support.postgres import (  # noqa: F401
    PgEnv,
    bouncer_accept,
    bouncer_refuse,
    pg_fixture,
)
from tests.support.proxy_process import free_port


def rec(i: int) -> UsageRecord:
    """Record ``i``: ``bytes_in`` is unique, so duplicates show as count > distinct."""
    return UsageRecord(
        ts=1_700_000_000.25 + i,
        key_id=i % 7 or None,
        tenant_id=3,
        route="/mcp/github",
        method="tools/call",
        tool=f"tool{i % 3}",
        status=200,
        bytes_in=i,
        bytes_out=10 * i,
        duration_ms=0.5 + i,
        key=f"{i:032x}",
    )


class Log:
    """Stands in for the structlog logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append(("info", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append(("warning", event, fields))

    def error(self, event: str, **fields: Any) -> None:
        self.lines.append(("error", event, fields))

    def events(self) -> set[str]:
        return {event for _, event, _ in self.lines}


class Harness:
    """A migrated database of its own, a spill dir, and sinks that count outcomes."""

    def __init__(self, pg: PgEnv, name: str, spill_dir: Path) -> None:
        self.pg = pg
        self.name = name
        self.spill_dir = spill_dir
        self.counts: Counter[str] = Counter()
        self.log = Log()
        self.databases: list[Database] = []

    def database(self, *, reachable: bool = True) -> Database:
        dsn = (
            self.pg.dsn(database=self.name)
            if reachable
            else f"postgresql://u:p@127.0.0.1:{free_port()}/{self.name}?connect_timeout=1"
        )
        db = Database(dsn, connect_timeout=1.0)
        self.databases.append(db)
        return db

    def sink(self, db: Database | None, tag: str = "w0-1", **kwargs: Any) -> AuditSink:
        def on_count(outcome: str, n: int) -> None:
            self.counts[outcome] += n

        options: dict[str, Any] = {
            "flush_interval": 0.05,
            "retry_interval": 0.2,
            "rescan_interval": 0.2,
        }
        options.update(kwargs)
        return AuditSink(db, self.spill_dir, tag, log=self.log, on_count=on_count, **options)

    def _rows(self) -> tuple[int, int]:
        # Straight to PostgreSQL: the check must work while PgBouncer refuses.
        with store.connect(self.pg.dsn(database=self.name, bouncer=False)) as conn:
            row = conn.execute(
                "SELECT count(*), count(DISTINCT bytes_in) FROM usage_records"
            ).fetchone()
            conn.commit()
        assert row is not None
        return int(row[0]), int(row[1])

    async def rows(self) -> tuple[int, int]:
        """(rows, distinct records) in usage_records."""
        return await trio.to_thread.run_sync(self._rows)

    def files(self) -> list[str]:
        return sorted(p.name for p in self.spill_dir.iterdir())

    def spilled(self) -> list[UsageRecord]:
        records: list[UsageRecord] = []
        for path in sorted(self.spill_dir.iterdir()):
            found, bad = decode_lines(path.read_bytes())
            assert bad == 0
            records += found
        return records


@pytest.fixture
def h(pg: PgEnv, tmp_path: Path) -> Iterator[Harness]:
    name = pg.create_database()
    with store.connect(pg.dsn(database=name)) as conn:
        migrate(conn)
    harness = Harness(pg, name, tmp_path / "spill")
    yield harness
    for db in harness.databases:
        db.close()


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` (what it looks at is in PostgreSQL or on disk: no event to wait on)."""
    with trio.fail_after(20):
        while not await check():  # noqa: ASYNC110
            await trio.sleep(0.02)


async def test_batches_arrive_and_close_writes_the_rest(h: Harness) -> None:
    sink = h.sink(h.database(), batch_size=100, flush_interval=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(1000):
            sink.record(rec(i))

        # batch_size reached: written long before the 30 s flush interval.
        async def all_in() -> bool:
            return await h.rows() == (1000, 1000)

        await eventually(all_in)
        for i in range(1000, 1042):
            sink.record(rec(i))  # fewer than a batch: only close() writes these
        await sink.close(5.0)
    assert await h.rows() == (1042, 1042)
    assert h.counts == {"written": 1042}
    assert h.files() == []
    with store.connect(h.pg.dsn(database=h.name)) as conn, conn.transaction():
        row = conn.execute(
            "SELECT ts, key_id, tenant_id, route, method, tool, status, bytes_in, bytes_out,"
            " duration_ms FROM usage_records WHERE bytes_in = 7"
        ).fetchone()
    r = rec(7)
    assert row == (
        datetime.fromtimestamp(r.ts, UTC),
        None,
        3,
        "/mcp/github",
        "tools/call",
        "tool1",
        200,
        7,
        70,
        7.5,
    )


async def test_pgbouncer_outage_spills_then_replays_every_record_once(h: Harness) -> None:
    sink = h.sink(h.database())
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(100):
            sink.record(rec(i))

        async def first_in() -> bool:
            return await h.rows() == (100, 100)

        await eventually(first_in)

        await trio.to_thread.run_sync(bouncer_refuse, h.pg, h.name)
        try:
            for i in range(100, 400):
                sink.record(rec(i))
                if i % 50 == 0:
                    await trio.sleep(0.1)  # several flushes: several spill files

            async def all_spilled() -> bool:
                return h.counts["spilled"] == 300

            await eventually(all_spilled)
            assert await h.rows() == (100, 100)
            assert sorted(h.spilled(), key=lambda r: r.bytes_in) == [
                rec(i) for i in range(100, 400)
            ]
            assert all(name.endswith(".jsonl") and "w0-1" in name for name in h.files())
        finally:
            await trio.to_thread.run_sync(bouncer_accept, h.pg, h.name)

        async def replayed() -> bool:
            return await h.rows() == (400, 400) and h.counts["replayed"] == 300

        await eventually(replayed)
        await sink.close(5.0)
    assert await h.rows() == (400, 400)
    assert h.files() == []
    assert h.counts == {"written": 100, "spilled": 300, "replayed": 300}
    assert {"audit_database_down", "audit_spilled", "audit_database_back"} <= h.log.events()
    spill_line = next(f for _, e, f in h.log.lines if e == "audit_spilled")
    assert set(spill_line) == {"records", "path", "reason"}
    assert h.name in spill_line["reason"]


async def test_unreachable_database_spills_and_another_worker_replays(h: Harness) -> None:
    down = h.sink(h.database(reachable=False), tag="w1-100")
    async with trio.open_nursery() as nursery:
        await nursery.start(down.run)
        for i in range(200):
            down.record(rec(i))

        async def spilled() -> bool:
            return h.counts["spilled"] == 200

        await eventually(spilled)
        await down.close(0.5)
        # Another worker (or the next process) with a working database takes them.
        up = h.sink(h.database(), tag="w2-200")
        await nursery.start(up.run)

        async def replayed() -> bool:
            return await h.rows() == (200, 200)

        await eventually(replayed)
        await up.close(5.0)
    assert h.files() == []
    assert h.counts == {"spilled": 200, "replayed": 200}


async def test_close_with_database_down_spills_everything_and_a_new_sink_replays(
    h: Harness,
) -> None:
    sink = h.sink(h.database(reachable=False), flush_interval=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(500):
            sink.record(rec(i))
        # The 1 s connect attempt outlasts the 0.3 s budget: the batch in flight is
        # given up (its journal sealed as a spill file) and the rest spilled with it.
        await sink.close(0.3)
    assert len(sink) == 0
    sink.record(rec(500))  # after close: written through to disk, not lost
    assert sorted(h.spilled(), key=lambda r: r.bytes_in) == [rec(i) for i in range(501)]
    assert h.counts == {"spilled": 501}
    assert await h.rows() == (0, 0)

    async with trio.open_nursery() as nursery:
        await nursery.start(h.sink(h.database(), tag="w0-2").run)

        async def replayed() -> bool:
            return await h.rows() == (501, 501)

        await eventually(replayed)
        nursery.cancel_scope.cancel()
    assert h.files() == []


async def test_buffer_overflow_spills_rather_than_drops(h: Harness) -> None:
    sink = h.sink(h.database(), max_buffer=100, batch_size=100_000, flush_interval=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(1000):
            sink.record(rec(i))  # far more than max_buffer per 0.3 s flush
            if i % 50 == 0:
                await trio.sleep(0.01)  # a request does I/O; a spill's fsync takes time

        async def delivered() -> bool:
            return await h.rows() == (1000, 1000) and h.files() == []

        await eventually(delivered)
        await sink.close(5.0)
    # The oldest went to disk and were replayed, the rest went straight in.
    assert h.counts["spilled"] > 0
    assert h.counts["spilled"] + h.counts["written"] == 1000
    assert h.counts["replayed"] == h.counts["spilled"]
    assert "dropped" not in h.counts
    assert ("warning", "audit_spilled") in {(lvl, e) for lvl, e, _ in h.log.lines}
    assert "buffer full" in {f.get("reason") for _, _, f in h.log.lines}


async def test_only_a_stalled_spill_past_the_hard_limit_drops_and_says_so(h: Harness) -> None:
    # 1000 records with no checkpoint between them: the spiller never gets to run, so
    # the buffer stops at its hard limit (4 x max_buffer) and counts what it discards.
    sink = h.sink(None, max_buffer=100, flush_interval=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(1000):
            sink.record(rec(i))
        assert len(sink) == 400
        await sink.close(1.0)
    assert h.counts == {"dropped": 600, "spilled": 400}
    assert ("error", "audit_dropped", {"records": 600, "reason": "buffer hard limit"}) in (
        h.log.lines
    )
    assert sorted(r.bytes_in for r in h.spilled()) == list(range(600, 1000))


async def test_spill_only_sink_keeps_everything_on_disk(h: Harness) -> None:
    sink = h.sink(None)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(30):
            sink.record(rec(i))
        await trio.sleep(0.2)
        sink.record(rec(30))
        await sink.close(1.0)
    assert sorted(h.spilled(), key=lambda r: r.bytes_in) == [rec(i) for i in range(31)]


def _stem(n: int) -> str:
    return f"audit-old-{n:04d}-000000"


async def test_workers_sharing_a_spill_dir_replay_each_file_once(h: Harness) -> None:
    h.spill_dir.mkdir()
    for n in range(40):
        write_spill_file(h.spill_dir, _stem(n), [rec(25 * n + i) for i in range(25)])
    sinks = [h.sink(h.database(), tag=f"w{k}-{k}") for k in range(4)]
    async with trio.open_nursery() as nursery:
        for sink in sinks:
            nursery.start_soon(sink.run)

        async def replayed() -> bool:
            return h.counts["replayed"] >= 1000 and h.files() == []

        await eventually(replayed)
        for sink in sinks:
            await sink.close(5.0)
    assert await h.rows() == (1000, 1000)
    assert h.counts == {"replayed": 1000}


async def test_claimed_files_of_dead_workers_are_reclaimed_live_ones_left(h: Harness) -> None:
    h.spill_dir.mkdir()
    d = h.spill_dir
    # A worker that died mid-replay: claimed, no lock held any more.
    (d / (_stem(0) + ".jsonl.replaying-dead-9")).write_bytes(encode_lines([rec(0), rec(1)]))
    # A worker still replaying: claimed and locked.
    live = d / (_stem(1) + ".jsonl.replaying-live-10")
    live.write_bytes(encode_lines([rec(2)]))
    # A writer that died between create and rename, long ago; and one writing now.
    old_temp = d / (_stem(2) + ".tmp")
    old_temp.write_bytes(encode_lines([rec(3)]) + b'[1700000000.0,1,null,"/mc')
    os.utime(old_temp, (time.time() - 3600, time.time() - 3600))
    fresh_temp = d / (_stem(3) + ".tmp")
    fresh_temp.write_bytes(encode_lines([rec(4)]))

    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        async with trio.open_nursery() as nursery:
            sink = h.sink(h.database())
            await nursery.start(sink.run)

            async def reclaimed() -> bool:
                return await h.rows() == (3, 3) and h.counts["replayed"] == 3

            await eventually(reclaimed)
            await trio.sleep(0.5)  # rescans happen; the live claim stays untouched
            assert sorted(h.files()) == sorted([live.name, fresh_temp.name])
            assert ("error", "audit_spill_corrupt") in {(lvl, e) for lvl, e, _ in h.log.lines}

            os.close(fd)  # the live worker "dies": its claim becomes reclaimable
            fd = -1

            async def live_claim_too() -> bool:
                # Its rows, then its file gone: the replay removes the file after the
                # commit, so the rows alone can be seen a moment before.
                return await h.rows() == (4, 4) and h.files() == [fresh_temp.name]

            await eventually(live_claim_too)
            await sink.close(5.0)
    finally:
        if fd >= 0:
            os.close(fd)
    assert h.files() == [fresh_temp.name]


async def test_replay_against_a_dead_database_gives_files_back(h: Harness) -> None:
    h.spill_dir.mkdir()
    for n in range(3):
        write_spill_file(h.spill_dir, _stem(n), [rec(n)])
    before = h.files()
    async with trio.open_nursery() as nursery:
        sink = h.sink(h.database(reachable=False))
        await nursery.start(sink.run)

        async def tried() -> bool:
            return "audit_database_down" in h.log.events()

        await eventually(tried)
        await trio.sleep(0.3)
        await sink.close(0.5)
    assert h.files() == before  # renamed back to .jsonl, no claim left behind
    assert "replayed" not in h.counts


async def test_a_batch_replayed_after_its_commit_is_stored_once(h: Harness) -> None:
    # A crash between a commit and the removal of its file replays a batch PostgreSQL
    # already has: the record keys make that replay insert nothing.
    sink = h.sink(h.database())
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(100):
            sink.record(rec(i))
        await sink.close(5.0)
        h.spill_dir.mkdir(exist_ok=True)
        write_spill_file(h.spill_dir, _stem(0), [rec(i) for i in range(50, 150)])
        again = h.sink(h.database(), tag="w0-2")
        await nursery.start(again.run)

        async def replayed() -> bool:
            return h.counts["replayed"] == 100

        await eventually(replayed)
        await again.close(5.0)
    assert await h.rows() == (150, 150)
    assert h.files() == []
