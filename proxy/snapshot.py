"""The control-plane snapshot and what a worker derives from it. Pure: no I/O.

A snapshot is what PostgreSQL holds for the data plane (routes, backends, active API keys
with their tenants' limits and tools), read in one transaction together with the
``config_version`` it belongs to. Workers keep the last good one in memory and on disk
(JSON), and turn it into the structures the request path consults: a ``KeyTable`` of
identities and the route list merged with the file's routes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from proxy.auth import Identity, KeyTable
from proxy.config import ConfigError, RouteConfig, validate_routes
from proxy.ratelimit import Rate

PER_MINUTE = 60.0


class RouteEntry(msgspec.Struct, frozen=True, kw_only=True):
    prefix: str
    kind: str
    backends: tuple[str, ...]
    options: dict[str, Any] = msgspec.field(default_factory=dict)


class KeyEntry(msgspec.Struct, frozen=True, kw_only=True):
    key_id: int
    prefix: str
    hash: str
    name: str
    tenant: str
    tenant_id: int
    limits: dict[str, Any] = msgspec.field(default_factory=dict)
    allowed_tools: tuple[str, ...] | None = None
    """None: every tool (within the tenant's)."""
    tenant_limits: dict[str, Any] = msgspec.field(default_factory=dict)
    tenant_allowed_tools: tuple[str, ...] | None = None


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    """config_version when the snapshot was read (same transaction)."""
    routes: tuple[RouteEntry, ...]
    keys: dict[str, KeyEntry]
    """Active (not revoked) keys by public prefix."""


def snapshot_to_json(snapshot: Snapshot) -> bytes:
    return msgspec.json.encode(snapshot)


def snapshot_from_json(data: bytes) -> Snapshot:
    return msgspec.json.decode(data, type=Snapshot)


# --- identities -------------------------------------------------------------------------


def _rate(limits: Mapping[str, Any], name: str = "requests_per_minute") -> Rate | None:
    """``{"requests_per_minute": 60, "burst": 10}`` -> Rate(60, 60 s, 10); None if unset
    or not a positive whole number (a bad row must not take the worker down)."""
    value = limits.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    burst = limits.get("burst", 0)
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
        burst = 0
    return Rate(value, PER_MINUTE, burst)


def _tool_rates(limits: Mapping[str, Any]) -> dict[str, Rate]:
    tools = limits.get("tools")
    if not isinstance(tools, Mapping):
        return {}
    out: dict[str, Rate] = {}
    for tool, per_minute in tools.items():
        rate = _rate({"requests_per_minute": per_minute})
        if isinstance(tool, str) and rate is not None:
            out[f"tool:{tool}"] = rate
    return out


def allowed_tools(
    key_tools: Sequence[str] | None, tenant_tools: Sequence[str] | None
) -> frozenset[str] | None:
    """The tools a key may call: its own list within its tenant's (None: every tool)."""
    if key_tools is None and tenant_tools is None:
        return None
    if key_tools is None:
        return frozenset(tenant_tools or ())
    if tenant_tools is None:
        return frozenset(key_tools)
    return frozenset(key_tools) & frozenset(tenant_tools)


def identity_of(entry: KeyEntry) -> Identity:
    limits: dict[str, Rate] = {}
    if (rate := _rate(entry.limits)) is not None:
        limits["key"] = rate
    if (rate := _rate(entry.tenant_limits)) is not None:
        limits["tenant"] = rate
    limits.update(_tool_rates(entry.tenant_limits))
    limits.update(_tool_rates(entry.limits))  # the key's own tool limits win
    max_connections = entry.tenant_limits.get("max_connections")
    return Identity(
        "key",
        entry.name,
        tenant=entry.tenant,
        key_prefix=entry.prefix,
        allowed_tools=allowed_tools(entry.allowed_tools, entry.tenant_allowed_tools),
        limits=limits,
        key_id=entry.key_id,
        tenant_id=entry.tenant_id,
        max_connections=max_connections
        if isinstance(max_connections, int) and not isinstance(max_connections, bool)
        else None,
    )


def key_table(snapshot: Snapshot | None) -> KeyTable:
    if snapshot is None:
        return KeyTable()
    return KeyTable((e.prefix, e.hash, identity_of(e)) for e in snapshot.keys.values())


# --- routes -----------------------------------------------------------------------------


def route_config(entry: RouteEntry) -> RouteConfig:
    """A database route as a RouteConfig; ConfigError (naming the prefix) if its options
    are not valid route settings."""
    data = {**entry.options, "prefix": entry.prefix, "kind": entry.kind}
    data["backends"] = list(entry.backends)
    try:
        route = msgspec.convert(data, RouteConfig, str_keys=True)
    except msgspec.ValidationError as exc:
        raise ConfigError("database", f"route {entry.prefix}", str(exc)) from None
    validate_routes((route,), f"database route {entry.prefix}")
    return route


def merged_routes(
    file_routes: Sequence[RouteConfig], snapshot: Snapshot | None
) -> tuple[tuple[RouteConfig, ...], list[str]]:
    """The file's routes plus the database's, and a problem per database route left out.

    A prefix in both keeps the file's route: the file is what was deployed with this
    host, and a database row must not silently redirect it."""
    if snapshot is None:
        return tuple(file_routes), []
    taken = {r.prefix for r in file_routes}
    routes = list(file_routes)
    problems: list[str] = []
    for entry in snapshot.routes:
        if entry.prefix in taken:
            problems.append(f"route {entry.prefix!r} is also in the config file; file wins")
            continue
        try:
            routes.append(route_config(entry))
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        taken.add(entry.prefix)
    return tuple(routes), problems
