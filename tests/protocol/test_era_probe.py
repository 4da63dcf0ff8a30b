"""``backend_era = "auto"``, sans-IO (``proxy.protocol.era_probe``): what the probes'
answers say, and how long a worker keeps it."""

from __future__ import annotations

import json

from proxy.protocol.era_probe import (
    ANY,
    DISCOVER_BODY,
    INITIALIZE_BODY,
    PROBE_TTL,
    UNKNOWN_TTL,
    RouteEras,
    era_of,
)


def test_the_probes_are_a_2026_discover_and_a_2025_initialize() -> None:
    discover = json.loads(DISCOVER_BODY)
    assert discover["method"] == "server/discover"
    assert discover["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] == "2026-07-28"
    initialize = json.loads(INITIALIZE_BODY)
    assert initialize["method"] == "initialize"
    assert initialize["params"]["protocolVersion"] == "2025-11-25"


def test_the_era_is_what_the_backend_answered() -> None:
    assert era_of(discovered=True, initialized=False) == "2026-07-28"
    assert era_of(discovered=False, initialized=True) == "2025-11-25"
    assert era_of(discovered=True, initialized=True) == ANY
    assert era_of(discovered=False, initialized=False) == ANY


def test_a_worker_keeps_what_it_learnt_a_while() -> None:
    eras = RouteEras()
    assert eras.era("/mcp", 0.0) is None
    eras.learn("/mcp", "2025-11-25", 10.0)
    assert eras.era("/mcp", 10.0 + PROBE_TTL - 1) == "2025-11-25"
    assert eras.era("/mcp", 10.0 + PROBE_TTL) is None  # asked again
    eras.learn("/mcp", None, 100.0)  # the probe learnt nothing
    assert eras.era("/mcp", 100.0) == ANY
    assert eras.era("/mcp", 100.0 + UNKNOWN_TTL) is None
    eras.learn("/mcp", "2026-07-28", 200.0)
    eras.forget("/mcp")
    assert eras.era("/mcp", 200.0) is None
