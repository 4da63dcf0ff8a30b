"""The trio Redis client against a real redis-server: replies, pipelining, timeouts, outages."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from proxy.store.redis import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    RedisClient,
    RedisError,
    RedisTimeout,
    RedisUnavailable,
    jittered,
    next_delay,
)
from tests.support.redis_server import RedisServer, running_redis

GUARD = 30.0
"""How long to wait for what must happen: a guard against a hang, not a speed limit."""


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


async def start_client(nursery: trio.Nursery, server: RedisServer, **kw: object) -> RedisClient:
    client = RedisClient(server.host, server.port, **kw)  # type: ignore[arg-type]
    await nursery.start(client.run)
    return client


@pytest.fixture
async def client(redis_server: RedisServer, nursery: trio.Nursery) -> RedisClient:
    client = await start_client(nursery, redis_server)
    assert client.available
    return client


class StateLog:
    """An ``on_state_change`` callback that records transitions and can wait for one."""

    def __init__(self) -> None:
        self.states: list[bool] = []
        self._changed = trio.Event()

    def __call__(self, up: bool) -> None:
        self.states.append(up)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, up: bool) -> float:
        """Wait until the client's state is ``up``; the seconds it took."""
        start = trio.current_time()
        while not self.states or self.states[-1] != up:
            await self._changed.wait()
        return trio.current_time() - start


async def test_basic_commands(client: RedisClient) -> None:
    assert await client.execute("SET", "k", "v") == b"OK"
    assert await client.execute("GET", "k") == b"v"
    assert await client.execute("GET", "missing") is None
    assert await client.execute("INCR", "n") == 1
    assert await client.execute("INCRBY", "n", 41) == 42
    assert await client.execute("INCRBYFLOAT", "f", 2.5) == b"2.5"
    assert await client.execute("EXPIRE", "n", 100) == 1
    assert 0 < await client.execute("TTL", "n") <= 100
    assert await client.execute("DEL", "k", "n", "missing") == 2
    assert await client.execute("EXISTS", "k") == 0


async def test_binary_values_and_arrays(client: RedisClient) -> None:
    blob = bytes(range(256)) * 300  # > one receive buffer, with CR/LF/NUL inside
    assert await client.execute("SET", b"bin\x00key", blob) == b"OK"
    assert await client.execute("GET", b"bin\x00key") == blob
    await client.execute("RPUSH", "list", "a", b"\r\n", 3)
    assert await client.execute("LRANGE", "list", 0, -1) == [b"a", b"\r\n", b"3"]
    assert await client.execute("MGET", "list-missing", b"bin\x00key") == [None, blob]
    assert await client.execute("LRANGE", "nothing", 0, -1) == []


async def test_error_replies_raise_and_connection_survives(client: RedisClient) -> None:
    await client.execute("SET", "s", "x")
    with pytest.raises(RedisError, match="WRONGTYPE"):
        await client.execute("LPUSH", "s", "y")
    with pytest.raises(RedisError, match="unknown command"):
        await client.execute("NOSUCHCOMMAND")
    assert client.available
    assert await client.execute("GET", "s") == b"x"


async def test_concurrent_commands_get_their_own_replies(client: RedisClient) -> None:
    # 50 tasks x 20 commands, all multiplexed on one socket: every INCR must see its own
    # key's next value and every ECHO its own payload, or replies were mismatched.
    results: dict[int, list[object]] = {}

    async def worker(i: int) -> None:
        seen: list[object] = []
        for j in range(10):
            seen.append(await client.execute("INCR", f"counter:{i}"))
            seen.append(await client.execute("ECHO", f"{i}:{j}"))
        results[i] = seen

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(worker, i)
    for i in range(50):
        expected: list[object] = []
        for j in range(10):
            expected += [j + 1, f"{i}:{j}".encode()]
        assert results[i] == expected
    assert len(results) * 20 == 1000


async def test_evalsha_falls_back_to_eval_on_noscript(client: RedisClient) -> None:
    script = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
    sha = await client.script_load(script)
    assert await client.evalsha(sha, ["e"], [5]) == 5
    await client.execute("SCRIPT", "FLUSH")
    assert await client.execute("SCRIPT", "EXISTS", sha) == [0]
    assert await client.evalsha(sha, ["e"], [2]) == 7  # NOSCRIPT -> EVAL
    assert await client.execute("SCRIPT", "EXISTS", sha) == [1]  # EVAL cached it again
    with pytest.raises(RedisError, match="NOSCRIPT"):  # a sha we never loaded
        await client.evalsha("0" * 40, [], [])


