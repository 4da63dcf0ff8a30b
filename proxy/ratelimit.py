"""Pure rate-limit decisions: GCRA math, the Redis script, the per-worker pre-check.

GCRA (the generic cell rate algorithm) keeps one number per bucket, the theoretical
arrival time (TAT). A rate of ``limit`` per ``period`` seconds with a ``burst`` has an
emission interval T = period/limit; a request at ``now`` is allowed when
``max(tat, now) + cost*T - burst*T <= now``, and then the TAT moves by ``cost*T``. It is
exactly a token bucket of ``burst`` tokens refilled one per T, with no timer and one key.
All times are integer microseconds, so Python and Lua agree to the unit.

One request checks all its scopes (client IP, key, tenant, tool) at once: ``GCRA_LUA``
takes every bucket in one EVALSHA and commits only if all allow, so a request refused by
one scope spends nothing in the others; ``gcra_multi`` is the same in Python.

Before Redis, ``LocalLimiter.precheck``: a key Redis refused until T is refused locally
until T, so a flood costs about one Redis call per retry interval per worker, not one per
request. When Redis is unreachable ``LocalLimiter.check`` decides with per-worker buckets,
by the fail mode:

* ``"open"``: each worker enforces the full rate on its own (availability first; a
  deployment of W workers admits up to W times the limit while Redis is down).
* ``"closed"``: a limit that cannot be enforced globally is not enforced by guesswork: a
  request under any limit is refused with 503 and Retry-After (``Decision.unavailable``)
  until Redis is back. Requests under no limit still pass.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

FailMode = Literal["open", "closed"]
RATE_LIMITED: Final = -32029
"""The JSON-RPC error code in the body of a 429 on an MCP route."""
US: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class Rate:
    limit: int
    """Requests per ``period``."""
    period: float
    """Seconds."""
    burst: int = 0
    """Requests allowed at once from idle; 0 means ``limit``."""

    def __post_init__(self) -> None:
        if self.limit < 1 or self.period <= 0 or self.burst < 0:
            raise ValueError(f"invalid rate {self}")

    @property
    def interval_us(self) -> int:
        return max(1, round(self.period * US / self.limit))

    @property
    def capacity(self) -> int:
        return self.burst or self.limit

    def policy(self) -> bytes:
        window = int(self.period) if self.period == int(self.period) else self.period
        return f"{self.limit};w={window}".encode()


class GcraResult(NamedTuple):
    allowed: bool
    tat: int
    """The TAT to store (unchanged when refused)."""
    retry_after: int
    """Microseconds until this request would be allowed; 0 when allowed."""
    remaining: int
    """Requests still allowed right now (after this one, if allowed)."""
    reset: int
    """Microseconds until the bucket is full again."""


def gcra(now: int, tat: int | None, interval: int, burst: int, cost: int = 1) -> GcraResult:
    """One GCRA decision; ``tat`` None for a bucket never seen (or expired)."""
    tat = now if tat is None or tat < now else tat
    span = burst * interval
    new_tat = tat + cost * interval
    allow_at = new_tat - span
    if now < allow_at:
        return GcraResult(False, tat, allow_at - now, (now + span - tat) // interval, tat - now)
    return GcraResult(True, new_tat, 0, (now + span - new_tat) // interval, new_tat - now)


def gcra_multi(
    now: int, tats: Sequence[int | None], rates: Sequence[Rate], cost: int = 1
) -> tuple[bool, list[GcraResult]]:
    """Every bucket's decision; the request passes only if all allow (what GCRA_LUA does).
    When it does not, no bucket's TAT is to be stored."""
    results = [
        gcra(now, t, r.interval_us, r.capacity, cost) for t, r in zip(tats, rates, strict=True)
    ]
    return all(r.allowed for r in results), results


# KEYS: the buckets. ARGV[1]: now in microseconds, or "" for the server's clock;
# ARGV[2]: cost; then interval_us and burst for each key. Replies 4 integers per key:
# allowed (1/0), retry_after_us, remaining, reset_us; TATs are written only if all allow.
# TATs are stored through string.format('%d'): always a plain integer string, never
# "1.7e+15" (Lua's tostring is "%.14g", which would round a microsecond timestamp).
GCRA_LUA: Final = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local cost = tonumber(ARGV[2])
local reply, tats, all_ok = {}, {}, true
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[1 + 2 * i])
  local span = tonumber(ARGV[2 + 2 * i]) * interval
  local tat = tonumber(redis.call('GET', key) or '')
  if not tat or tat < now then tat = now end
  local new_tat = tat + cost * interval
  local allow_at = new_tat - span
  local n = #reply
  if now < allow_at then
    all_ok = false
    reply[n + 1], reply[n + 2] = 0, allow_at - now
    reply[n + 3], reply[n + 4] = math.floor((now + span - tat) / interval), tat - now
  else
    tats[i] = new_tat
    reply[n + 1], reply[n + 2] = 1, 0
    reply[n + 3], reply[n + 4] = math.floor((now + span - new_tat) / interval), new_tat - now
  end
