"""Global concurrent-connection caps per client IP and per tenant. Pure: no I/O.

Redis layout (one Redis shared by every worker of every host):

* ``sb:conn:owners``: a sorted set, worker ``owner`` id -> deadline (Redis server time,
  milliseconds). A worker refreshes its own deadline (``now + lease_ttl``) every
  ``lease_ttl / 3`` and on each acquisition; an owner whose deadline has passed is dead.
* ``sb:conn:<scope>`` (``sb:conn:ip:203.0.113.7``, ``sb:conn:tenant:acme``): a hash,
  owner id -> connections that owner holds in that scope.

``ACQUIRE_LUA`` sums the fields of live owners, deletes the fields of dead ones (so the
connections of a SIGKILLed worker free themselves ``lease_ttl`` after its last beat) and
adds one to the caller's field if the sum is under the limit. ``RELEASE_LUA`` takes one
off. Every owner deadline and hash also carries a Redis expiry, so nothing outlives its
holders.

Redis's count of an owner can be wrong, and the worker's own count per scope
(``LocalConnectionCounts``) is the truth it is brought back to:

* A lease granted locally during an outage is not in Redis: it is *unsynced*. Released
  while still unsynced, it never touches Redis; otherwise the next write in that scope
  (an acquisition or a heartbeat) adds it (``extra``).
* Redis may have lost the owner's field (restarted, flushed, or another worker deemed the
  owner dead and deleted it). Every write carries the owner's full count (``value``), and
  a script that finds the field absent takes that instead of adding to nothing. Redis runs
  one connection's commands in order, so an absent field means no earlier acquisition of
  this owner's in that scope succeeded since the loss, and ``value`` (the leases held when
  it was sent) is exact; only a FLUSHALL landing between two acquisitions in flight could
  make it one short.
* A reply lost to a timeout leaves unknown whether the command ran: the scope is *dirty*,
  and the next write sent while none of the owner's acquisitions there is in flight
  overwrites the field with ``value`` (absolute). Until then Redis can only count too
  many, never too few, so the cap holds.

While Redis is unreachable each worker decides alone, by the fail mode:

* ``"open"``: the full cap on the worker's own connections (availability first; W
  workers admit up to W times the cap between them).
* ``"closed"``: ``limit // workers`` per worker, so the workers together never exceed the
  cap; a share of 0 refuses every connection in that scope until Redis is back.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

FailMode = Literal["open", "closed"]
CapSource = Literal["redis", "local"]

KEY_PREFIX: Final = "sb:conn:"
OWNERS_KEY: Final = "sb:conn:owners"
SYNC_BATCH: Final = 500
"""Scopes written per SYNC_LUA / DEPART_LUA call, so one script never blocks Redis long."""


def ip_scope(ip: str) -> str:
    """The scope of a client address; IPv4-mapped IPv6 counts as its IPv4 address."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return f"ip:{ip}"  # not an IP (a Unix socket peer, say): capped under its own name
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return f"ip:{address.compressed}"


def tenant_scope(name: str) -> str:
    return f"tenant:{name}"


def scope_key(scope: str) -> str:
    """The Redis hash of a scope."""
    return KEY_PREFIX + scope


def new_owner_id() -> str:
    """A worker's id in Redis: random, so a restarted worker never inherits a dead one's."""
    return secrets.token_hex(8)


def hash_ttl(lease_ttl: float) -> float:
    """Expiry of the owners set and of each scope hash: well past one missed heartbeat."""
    return max(2 * lease_ttl, 1.0)


# KEYS[1]: the scope hash, KEYS[2]: the owners set. ARGV: owner, limit, mode ("a": take
# value as the owner's count; "r": add extra to its field, or take value if the field is
# absent), value, extra, lease ttl ms, hash ttl ms. Replies {allowed 1/0, count of the
# scope after the decision, 1 if the owner was alive before this call else 0}.
ACQUIRE_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local owner = ARGV[1]
local limit = tonumber(ARGV[2])
local present = 0
local deadline = tonumber(redis.call('ZSCORE', KEYS[2], owner))
if deadline and deadline >= now then present = 1 end
redis.call('ZADD', KEYS[2], string.format('%d', now + tonumber(ARGV[6])), owner)
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[7]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
end
local fields = redis.call('HGETALL', KEYS[1])
local others, field = 0, nil
for i = 1, #fields, 2 do
  local who, n = fields[i], tonumber(fields[i + 1])
  if who == owner then
    field = n
  else
    local until_ms = tonumber(redis.call('ZSCORE', KEYS[2], who))
    if until_ms and until_ms >= now then
      others = others + n
    else
      redis.call('HDEL', KEYS[1], who)
    end
  end
