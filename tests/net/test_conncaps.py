"""Connection caps against a real redis-server: shared caps, dead workers, outages.

Each ``ConnectionCaps`` stands for one worker process (its own owner id and its own
Redis connection). A killed worker is one whose ``run`` task is stopped without any
release; Redis outages are a real ``redis-server`` stopped and started again (empty).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.conncaps import (
    ACQUIRE_LUA,
    OWNERS_KEY,
    RELEASE_LUA,
    SYNC_LUA,
    CapDecision,
    FailMode,
    Lease,
    scope_key,
)
from proxy.net.conncaps import ConnectionCaps, ip_scope, tenant_scope
from proxy.store.redis import RedisClient
from tests.support.redis_server import RedisServer, running_redis

TTL = 1.0
"""Lease TTL in these tests: a dead worker's connections are freed after this."""
GUARD = 30.0
"""How long to wait for what must happen (heartbeats, reconnects): a guard against a
hang, never a measure of speed."""


class Log:
    """A stand-in for the worker's structured logger, keeping every event."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, **fields: Any) -> None:
        self.events.append((level, event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self._add("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._add("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._add("error", event, **fields)

    def names(self) -> list[str]:
        return [event for _, event, _ in self.events]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


async def start_client(
    nursery: trio.Nursery, server: RedisServer, command_timeout: float = 0.25
) -> RedisClient:
    client = RedisClient(server.host, server.port, command_timeout=command_timeout)
    await nursery.start(client.run)
    return client


@pytest.fixture
async def admin(redis_server: RedisServer, nursery: trio.Nursery) -> RedisClient:
    """A client of its own, to look at Redis from outside the workers."""
    return await start_client(nursery, redis_server)


class Worker:
    """One worker: its Redis client and its ConnectionCaps, with decisions recorded."""

    def __init__(self, client: RedisClient, caps: ConnectionCaps, log: Log) -> None:
        self.client = client
        self.caps = caps
        self.log = log
        self.decisions: list[CapDecision] = []
        caps.on_decision = self.decisions.append

    async def take(self, scope: str, limit: int, n: int) -> list[Lease]:
        """Try ``n`` acquisitions at once; the leases granted."""
        got: list[Lease | CapDecision] = []

        async def one() -> None:
            got.append(await self.caps.acquire(scope, limit))

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
        return [r for r in got if isinstance(r, Lease)]


async def start_worker(
    nursery: trio.Nursery,
    server: RedisServer,
    *,
    fail_mode: FailMode = "open",
    workers: int = 4,
    lease_ttl: float = TTL,
    command_timeout: float = 0.25,
) -> Worker:
    client = await start_client(nursery, server, command_timeout)
    log = Log()
    caps = ConnectionCaps(
        client, fail_mode=fail_mode, workers=workers, lease_ttl=lease_ttl, log=log
    )
    await nursery.start(caps.run)
    return Worker(client, caps, log)


async def fields(admin: RedisClient, scope: str) -> dict[str, int]:
    """The scope's hash: owner -> count."""
    raw = await admin.execute("HGETALL", scope_key(scope))
    return {raw[i].decode(): int(raw[i + 1]) for i in range(0, len(raw), 2)}


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` until it holds; fail after ``GUARD`` seconds."""
    with trio.fail_after(GUARD):
        while True:
            if await check():
                return
            await trio.sleep(0.01)


async def wait_until_down(*clients: RedisClient) -> None:
    async def down() -> bool:
        return not any(c.available for c in clients)

    await eventually(down)


async def wait_until_up(*clients: RedisClient) -> None:
    async def up() -> bool:
        return all(c.available for c in clients)

    await eventually(up)


async def fields_become(admin: RedisClient, scope: str, expected: dict[str, int]) -> None:
    async def check() -> bool:
        return await fields(admin, scope) == expected

    await eventually(check)


@pytest.fixture
async def two_workers(
    redis_server: RedisServer, nursery: trio.Nursery
) -> AsyncIterator[tuple[Worker, Worker]]:
    a = await start_worker(nursery, redis_server)
    b = await start_worker(nursery, redis_server)
    yield a, b


async def test_two_owners_share_one_cap(
    two_workers: tuple[Worker, Worker], admin: RedisClient
) -> None:
    a, b = two_workers
    scope = ip_scope("127.0.0.5")
    got_a: list[Lease] = []
    got_b: list[Lease] = []

    async def take(worker: Worker, into: list[Lease]) -> None:
        into += await worker.take(scope, 5, 10)

    async with trio.open_nursery() as nursery:  # 20 concurrent tries for 5 slots
        nursery.start_soon(take, a, got_a)
        nursery.start_soon(take, b, got_b)
    assert len(got_a) + len(got_b) == 5
    assert all(lease.source == "redis" for lease in got_a + got_b)
    refused = [d for d in a.decisions + b.decisions if not d.allowed]
    assert len(refused) == 15
    assert all(d == CapDecision(False, scope, 5, 5, "redis") for d in refused)
    assert await fields(admin, scope) == {
        owner: n for owner, n in ((a.caps.owner, len(got_a)), (b.caps.owner, len(got_b))) if n
    }

    # Releasing one frees exactly one slot, for any owner.
    holder, other = (a, b) if got_a else (b, a)
    await holder.caps.release((got_a or got_b)[0])
    assert len(await other.take(scope, 5, 3)) == 1
    assert sum((await fields(admin, scope)).values()) == 5

    # Another scope has a cap of its own.
    assert isinstance(await a.caps.acquire(tenant_scope("acme"), 1), Lease)
    assert isinstance(await b.caps.acquire(tenant_scope("acme"), 1), CapDecision)


async def test_release_everything_leaves_nothing_in_redis(
    two_workers: tuple[Worker, Worker], admin: RedisClient
) -> None:
    a, _ = two_workers
    scope = tenant_scope("acme")
    leases = await a.take(scope, 3, 3)
    assert len(leases) == 3
    for lease in leases:
        await a.caps.release(lease)
        await a.caps.release(lease)  # twice is harmless
    assert await admin.execute("EXISTS", scope_key(scope)) == 0
    assert len(a.caps.local) == 0


async def test_release_works_while_the_task_is_cancelled(
    two_workers: tuple[Worker, Worker], admin: RedisClient
) -> None:
    a, _ = two_workers
    scope = ip_scope("10.1.1.1")

    async def connection() -> None:
        lease = await a.caps.acquire(scope, 2)
        assert isinstance(lease, Lease)
        try:
            await trio.sleep_forever()
        finally:
            await a.caps.release(lease)  # runs under cancellation

    with trio.move_on_after(0.1):
        await connection()
    assert await fields(admin, scope) == {}


async def _owner_deadline(admin: RedisClient, owner: str) -> int | None:
    """The owner's heartbeat deadline in OWNERS_KEY (Redis time, ms)."""
    score = await admin.execute("ZSCORE", OWNERS_KEY, owner)
    return None if score is None else int(score)


async def _redis_ms(admin: RedisClient) -> int:
    seconds, micros = await admin.execute("TIME")
    return int(seconds) * 1000 + int(micros) // 1000


async def test_a_killed_owner_is_freed_after_the_ttl(
    redis_server: RedisServer, nursery: trio.Nursery, admin: RedisClient
) -> None:
    scope = ip_scope("192.0.2.9")
    survivor = await start_worker(nursery, redis_server)
    async with trio.open_nursery() as doomed_nursery:
        doomed = await start_worker(doomed_nursery, redis_server)
        leases = await doomed.take(scope, 3, 3)
        assert len(leases) == 3
        # Heartbeats keep the doomed owner's leases alive past their first deadline.
        first = await _owner_deadline(admin, doomed.caps.owner)
        assert first is not None

        async def renewed_past_first() -> bool:
            deadline = await _owner_deadline(admin, doomed.caps.owner)
            return deadline is not None and deadline > first + TTL * 1000

        await eventually(renewed_past_first)
        assert isinstance(await survivor.caps.acquire(scope, 3), CapDecision)
        doomed_nursery.cancel_scope.cancel()  # SIGKILL: no release, no aclose
    last = await _owner_deadline(admin, doomed.caps.owner)
    assert last is not None

    # Once the dead owner's deadline passes its connections stop counting; never sooner:
    # an acquisition that ended (in Redis time) before the deadline must be refused.
    async def freed() -> bool:
        got = await survivor.caps.acquire(scope, 3)
        if await _redis_ms(admin) < last:
            assert isinstance(got, CapDecision), "freed before the dead owner's deadline"
        return isinstance(got, Lease)

    await eventually(freed)
    assert survivor.decisions[-1] == CapDecision(True, scope, 3, 1, "redis")
    assert await fields(admin, scope) == {survivor.caps.owner: 1}  # dead field deleted

    async def pruned() -> bool:  # a heartbeat prunes the dead owner
        owners: list[bytes] = await admin.execute("ZRANGE", OWNERS_KEY, 0, -1)
        return owners == [survivor.caps.owner.encode()]

    await eventually(pruned)
    assert doomed.caps.owner not in await fields(admin, scope)


async def test_graceful_close_frees_everything_at_once(
    redis_server: RedisServer, nursery: trio.Nursery, admin: RedisClient
) -> None:
    scope = tenant_scope("acme")
    survivor = await start_worker(nursery, redis_server)
    async with trio.open_nursery() as leaving_nursery:
        leaving = await start_worker(leaving_nursery, redis_server)
        assert len(await leaving.take(scope, 2, 2)) == 2
        assert len(await leaving.take(ip_scope("10.0.0.1"), 2, 1)) == 1
        await leaving.caps.aclose()  # run() returns on its own
        leaving_nursery.cancel_scope.cancel()  # the Redis client
    assert await fields(admin, scope) == {}
    assert await admin.execute("ZSCORE", OWNERS_KEY, leaving.caps.owner) is None
    assert len(await survivor.take(scope, 2, 2)) == 2


async def outage_worker(
    nursery: trio.Nursery, server: RedisServer, fail_mode: FailMode
) -> tuple[Worker, list[Lease]]:
    """A worker holding 2 Redis leases of ip:10.9.9.9 when Redis goes away. Its command
    timeout is beyond GUARD: a decision that waited on Redis would fail the test."""
    worker = await start_worker(
        nursery, server, fail_mode=fail_mode, workers=4, command_timeout=10 * GUARD
    )
    held = await worker.take(ip_scope("10.9.9.9"), 8, 2)
    assert len(held) == 2
    server.stop()
    await wait_until_down(worker.client)
    return worker, held


async def test_redis_down_fail_open_enforces_the_full_cap_locally(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    worker, _ = await outage_worker(nursery, redis_server, "open")
    scope = ip_scope("10.9.9.9")
    with trio.fail_after(GUARD):  # no waiting on a dead Redis (see outage_worker)
        local = await worker.take(scope, 8, 10)
    assert len(local) == 6  # the worker's own count, Redis leases included, up to 8
    assert {lease.source for lease in local} == {"local"}
    assert worker.decisions[-1] == CapDecision(False, scope, 8, 8, "local")
    # A scope never seen before: the full cap too.
    assert len(await worker.take(tenant_scope("t"), 3, 5)) == 3
    assert "conncaps_redis_unavailable" in worker.log.names()


async def test_redis_down_fail_closed_enforces_a_share_locally(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    worker, held = await outage_worker(nursery, redis_server, "closed")
    # 8 // 4 workers = 2, and the worker already holds 2.
    decision = await worker.caps.acquire(ip_scope("10.9.9.9"), 8)
    assert decision == CapDecision(False, ip_scope("10.9.9.9"), 2, 2, "local")
    await worker.caps.release(held[0])
    assert isinstance(await worker.caps.acquire(ip_scope("10.9.9.9"), 8), Lease)
    # A cap smaller than the number of workers cannot be split: refused.
    assert await worker.caps.acquire(tenant_scope("small"), 3) == CapDecision(
        False, tenant_scope("small"), 0, 0, "local"
    )
    assert len(await worker.take(tenant_scope("big"), 12, 5)) == 3


async def test_redis_restart_recovers_by_itself(
    redis_server: RedisServer, nursery: trio.Nursery, admin: RedisClient
) -> None:
    scope = ip_scope("10.9.9.9")
    worker, held = await outage_worker(nursery, redis_server, "open")
    local = await worker.take(scope, 8, 1)
    assert [lease.source for lease in local] == ["local"]
    await worker.caps.release(held[0])  # a Redis lease released while Redis is away

    redis_server.start()  # empty: everything Redis knew is gone
    await wait_until_up(worker.client, admin)
    # The heartbeat notices at once and writes back what this worker holds (2 leases).
    await fields_become(admin, scope, {worker.caps.owner: 2})
    assert await admin.execute("ZSCORE", OWNERS_KEY, worker.caps.owner) is not None
    assert "conncaps_redis_restored" in worker.log.names()

    # New acquisitions go to Redis again, and count the leases from before.
    lease = await worker.caps.acquire(scope, 3)
    assert isinstance(lease, Lease)
    assert (lease.source, lease.count) == ("redis", 3)
    other = await start_worker(nursery, redis_server)
    assert await other.caps.acquire(scope, 3) == CapDecision(False, scope, 3, 3, "redis")

    # Every lease, however it was granted, comes off Redis when released.
    for old in [held[1], *local, lease]:
        await worker.caps.release(old)
    assert await fields(admin, scope) == {}
    assert len(await other.take(scope, 3, 3)) == 3


async def test_the_owner_is_back_in_redis_at_once_after_a_restart(
    redis_server: RedisServer, nursery: trio.Nursery, admin: RedisClient
) -> None:
    # Heartbeats 10 s apart: only the quick polling while Redis is away can do this.
    worker = await start_worker(nursery, redis_server, lease_ttl=30)
    scope = tenant_scope("acme")
    assert len(await worker.take(scope, 3, 2)) == 2
    redis_server.stop()
    await wait_until_down(worker.client)
    redis_server.start()
    await wait_until_up(admin)
    # The client's reconnect back-off, then one poll of the heartbeat's.
    await fields_become(admin, scope, {worker.caps.owner: 2})
    assert await admin.execute("ZSCORE", OWNERS_KEY, worker.caps.owner) is not None


async def test_an_acquisition_after_redis_lost_everything_still_counts_right(
    redis_server: RedisServer, nursery: trio.Nursery, admin: RedisClient
) -> None:
    # FLUSHALL: no disconnect to notice, and the next heartbeat is 10 s away. The
    # acquisition finds its field gone and takes the count it sent along instead.
    worker = await start_worker(nursery, redis_server, lease_ttl=30)
    scope = tenant_scope("acme")
    assert len(await worker.take(scope, 3, 2)) == 2
    await admin.execute("FLUSHALL")
    first = await worker.caps.acquire(scope, 3)
    assert isinstance(first, Lease)
    assert (first.source, first.count) == ("redis", 3)
    assert isinstance(await worker.caps.acquire(scope, 3), CapDecision)
    assert await fields(admin, scope) == {worker.caps.owner: 3}
    # Its other scopes are written back by a heartbeat woken at once.
    other_scope = ip_scope("10.2.2.2")
    assert len(await worker.take(other_scope, 5, 1)) == 1
    await admin.execute("FLUSHALL")
    assert isinstance(await worker.caps.acquire(scope, 5), Lease)
    await fields_become(admin, other_scope, {worker.caps.owner: 1})


async def test_a_timed_out_acquisition_falls_back_and_is_repaired(
    redis_server: RedisServer, nursery: trio.Nursery, admin: RedisClient
) -> None:
    worker = await start_worker(nursery, redis_server, lease_ttl=0.6, command_timeout=0.1)
    scope = ip_scope("10.7.7.7")
    # Paused far longer than any guard: the answer must come from the command timeout.
    await admin.execute("CLIENT", "PAUSE", round(10 * GUARD * 1000), "WRITE")
    try:
        with trio.fail_after(GUARD):
            lease = await worker.caps.acquire(scope, 5)
    finally:
        await admin.execute("CLIENT", "UNPAUSE")
    assert isinstance(lease, Lease)
    assert lease.source == "local"
    await worker.caps.release(lease)  # local only: Redis's +1 (if it ran) is left over
    # The late EVALSHA runs after the pause; a heartbeat then writes the true count (0).
    await fields_become(admin, scope, {})
    again = await worker.caps.acquire(scope, 5)
    assert isinstance(again, Lease)
    assert (again.source, again.count) == ("redis", 1)


async def test_without_redis_the_caps_are_local(nursery: trio.Nursery) -> None:
    log = Log()
    caps = ConnectionCaps(None, fail_mode="closed", workers=2, log=log)
    await nursery.start(caps.run)
    leases = [await caps.acquire("ip:x", 4) for _ in range(3)]
    assert [isinstance(x, Lease) for x in leases] == [True, True, False]
    for lease in leases:
        if isinstance(lease, Lease):
            await caps.release(lease)
    assert len(caps.local) == 0
    assert log.events == []
    with pytest.raises(ValueError):
        await caps.acquire("ip:x", 0)
    await caps.aclose()


# -- the Lua scripts on their own ---------------------------------------------------------


async def acquire_raw(
    admin: RedisClient,
    owner: str,
    limit: int,
    *,
    mode: str = "r",
    value: int = 0,
    extra: int = 0,
    ttl_ms: int = 10_000,
) -> list[int]:
    reply = await admin.execute(
        "EVAL", ACQUIRE_LUA, 2, "sb:conn:t", OWNERS_KEY,
        owner, limit, mode, value, extra, ttl_ms, 20_000,
    )  # fmt: skip
    assert isinstance(reply, list)
    return [int(x) for x in reply]


async def test_lua_acquire_counts_live_owners_only(admin: RedisClient) -> None:
    assert await acquire_raw(admin, "a", 3) == [1, 1, 0]  # "a" was not alive before
    assert await acquire_raw(admin, "a", 3, value=1) == [1, 2, 1]
    assert await acquire_raw(admin, "b", 3) == [1, 3, 0]
    assert await acquire_raw(admin, "b", 3, value=1) == [0, 3, 1]  # full: refused
    assert await admin.execute("HGET", "sb:conn:t", "b") == b"1"
    # "a" dies: its deadline is in the past.
    await admin.execute("ZADD", OWNERS_KEY, 1, "a")
    assert await acquire_raw(admin, "b", 3, value=1) == [1, 2, 1]
    assert await admin.execute("HGETALL", "sb:conn:t") == [b"b", b"2"]
    # An owner with a field but no deadline at all is dead too.
    await admin.execute("HSET", "sb:conn:t", "ghost", 7)
    assert await acquire_raw(admin, "b", 3, value=2) == [1, 3, 1]
    assert await admin.execute("HEXISTS", "sb:conn:t", "ghost") == 0


async def test_lua_acquire_takes_the_value_only_where_the_field_is_gone(
    admin: RedisClient,
) -> None:
    # The field is there: value is ignored, extra (unsynced leases) is added.
    await acquire_raw(admin, "a", 10)
    assert await acquire_raw(admin, "a", 10, value=7, extra=2) == [1, 4, 1]
    # Redis lost the field (say it restarted): the owner's own count is taken.
    await admin.execute("DEL", "sb:conn:t")
    assert await acquire_raw(admin, "a", 10, value=6, extra=2) == [1, 7, 1]
    # Refused: the owner's count is written all the same (it holds those connections).
    await admin.execute("DEL", "sb:conn:t")
    assert await acquire_raw(admin, "a", 5, value=6) == [0, 6, 1]
    assert await admin.execute("HGET", "sb:conn:t", "a") == b"6"


async def test_lua_acquire_absolute_overwrites_the_field(admin: RedisClient) -> None:
    for value in range(3):
        await acquire_raw(admin, "a", 10, value=value)
    assert await admin.execute("HGET", "sb:conn:t", "a") == b"3"
    # A phantom: the owner holds only 1.
    assert await acquire_raw(admin, "a", 10, mode="a", value=1, extra=1) == [1, 2, 1]
    await acquire_raw(admin, "b", 10, value=0)
    await admin.execute("HSET", "sb:conn:t", "b", 8)
    # Refused with an absolute 0: the owner's field is deleted.
    assert await acquire_raw(admin, "a", 8, mode="a", value=0) == [0, 8, 1]
    assert await admin.execute("HEXISTS", "sb:conn:t", "a") == 0


async def test_lua_acquire_keeps_the_keys_expiring(admin: RedisClient) -> None:
    before = await _redis_ms(admin)
    await acquire_raw(admin, "a", 3, ttl_ms=5000)
    after = await _redis_ms(admin)
    assert 0 < await admin.execute("PTTL", "sb:conn:t") <= 20_000
    assert 0 < await admin.execute("PTTL", OWNERS_KEY) <= 20_000
    # The owner's deadline: Redis's own clock when the script ran, plus the TTL.
    deadline = int(await admin.execute("ZSCORE", OWNERS_KEY, "a"))
    assert before + 5000 <= deadline <= after + 5000


async def test_lua_release_deletes_at_zero_and_reports_loss(admin: RedisClient) -> None:
    await acquire_raw(admin, "a", 3, value=1)
    release = ("EVAL", RELEASE_LUA, 1, "sb:conn:t", "a")
    assert await admin.execute(*release) == 1
    assert await admin.execute(*release) == 0
    assert await admin.execute("EXISTS", "sb:conn:t") == 0
    assert await admin.execute(*release) == -1  # Redis had lost it: nothing written
    assert await admin.execute("EXISTS", "sb:conn:t") == 0


async def test_lua_sync(admin: RedisClient) -> None:
    await acquire_raw(admin, "a", 10, value=2)  # field 3
    await admin.execute("HSET", "sb:conn:u", "a", 5)
    await admin.execute("ZADD", OWNERS_KEY, 1, "dead")
    present = await admin.execute(
        "EVAL", SYNC_LUA, 4, OWNERS_KEY, "sb:conn:t", "sb:conn:u", "sb:conn:v",
        "a", 5000, 20_000,
        "r", 9, 1,  # field there: +1
        "a", 2, 0,  # absolute
        "r", 4, 0,  # field gone: the value
    )  # fmt: skip
    assert present == 1
    assert await admin.execute("HGET", "sb:conn:t", "a") == b"4"
    assert await admin.execute("HGET", "sb:conn:u", "a") == b"2"
    assert await admin.execute("HGET", "sb:conn:v", "a") == b"4"
    assert 0 < await admin.execute("PTTL", "sb:conn:u") <= 20_000
    assert await admin.execute("ZRANGE", OWNERS_KEY, 0, -1) == [b"a"]  # the dead pruned
    assert (
        await admin.execute(
            "EVAL", SYNC_LUA, 2, OWNERS_KEY, "sb:conn:t", "b", 5000, 20_000, "a", 0, 0
        )
        == 0
    )  # "b" was not alive
    assert await admin.execute("HGETALL", "sb:conn:t") == [b"a", b"4"]  # no field of b's