end
if all_ok then
  for i, key in ipairs(KEYS) do
    local ttl = math.ceil((tats[i] - now) / 1000)
    if ttl < 1 then ttl = 1 end
    redis.call('SET', key, string.format('%d', tats[i]), 'PX', string.format('%d', ttl))
  end
end
return reply
"""


def script_args(rates: Sequence[Rate], cost: int = 1, now_us: int | None = None) -> list[bytes]:
    """ARGV for GCRA_LUA (the keys go in KEYS, in the same order as ``rates``)."""
    args = [b"" if now_us is None else str(now_us).encode(), str(cost).encode()]
    for rate in rates:
        args += [str(rate.interval_us).encode(), str(rate.capacity).encode()]
    return args


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rate: Rate | None
    remaining: int = 0
    reset_us: int = 0
    retry_after_us: int = 0
    status: int = 200
    """200 allowed, 429 over a limit, 503 unable to enforce (fail-closed)."""

    @classmethod
    def from_result(cls, result: GcraResult, rate: Rate) -> Decision:
        return cls(
            result.allowed,
            rate,
            max(0, result.remaining),
            result.reset,
            result.retry_after,
            200 if result.allowed else 429,
        )

    @classmethod
    def unavailable(cls, retry_after_us: int = US) -> Decision:
        return cls(False, None, retry_after_us=retry_after_us, status=503)

    def headers(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        if self.rate is not None:
            out += [
                (b"ratelimit-limit", str(self.rate.capacity).encode()),
                (b"ratelimit-remaining", str(self.remaining).encode()),
                (b"ratelimit-reset", str(_seconds(self.reset_us)).encode()),
                (b"ratelimit-policy", self.rate.policy()),
            ]
        if not self.allowed:
            out.append((b"retry-after", str(max(1, _seconds(self.retry_after_us))).encode()))
        return out


def _seconds(us: int) -> int:
    return math.ceil(us / US) if us > 0 else 0


def combine(decisions: Sequence[Decision]) -> Decision:
    """The binding decision: the refusal that lasts longest, else the least remaining."""
    refused = [d for d in decisions if not d.allowed]
    if refused:
        return max(refused, key=lambda d: (d.status == 503, d.retry_after_us))
    return min(decisions, key=lambda d: (d.remaining, -d.reset_us))


def parse_reply(reply: Sequence[int], rates: Sequence[Rate]) -> list[Decision]:
    """GCRA_LUA's reply as one Decision per key."""
    if len(reply) != 4 * len(rates):
        raise ValueError(f"GCRA reply of {len(reply)} numbers for {len(rates)} keys")
    return [
        Decision.from_result(
            GcraResult(bool(reply[i]), 0, int(reply[i + 1]), int(reply[i + 2]), int(reply[i + 3])),
            rate,
        )
        for i, rate in zip(range(0, len(reply), 4), rates, strict=True)
    ]


class LocalLimiter:
    """Per-worker state, bounded with LRU eviction: refusals learnt from Redis (the
    pre-check) and local TATs (the fallback while Redis is down)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self._blocked: OrderedDict[str, tuple[int, Decision]] = OrderedDict()
        self._tats: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocked) + len(self._tats)

    def precheck(self, keys: Sequence[str], now: int) -> Decision | None:
        """A refusal without asking Redis, when a key is known to be over until later."""
        found: list[Decision] = []
        for key in keys:
            entry = self._blocked.get(key)
            if entry is None:
                continue
            since, d = entry
            if now >= since + d.retry_after_us:
                del self._blocked[key]
                continue
            elapsed = now - since
            found.append(
                Decision(False, d.rate, 0, d.reset_us - elapsed, d.retry_after_us - elapsed, 429)
            )
        return combine(found) if found else None

    def record(self, keys: Sequence[str], decisions: Sequence[Decision], now: int) -> None:
        """Remember Redis's refusals, per key, until they expire."""
        for key, decision in zip(keys, decisions, strict=True):
            if decision.allowed or decision.status != 429:
                continue
            self._blocked[key] = (now, decision)
            self._blocked.move_to_end(key)
            if len(self._blocked) > self.max_keys:
                self._blocked.popitem(last=False)

    def check(
        self,
        keys: Sequence[str],
        rates: Sequence[Rate],
        now: int,
        mode: FailMode = "open",
        cost: int = 1,
    ) -> Decision:
        """The fallback decision while Redis is down (see the module's fail modes)."""
        if not rates:
            return Decision(True, None)
        if mode == "closed":
            return Decision.unavailable()
        local = rates
        ok, results = gcra_multi(now, [self._tats.get(k) for k in keys], local, cost)
        if ok:
            for key, result in zip(keys, results, strict=True):
                self._tats[key] = result.tat
                self._tats.move_to_end(key)
            while len(self._tats) > self.max_keys:
                self._tats.popitem(last=False)
        return combine(
            [Decision.from_result(r, rate) for r, rate in zip(results, local, strict=True)]
        )