async def test_timeout_keeps_fifo_in_sync(redis_server: RedisServer, nursery: trio.Nursery) -> None:
    client = await start_client(nursery, redis_server, command_timeout=0.1)
    # Paused 15 times the command timeout: the timeout answers, not Redis.
    assert await client.execute("CLIENT", "PAUSE", 1500) == b"OK"
    with pytest.raises(RedisTimeout):
        await client.execute("ECHO", "late")
    with pytest.raises(RedisTimeout):
        await client.execute("ECHO", "later")
    assert client.available  # a slow reply is not an outage
    await trio.sleep(1.6)  # past the pause (it began before the OK above)
    # The late replies to "late"/"later" arrive first and must be dropped, not given to us.
    assert await client.execute("ECHO", "mine") == b"mine"
    assert await client.execute("ECHO", "next") == b"next"


async def test_caller_cancellation_keeps_fifo_in_sync(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    client = await start_client(nursery, redis_server, command_timeout=GUARD)
    await client.execute("CLIENT", "PAUSE", 1500)
    with trio.move_on_after(0.02) as scope:
        await client.execute("ECHO", "abandoned")
    assert scope.cancelled_caught
    assert await client.execute("ECHO", "mine") == b"mine"  # once the pause is over


async def test_stalled_connection_is_replaced(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    log = StateLog()
    client = await start_client(
        nursery, redis_server, command_timeout=0.2, stall_timeout=0.3, on_state_change=log
    )
    # Paused ten times the stall timeout: the connection is given up while Redis is
    # silent (once it answers nothing is overdue any more).
    await client.execute("CLIENT", "PAUSE", 3000)
    with pytest.raises(RedisTimeout):
        await client.execute("PING")
    with trio.fail_after(GUARD):
        await log.wait_for(False)
        await log.wait_for(True)  # the new connection's PING waits out the pause
    assert log.states == [True, False, True]
    assert await client.execute("ECHO", "fresh") == b"fresh"


def test_reconnect_back_off_doubles_up_to_its_cap_with_jitter() -> None:
    delays = [BACKOFF_MIN]
    for _ in range(20):
        delays.append(next_delay(delays[-1]))
    assert delays[:4] == [BACKOFF_MIN, 2 * BACKOFF_MIN, 4 * BACKOFF_MIN, 8 * BACKOFF_MIN]
    assert max(delays) == BACKOFF_MAX == delays[-1] == 2.0
    assert all(d / 2 <= jittered(d) <= d for d in delays for _ in range(50))


async def test_outage_fails_fast_and_reconnects(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    log = StateLog()
    states = log.states
    # Commands would wait far beyond the guard below for a reply: an outage must be
    # told at once, from the lost connection, not by a timeout.
    client = await start_client(
        nursery, redis_server, on_state_change=log, command_timeout=10 * GUARD
    )
    assert states == [True]
    await client.execute("SET", "before", 1)

    redis_server.stop()
    with trio.fail_after(GUARD), pytest.raises(RedisUnavailable):
        await client.execute("GET", "before")
    assert not client.available
    assert states == [True, False]
    with trio.fail_after(GUARD), pytest.raises(RedisUnavailable):
        await client.execute("PING")  # while down: refused, nothing waited on

    redis_server.start()
    with trio.fail_after(GUARD):  # reconnect attempts go on, at most 2 s apart
        await log.wait_for(True)
    assert states == [True, False, True]
    assert await client.execute("GET", "before") is None  # a fresh, empty server
    assert await client.execute("INCR", "after") == 1


async def test_starts_degraded_when_redis_is_down(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    redis_server.stop()
    log = StateLog()
    client = await start_client(nursery, redis_server, on_state_change=log)
    assert not client.available  # start() returned all the same
    with pytest.raises(RedisUnavailable):
        await client.execute("PING")
    redis_server.start()
    with trio.fail_after(GUARD):
        await log.wait_for(True)
    assert await client.execute("PING") == b"PONG"


async def test_db_selection(redis_server: RedisServer, nursery: trio.Nursery) -> None:
    db3 = await start_client(nursery, redis_server, db=3)
    db0 = await start_client(nursery, redis_server)
    await db3.execute("SET", "where", "three")
    assert await db0.execute("GET", "where") is None
    assert await db3.execute("GET", "where") == b"three"


async def test_throughput(client: RedisClient) -> None:
    """10k INCRs from 20 tasks; printed, not asserted (run with -s to see it)."""
    tasks, per_task = 20, 500

    async def worker(i: int) -> None:
        for _ in range(per_task):
            await client.execute("INCR", f"tp:{i}")

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(tasks):
            nursery.start_soon(worker, i)
    elapsed = time.perf_counter() - start
    for i in range(tasks):
        assert await client.execute("GET", f"tp:{i}") == str(per_task).encode()
    print(f"\nredis throughput: {tasks * per_task / elapsed:,.0f} ops/s ({elapsed:.3f} s)")
