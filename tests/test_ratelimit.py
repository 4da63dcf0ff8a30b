"""proxy.ratelimit: GCRA against a token-bucket reference, headers, the local pre-check
and fallback, and GCRA_LUA against a real redis-server where one is installed."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.ratelimit import (
    GCRA_LUA,
    US,
    Decision,
    LocalLimiter,
    Rate,
    combine,
    gcra,
    gcra_multi,
    parse_reply,
    script_args,
)


class TokenBucket:
    """The reference: ``burst`` tokens of ``interval`` time units each, refilled
    continuously, one token per request; integer arithmetic throughout."""

    def __init__(self, interval: int, burst: int) -> None:
        self.interval, self.capacity = interval, burst * interval
        self.level, self.last = self.capacity, -1

    def take(self, now: int, cost: int = 1) -> tuple[bool, int]:
        if self.last >= 0:
            self.level = min(self.capacity, self.level + (now - self.last))
        self.last = now
        need = cost * self.interval
        if self.level >= need:
            self.level -= need
            return True, self.level // self.interval
        return False, need - self.level


@settings(max_examples=300, deadline=None)
@given(
    interval=st.integers(1, 10_000),
    burst=st.integers(1, 50),
    cost=st.integers(1, 3),
    gaps=st.lists(st.integers(0, 30_000), min_size=1, max_size=80),
)
def test_gcra_matches_token_bucket(interval: int, burst: int, cost: int, gaps: list[int]) -> None:
    bucket, tat, now = TokenBucket(interval, burst), None, 10**15
    for gap in gaps:
        now += gap
        result = gcra(now, tat, interval, burst, cost)
        allowed, detail = bucket.take(now, cost)
        assert result.allowed == allowed
        if allowed:
            assert result.remaining == detail and result.retry_after == 0
        else:
            assert result.retry_after == detail  # exactly when the tokens are there
            assert result.tat == (tat if tat is not None and tat > now else now)
        tat = result.tat
        assert 0 <= result.reset <= burst * interval


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 100), period=st.sampled_from([1, 10, 60, 3600]))
def test_exactly_burst_then_refused(limit: int, period: int) -> None:
    rate, now, tat = Rate(limit, period), 5 * US, None
    interval = rate.interval_us
    for n in range(limit):
        result = gcra(now, tat, interval, rate.capacity)
        assert result.allowed and result.remaining == limit - n - 1
        assert result.reset == (n + 1) * interval
        tat = result.tat
    refused = gcra(now, tat, interval, rate.capacity)
    assert not refused.allowed and refused.retry_after == interval and refused.remaining == 0
    assert not gcra(now + interval - 1, tat, interval, rate.capacity).allowed
    assert gcra(now + interval, tat, interval, rate.capacity).allowed


def test_rate() -> None:
    assert Rate(3, 1).interval_us == 333_333
    assert Rate(10, 60, burst=2).capacity == 2
    assert Rate(100, 60).policy() == b"100;w=60"
    assert Rate(5, 0.5).policy() == b"5;w=0.5"
    with pytest.raises(ValueError):
        Rate(0, 1)


def test_headers() -> None:
    rate = Rate(10, 60)
    ok = Decision.from_result(gcra(0, None, rate.interval_us, 10), rate)
    assert ok.headers() == [
        (b"ratelimit-limit", b"10"),
        (b"ratelimit-remaining", b"9"),
        (b"ratelimit-reset", b"6"),
        (b"ratelimit-policy", b"10;w=60"),
    ]
    refused = Decision(False, rate, 0, 60 * US, 1, 429)
    assert (b"retry-after", b"1") in refused.headers()  # never "0"
    assert Decision(False, rate, 0, 0, 2_500_000, 429).headers()[-1] == (b"retry-after", b"3")
    assert Decision.unavailable().status == 503
    assert Decision.unavailable().headers() == [(b"retry-after", b"1")]


def test_combine() -> None:
    rate = Rate(10, 1)
    a = Decision(True, rate, 5, 100)
    b = Decision(True, rate, 2, 50)
    c = Decision(False, rate, 0, 70, 30, 429)
    d = Decision(False, rate, 0, 90, 80, 429)
    assert combine([a, b]) is b
    assert combine([a, c, d]) is d
    assert combine([d, Decision.unavailable(1)]).status == 503


def test_multi_is_all_or_nothing() -> None:
    wide, narrow = Rate(100, 1), Rate(1, 1)
    ok, results = gcra_multi(0, [None, None], [wide, narrow])
    assert ok and all(r.allowed for r in results)
    tats = [r.tat for r in results]
    ok, results = gcra_multi(0, tats, [wide, narrow])
    assert not ok and results[0].allowed and not results[1].allowed


def test_precheck_refuses_locally_until_redis_said() -> None:
    local, rate = LocalLimiter(), Rate(1, 1)
    assert local.precheck(["ip:1", "key:a"], 0) is None
    decisions = [Decision(True, rate, 3, 10), Decision(False, rate, 0, US, 400_000, 429)]
    local.record(["ip:1", "key:a"], decisions, 0)
    refused = local.precheck(["ip:1", "key:a"], 100_000)
    assert refused is not None and refused.status == 429
    assert refused.retry_after_us == 300_000 and refused.reset_us == 900_000
    assert local.precheck(["ip:1"], 100_000) is None
    assert local.precheck(["key:a"], 400_000) is None  # time to ask Redis again
    assert len(local) == 0


def test_local_fallback_modes() -> None:
    rate, keys = Rate(8, 1), ["tenant:t"]
    open_ = LocalLimiter()
    assert sum(open_.check(keys, [rate], 0, "open").allowed for _ in range(20)) == 8
    assert open_.check(keys, [rate], 0, "open").status == 429
    closed = LocalLimiter().check(keys, [rate], 0, "closed")
    assert closed.status == 503 and not closed.allowed
    assert ("retry-after", "1") in [(k.decode(), v.decode()) for k, v in closed.headers()]
    assert LocalLimiter().check([], [], 0, "closed").allowed  # nothing to enforce


def test_local_limiter_lru_bound() -> None:
    local, rate = LocalLimiter(max_keys=3), Rate(1, 60)
    for key in "abcd":
        assert local.check([key], [rate], 0).allowed
    assert len(local) == 3
    assert local.check(["a"], [rate], 0).allowed  # "a" was evicted: a fresh bucket
    assert not local.check(["d"], [rate], 0).allowed
    refusal = Decision(False, rate, 0, US, US, 429)
    for key in "vwxyz":
        local.record([key], [refusal], 0)
    assert local.precheck(["v"], 1) is None and local.precheck(["z"], 1) is not None
    with pytest.raises(ValueError):
        LocalLimiter(0)


def test_script_args_and_reply() -> None:
    rates = [Rate(10, 1), Rate(2, 60, burst=5)]
    assert script_args(rates, 1, 42) == [b"42", b"1", b"100000", b"10", b"30000000", b"5"]
    assert script_args(rates[:1])[0] == b""
    decisions = parse_reply([1, 0, 9, 100_000, 0, 7, 0, 9], rates)
    assert decisions[0].allowed and decisions[0].remaining == 9
    assert not decisions[1].allowed and decisions[1].retry_after_us == 7
    with pytest.raises(ValueError):
        parse_reply([1, 0, 9], rates)


def test_lua_text_is_plausible() -> None:
    assert GCRA_LUA.count("function") == 0 and GCRA_LUA.strip().endswith("return reply")
    assert GCRA_LUA.count(" then") == GCRA_LUA.count("if ")
    assert "string.format('%d', tats[i])" in GCRA_LUA  # an integer string, never "1.7e+15"
    # The script itself is run by a real redis-server in the tests below.


# -- against a real Redis -------------------------------------------------------------


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp_path],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@settings(max_examples=25, deadline=None)
@given(
    limits=st.lists(st.integers(1, 20), min_size=1, max_size=3),
    cost=st.integers(1, 2),
    gaps=st.lists(st.integers(0, 400_000), min_size=1, max_size=40),
)
def _lua_matches_python(port: int, limits: list[int], cost: int, gaps: list[int]) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    client.flushall()
    sha = client.script_load(GCRA_LUA)
    rates = [Rate(n, 1, burst=max(cost, n // 2)) for n in limits]
    keys = [f"k{i}" for i in range(len(rates))]
    tats: list[int | None] = [None] * len(rates)
    now = 1_700_000_000_123_457  # a realistic microsecond clock: beyond Lua's %.14g
    for gap in gaps:
        now += gap
        reply = client.evalsha(sha, len(keys), *keys, *script_args(rates, cost, now))
        ok, results = gcra_multi(now, tats, rates, cost)
        expected = [[int(r.allowed), r.retry_after, r.remaining, r.reset] for r in results]
        assert reply == [x for row in expected for x in row]
        if ok:
            tats = [r.tat for r in results]
            stored = [int(v or b"") for v in client.mget(keys)]
            assert stored == tats
    client.close()


def test_lua_matches_python(redis_port: int) -> None:
    _lua_matches_python(redis_port)


def test_lua_uses_server_clock_and_expires(redis_port: int) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=redis_port)
    rate = Rate(2, 1)
    first = parse_reply(client.eval(GCRA_LUA, 1, "k", *script_args([rate])), [rate])[0]
    assert first.allowed and first.remaining == 1
    assert 0 < client.pttl("k") <= 500
    client.eval(GCRA_LUA, 1, "k", *script_args([rate]))
    third = parse_reply(client.eval(GCRA_LUA, 1, "k", *script_args([rate])), [rate])[0]
    assert not third.allowed and 0 < third.retry_after_us <= 500_000
    client.close()
