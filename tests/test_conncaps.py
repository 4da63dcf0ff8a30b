"""Connection caps, the pure part: scope names, local counting, fail modes, resync state."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.conncaps import (
    OWNERS_KEY,
    SCRIPTS,
    CapDecision,
    LocalConnectionCounts,
    Write,
    batches,
    hash_ttl,
    ip_scope,
    new_owner_id,
    parse_acquire_reply,
    scope_key,
    tenant_scope,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_scope_names_and_keys() -> None:
    assert ip_scope("127.0.0.5") == "ip:127.0.0.5"
    assert scope_key(ip_scope("127.0.0.5")) == "sb:conn:ip:127.0.0.5"
    assert scope_key(tenant_scope("acme")) == "sb:conn:tenant:acme"
    assert OWNERS_KEY == "sb:conn:owners"
    # One client, one scope, however its address is spelt.
    assert ip_scope("::ffff:10.0.0.1") == "ip:10.0.0.1"
    assert ip_scope("2001:DB8:0:0::1") == "ip:2001:db8::1"
    assert ip_scope("fe80::1%eth0") == "ip:fe80::1"
    assert ip_scope("not-an-ip") == "ip:not-an-ip"
    # Tenants and IPs never share a key, whatever the tenant is called.
    assert scope_key(tenant_scope("ip:1.2.3.4")) != scope_key(ip_scope("1.2.3.4"))


def test_owner_ids_are_random() -> None:
    ids = {new_owner_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 16 for i in ids)


def test_hash_ttl_outlives_missed_heartbeats() -> None:
    assert hash_ttl(15.0) == 30.0
    assert hash_ttl(0.2) == 1.0


def test_open_enforces_the_full_cap_per_worker() -> None:
    counts = LocalConnectionCounts("open", workers=4)
    scope = ip_scope("10.0.0.1")
    granted = [counts.acquire_local(scope, 3) for _ in range(4)]
    assert [d.allowed for d in granted] == [True, True, True, False]
    assert granted[2] == CapDecision(True, scope, 3, 3, "local")
    assert granted[3] == CapDecision(False, scope, 3, 3, "local")
    counts.release(scope)
    assert counts.acquire_local(scope, 3).allowed
    assert not counts.acquire_local(scope, 3).allowed
    # Other scopes are counted apart.
    assert counts.acquire_local(tenant_scope("acme"), 1).allowed


def test_closed_enforces_a_share_per_worker() -> None:
    counts = LocalConnectionCounts("closed", workers=4)
    assert counts.local_limit(10) == 2
    scope = tenant_scope("acme")
    decisions = [counts.acquire_local(scope, 10) for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert decisions[2] == CapDecision(False, scope, 2, 2, "local")


def test_closed_refuses_when_the_share_is_zero() -> None:
    counts = LocalConnectionCounts("closed", workers=4)
    decision = counts.acquire_local(ip_scope("10.0.0.1"), 3)
    assert decision == CapDecision(False, "ip:10.0.0.1", 0, 0, "local")
    assert len(counts) == 0  # a refusal leaves nothing behind


def test_closed_with_one_worker_is_the_full_cap() -> None:
    counts = LocalConnectionCounts("closed", workers=1)
    assert counts.local_limit(3) == 3
    assert LocalConnectionCounts("closed", workers=0).local_limit(3) == 3


def test_bad_fail_mode() -> None:
    with pytest.raises(ValueError, match="fail mode"):
        LocalConnectionCounts("sideways", workers=1)  # type: ignore[arg-type]


def test_remote_acquisitions_are_relative_while_clean() -> None:
    counts = LocalConnectionCounts()
    write = counts.begin_remote("ip:a")
    assert write == Write("ip:a", False, 0, 0)
    assert write.args() == ["r", 0, 0]
    counts.finish_remote(write, True)
    assert counts.held("ip:a") == 1
    assert counts.begin_remote("ip:a") == Write("ip:a", False, 1, 0)  # value: held so far
    assert counts.release("ip:a") is True  # tell Redis -1
    assert len(counts) == 1  # one acquisition still in flight


def test_a_refusal_leaves_nothing_behind() -> None:
    counts = LocalConnectionCounts()
    counts.finish_remote(counts.begin_remote("ip:a"), False)
    assert len(counts) == 0


def test_local_leases_are_unsynced_until_the_next_write() -> None:
    counts = LocalConnectionCounts()
    counts.finish_remote(counts.begin_remote("ip:a"), True)
    assert counts.acquire_local("ip:a", 5).allowed
    assert counts.acquire_local("ip:a", 5).allowed
    assert counts.unsynced("ip:a") == 2
    # Released while unsynced: Redis is not told, it never counted that lease.
    assert counts.release("ip:a") is False
    assert counts.unsynced("ip:a") == 1
    # The next write hands the remaining one to Redis (added to its field).
    write = counts.begin_remote("ip:a")
    assert write == Write("ip:a", False, 2, 1)
    assert counts.unsynced("ip:a") == 0
    counts.finish_remote(write, False)
    assert counts.release("ip:a") is True
    assert counts.release("ip:a") is True
    assert len(counts) == 0


def test_a_scope_only_seen_locally_is_forgotten_with_its_last_lease() -> None:
    # A long outage, or no Redis at all, must not keep every address ever seen.
    counts = LocalConnectionCounts()
    assert counts.acquire_local("ip:new", 2).allowed
    assert counts.release("ip:new") is False
    assert len(counts) == 0


def test_an_unknown_outcome_makes_the_scope_dirty() -> None:
    counts = LocalConnectionCounts()
    counts.acquire_local("ip:a", 5)
    write = counts.begin_remote("ip:a")
    assert write.extra == 1
    counts.finish_remote(write, None)
    assert counts.held("ip:a") == 1
    assert counts.is_dirty("ip:a")
    assert counts.unsynced("ip:a") == 1  # it may not have reached Redis
    # A phantom +1 may be in Redis, so releases wait for the overwrite.
    assert counts.release("ip:a") is False
    assert counts.scopes() == ["ip:a"]
    writes = counts.begin_sync(counts.scopes())
    assert writes == [Write("ip:a", True, 0, 0)]  # absolute: the field is deleted
    counts.end_sync(writes, ok=True)
    assert len(counts) == 0


def test_no_absolute_write_while_an_acquisition_is_in_flight() -> None:
    counts = LocalConnectionCounts()
    counts.mark_dirty("t:x")
    first = counts.begin_remote("t:x")
    assert first.absolute
    # Whether ``first`` is granted is unknown until it is answered; Redis runs it before
    # anything sent later, so only relative writes may follow it.
    counts.mark_dirty("t:x")
    assert counts.begin_sync(["t:x"]) == [Write("t:x", False, 0, 0)]
    assert counts.is_dirty("t:x")
    counts.finish_remote(first, True)
    assert counts.begin_sync(["t:x"]) == [Write("t:x", True, 1, 0)]
    assert not counts.is_dirty("t:x")


def test_failed_sync_is_distrusted() -> None:
    counts = LocalConnectionCounts()
    counts.finish_remote(counts.begin_remote("ip:a"), True)
    counts.acquire_local("ip:a", 5)
    writes = counts.begin_sync(counts.scopes())
    assert writes == [Write("ip:a", False, 2, 1)]
    counts.end_sync(writes, ok=False)
    assert counts.is_dirty("ip:a")
    assert counts.unsynced("ip:a") == 1
    assert counts.begin_sync(["ip:a"]) == [Write("ip:a", True, 2, 1)]


def test_release_of_an_unknown_scope_is_ignored() -> None:
    counts = LocalConnectionCounts()
    assert counts.release("ip:nobody") is False
    assert len(counts) == 0
    assert counts.begin_sync(["ip:nobody"]) == [Write("ip:nobody", False, 0, 0)]


def test_parse_acquire_reply() -> None:
    assert parse_acquire_reply([1, 3, 1]) == (True, 3, True)
    assert parse_acquire_reply([0, 5, 0]) == (False, 5, False)
    with pytest.raises(ValueError):
        parse_acquire_reply(b"OK")
    with pytest.raises(ValueError):
        parse_acquire_reply([1, 2])


def test_batches() -> None:
    assert batches([]) == [[]]  # the heartbeat still beats with nothing held
    assert batches(["a", "b", "c"], 2) == [["a", "b"], ["c"]]


def test_scripts_declare_their_keys() -> None:
    # Every key a script touches comes in through KEYS (no key names built in Lua).
    for source in SCRIPTS.values():
        assert "sb:" not in source
        assert "KEYS[1]" in source