end
local mine = tonumber(ARGV[4])
if ARGV[3] ~= 'a' and field then mine = field + tonumber(ARGV[5]) end
local allowed = 0
if others + mine < limit then
  allowed = 1
  mine = mine + 1
end
if mine > 0 then
  redis.call('HSET', KEYS[1], owner, string.format('%d', mine))
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[7]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[7])
  end
elseif field then
  redis.call('HDEL', KEYS[1], owner)
end
return {allowed, others + mine, present}
"""

# KEYS[1]: the scope hash. ARGV[1]: owner. Replies the owner's count after, or -1 (and
# writes nothing) when Redis had lost the owner's field.
RELEASE_LUA: Final = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return -1 end
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
"""

# The heartbeat. KEYS[1]: the owners set, KEYS[2..]: scope hashes. ARGV: owner, lease ttl
# ms, hash ttl ms, then mode, value, extra for each scope hash (as in ACQUIRE_LUA; a count
# of 0 deletes the field). Refreshes the owner's deadline and every expiry, drops dead
# owners from the set, and replies 1 if the owner was alive before this call, else 0.
SYNC_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local owner = ARGV[1]
local present = 0
local deadline = tonumber(redis.call('ZSCORE', KEYS[1], owner))
if deadline and deadline >= now then present = 1 end
redis.call('ZADD', KEYS[1], string.format('%d', now + tonumber(ARGV[2])), owner)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%d', now))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
for i = 2, #KEYS do
  local j = 3 * i - 2
  local mine = tonumber(ARGV[j + 1])
  local field = tonumber(redis.call('HGET', KEYS[i], owner))
  if ARGV[j] ~= 'a' and field then mine = field + tonumber(ARGV[j + 2]) end
  if mine > 0 then
    redis.call('HSET', KEYS[i], owner, string.format('%d', mine))
    if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[3]) then
      redis.call('PEXPIRE', KEYS[i], ARGV[3])
    end
  elseif field then
    redis.call('HDEL', KEYS[i], owner)
  end
end
return present
"""

# Graceful exit. KEYS[1]: the owners set, KEYS[2..]: scope hashes; ARGV[1]: owner.
DEPART_LUA: Final = """
redis.call('ZREM', KEYS[1], ARGV[1])
for i = 2, #KEYS do redis.call('HDEL', KEYS[i], ARGV[1]) end
return #KEYS - 1
"""

SCRIPTS: Final = {
    "acquire": ACQUIRE_LUA,
    "release": RELEASE_LUA,
    "sync": SYNC_LUA,
    "depart": DEPART_LUA,
}


@dataclass(frozen=True, slots=True)
class CapDecision:
    allowed: bool
    scope: str
    limit: int
    """The cap that applied: the configured one, or the worker's share when fail-closed."""
    count: int
    """Connections in the scope after the decision: all owners' when the source is
    "redis", this worker's when "local"."""
    source: CapSource


@dataclass(eq=False, slots=True)
class Lease:
    """One admitted connection; give it back with ``ConnectionCaps.release``."""

    scope: str
    limit: int
    source: CapSource
    """Where it was granted; a "local" lease reaches Redis only if still held once Redis
    is back."""
    count: int
    released: bool = False


@dataclass(slots=True)
class _Scope:
    held: int = 0
    """Leases this worker holds, however they were granted."""
    unsynced: int = 0
    """Of those, granted locally and not written to Redis yet."""
    inflight: int = 0
    """Acquisitions sent to Redis and not answered yet."""
    dirty: bool = False
    """Redis may count too many here: overwrite it once nothing is in flight."""


@dataclass(frozen=True, slots=True)
class Write:
    """One scope's part of an ACQUIRE_LUA or SYNC_LUA call."""

    scope: str
    absolute: bool
    value: int
    """This worker's count in the scope when sent."""
    extra: int
    """Unsynced leases handed to Redis by this write."""

    def args(self) -> list[str | int]:
        return ["a" if self.absolute else "r", self.value, self.extra]


