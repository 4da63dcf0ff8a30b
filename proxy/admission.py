"""Which rate-limit buckets a request counts against. Pure: no I/O.

A request is checked against every scope that applies to it at once (one EVALSHA, see
``proxy.ratelimit``): its client IP, its identity (API key or JWT subject), its tenant,
and for ``tools/call`` the identity's bucket for that tool. A key's or tenant's own
limits (from the snapshot) override the configured defaults; a default of 0 means the
scope is not limited.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.auth import Identity
from proxy.config import RateLimitsConfig
from proxy.ratelimit import Rate

PER_MINUTE = 60.0
REDIS_PREFIX = "sb:rl:"


@dataclass(frozen=True, slots=True)
class Buckets:
    keys: list[str]
    """Redis keys, one per scope, in the same order as ``rates``."""
    rates: list[Rate]

    def __bool__(self) -> bool:
        return bool(self.keys)


def _default(per_minute: int, burst: int) -> Rate | None:
    return Rate(per_minute, PER_MINUTE, burst) if per_minute else None


def identity_label(identity: Identity) -> str:
    """The bucket name of an identity: its key prefix, or its JWT subject."""
    if identity.key_prefix is not None:
        return f"key:{identity.key_prefix}"
    return f"sub:{identity.subject}"


def rate_buckets(
    config: RateLimitsConfig, client_ip: str, identity: Identity | None, tool: str | None
) -> Buckets:
    keys: list[str] = []
    rates: list[Rate] = []

    def add(name: str, rate: Rate | None) -> None:
        if rate is not None:
            keys.append(REDIS_PREFIX + name)
            rates.append(rate)

    burst = config.burst
    add(f"ip:{client_ip}", _default(config.per_ip, burst))
    if identity is not None:
        who = identity_label(identity)
        limits = identity.limits
        add(who, limits.get("key") or _default(config.per_key, burst))
        if identity.tenant is not None:
            add(
                f"tenant:{identity.tenant}",
                limits.get("tenant") or _default(config.per_tenant, burst),
            )
        if tool is not None:
            add(
                f"tool:{who}:{tool}",
                limits.get(f"tool:{tool}") or _default(config.per_tool, burst),
            )
    elif tool is not None and config.per_tool:
        add(f"tool:ip:{client_ip}:{tool}", _default(config.per_tool, burst))
    return Buckets(keys, rates)


def connection_cap(config: RateLimitsConfig, identity: Identity) -> int:
    """The tenant's concurrent-connection cap (0: none)."""
    if identity.tenant is None:
        return 0
    if identity.max_connections is not None:
        return max(0, identity.max_connections)
    return config.max_connections_per_tenant
