"""``backend_era = "auto"``: which MCP era a route's backends speak, learnt by probing
one of them and kept a while by each worker. Sans-IO: the probes' messages, what their
answers say, and the worker's table of what it learnt.

A probe (``proxy.net.session_opener``) asks one backend of the route two things on
fresh connections: a 2026-07-28 ``server/discover``, and a 2025-11-25 ``initialize``
(whose session it then ends with ``DELETE``). A backend that answers both speaks either
era (``any``: nothing is translated); one that answers only the first speaks
2026-07-28, only the second 2025-11-25; one that answers neither is taken as ``any``
for a short while (the request goes as it came; the backend's own answer says what is
wrong) and asked again soon. A route's backends are taken to speak the same era. What a
worker learnt is kept ``PROBE_TTL`` seconds, and forgotten at once when a translated
request finds the backend will not open a session (it has changed, or was never what
the probe said).
"""

from __future__ import annotations

from typing import Final

import msgspec

from proxy.protocol.eras import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    HANDSHAKE_VERSION,
    MODERN_VERSION,
)
from proxy.protocol.jsonrpc import PROTOCOL_VERSION_META_KEY
from proxy.protocol.upstream_sessions import ClientEnvelope

PROBE_TTL: Final = 60.0
"""Seconds a worker keeps what a probe said."""
UNKNOWN_TTL: Final = 5.0
"""Seconds a probe that learnt nothing is kept (requests pass untranslated meanwhile)."""
PROBE_ID: Final = "switchboard-probe"
ANY: Final = "any"

_CLIENT_INFO: Final = {"name": "switchboard-probe", "version": "1"}
DISCOVER_BODY: Final = msgspec.json.encode(
    {
        "jsonrpc": "2.0",
        "id": PROBE_ID,
        "method": "server/discover",
        "params": {
            "_meta": {
                PROTOCOL_VERSION_META_KEY: MODERN_VERSION,
                CLIENT_CAPABILITIES_META_KEY: {},
                CLIENT_INFO_META_KEY: _CLIENT_INFO,
            }
        },
    }
)
INITIALIZE_BODY: Final = ClientEnvelope({}, _CLIENT_INFO).initialize_body()
"""The same ``initialize`` the proxy opens upstream sessions with, declaring nothing."""


def era_of(discovered: bool, initialized: bool) -> str:
    """The era a backend speaks, from whether it answered each probe."""
    if discovered and not initialized:
        return MODERN_VERSION
    if initialized and not discovered:
        return HANDSHAKE_VERSION
    return ANY


class ProbeRequest:
    """What the worker needs to probe a route (``Check.PROBE``)."""

    __slots__ = ("backend", "route", "target")

    def __init__(self, route: str, backend: object, target: bytes) -> None:
        self.route = route
        """The route's prefix: what the answer is kept under."""
        self.backend = backend
        self.target = target
        """The MCP endpoint's target on the backend."""


class RouteEras:
    """What a worker has learnt of its ``auto`` routes' eras, by route prefix."""

    __slots__ = ("_known",)

    def __init__(self) -> None:
        self._known: dict[str, tuple[str, float]] = {}

    def era(self, route: str, now: float) -> str | None:
        """The era the route's backends speak, or None when it must be probed."""
        known = self._known.get(route)
        if known is None or now >= known[1]:
            return None
        return known[0]

    def learn(self, route: str, era: str | None, now: float) -> None:
        """What a probe said (None: nothing; requests pass untranslated a while)."""
        if era is None:
            self._known[route] = (ANY, now + UNKNOWN_TTL)
        else:
            self._known[route] = (era, now + PROBE_TTL)

    def forget(self, route: str) -> None:
        self._known.pop(route, None)