class LocalConnectionCounts:
    """A worker's own connections per scope: the fallback's counts, and the truth that
    Redis is brought back to."""

    def __init__(self, fail_mode: FailMode = "open", workers: int = 1) -> None:
        if fail_mode not in ("open", "closed"):
            raise ValueError(f"fail mode must be 'open' or 'closed', not {fail_mode!r}")
        self.fail_mode: FailMode = fail_mode
        self.workers = max(1, workers)
        self._scopes: dict[str, _Scope] = {}

    def __len__(self) -> int:
        return len(self._scopes)

    def held(self, scope: str) -> int:
        state = self._scopes.get(scope)
        return 0 if state is None else state.held

    def unsynced(self, scope: str) -> int:
        state = self._scopes.get(scope)
        return 0 if state is None else state.unsynced

    def is_dirty(self, scope: str) -> bool:
        state = self._scopes.get(scope)
        return state is not None and state.dirty

    def local_limit(self, limit: int) -> int:
        """The cap one worker enforces alone."""
        return limit if self.fail_mode == "open" else limit // self.workers

    def acquire_local(self, scope: str, limit: int) -> CapDecision:
        """Decide without Redis, on this worker's own count."""
        cap = self.local_limit(limit)
        state = self._scopes.get(scope)
        held = 0 if state is None else state.held
        if held >= cap:
            return CapDecision(False, scope, cap, held, "local")
        if state is None:
            state = self._scopes[scope] = _Scope()
        state.held += 1
        state.unsynced += 1
        return CapDecision(True, scope, cap, state.held, "local")

    def begin_remote(self, scope: str) -> Write:
        """Account for an acquisition about to be sent. Call it right before the send,
        with no checkpoint in between, so local order matches the order on the wire."""
        state = self._scopes.setdefault(scope, _Scope())
        write = self._write(scope, state)
        state.inflight += 1
        return write

    def finish_remote(self, write: Write, allowed: bool | None) -> None:
        """Record Redis's answer; None when it is unknown whether the command ran."""
        state = self._scopes.setdefault(write.scope, _Scope())
        state.inflight = max(0, state.inflight - 1)
        if allowed:
            state.held += 1
        elif allowed is None:
            self._failed(state, write)
        self._prune(write.scope, state)

    def release(self, scope: str) -> bool:
        """Forget one lease; True when Redis should take one off its count."""
        state = self._scopes.get(scope)
        if state is None or state.held <= 0:
            return False
        state.held -= 1
        if state.unsynced > 0:  # leases are alike: this one is one Redis never had
            state.unsynced -= 1
            tell = False
        else:
            tell = not state.dirty  # dirty: the coming overwrite accounts for it
        self._prune(scope, state)
        return tell

    def mark_dirty(self, scope: str) -> None:
        self._scopes.setdefault(scope, _Scope()).dirty = True

    def scopes(self) -> list[str]:
        """Every scope with anything to write to Redis."""
        return list(self._scopes)

    def begin_sync(self, scopes: Iterable[str]) -> list[Write]:
        """The writes for ``scopes``; call it right before the send, as ``begin_remote``."""
        writes: list[Write] = []
        for scope in scopes:
            state = self._scopes.get(scope)
            writes.append(Write(scope, False, 0, 0) if state is None else self._write(scope, state))
        return writes

    def end_sync(self, writes: Iterable[Write], ok: bool) -> None:
        """After the call: forget idle scopes, or (unknown outcome) distrust them."""
        for write in writes:
            state = self._scopes.setdefault(write.scope, _Scope())
            if not ok:
                self._failed(state, write)
            self._prune(write.scope, state)

    def _write(self, scope: str, state: _Scope) -> Write:
        # Absolute only with nothing in flight: an acquisition sent earlier runs first in
        # Redis, and whether it was granted is not known here yet.
        absolute = state.dirty and state.inflight == 0
        if absolute:
            state.dirty = False
        write = Write(scope, absolute, state.held, state.unsynced)
        state.unsynced = 0
        return write

    @staticmethod
    def _failed(state: _Scope, write: Write) -> None:
        # Whether it ran is unknown: keep its leases unsynced (counted twice at worst) and
        # overwrite Redis later.
        state.unsynced = min(state.held, state.unsynced + write.extra)
        state.dirty = True

    def _prune(self, scope: str, state: _Scope) -> None:
        if state.held <= 0 and state.inflight <= 0 and not state.dirty:
            del self._scopes[scope]


def parse_acquire_reply(reply: object) -> tuple[bool, int, bool]:
    """ACQUIRE_LUA's reply as (allowed, count, owner was alive)."""
    if not isinstance(reply, list) or len(reply) != 3:
        raise ValueError(f"unexpected acquire reply {reply!r}")
    allowed, count, present = (int(x) for x in reply)
    return bool(allowed), count, bool(present)


def batches(items: list[str], size: int = SYNC_BATCH) -> list[list[str]]:
    """``items`` in slices of ``size``; one empty slice when there are none (the heartbeat
    still has to beat)."""
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]
