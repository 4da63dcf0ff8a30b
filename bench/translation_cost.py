"""Workload ``translation``: what era translation costs a proxied ``tools/call``.

A 2025-11-25 ``tools/call`` (the handshake era: ``MCP-Protocol-Version: 2025-11-25``
and a session id) at concurrency 64, interleaved, to:

- ``switchboard-2025``: an ``mcp`` route with ``backend_era = "any"``, the session a
  replica's (the proxy's token, the backend's own id put back): the request untranslated;
- ``switchboard-translated``: an ``mcp`` route with ``backend_era = "2026-07-28"``, the
  session minted by the proxy's ``initialize``: each request rewritten into the
  2026-07-28 form (``_meta``, headers) and its answer held and rewritten back;
- ``switchboard-2026``: the SDK-shaped 2026-07-28 ``tools/call`` on the first proxy,
  untranslated (what a 2026-07-28 client costs);
- ``switchboard-to-2025``: the same 2026-07-28 request through an ``mcp`` route with
  ``backend_era = "2025-11-25"`` to a 2025-11-25 backend (HAProxy opening a session on
  ``initialize``, ``bench.targets.handshake_responder``): each request sent within the
  worker's upstream session, its answer rewritten for the 2026-07-28 client;
- ``haproxy``: the anchor, with the 2026-07-28 request.

The backends are HAProxy answering the 2026-07-28 result (``resultType`` and all) to
every call. Cost per request = proxy CPU-seconds / requests.
"""

from __future__ import annotations

import json
import secrets
import urllib.request
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from bench import wrk
from bench.common import JSON, progress
from bench.targets import handshake_responder, haproxy_proxy, responder, switchboard
from bench.workloads import (
    MCP_ANSWERS,
    SDK_BODY,
    SDK_HEADERS,
    Settings,
    _summarize_wrk,
    _warm_up,
    _wrk_rounds,
)
from proxy.protocol.session_token import Keyring, SessionTokens
from proxy.routing import replica_id

HANDSHAKE = "2025-11-25"
HANDSHAKE_BODY = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "hello from the benchmark"}},
    },
    separators=(",", ":"),
)
NAMES = (
    "switchboard-2025",
    "switchboard-translated",
    "switchboard-2026",
    "switchboard-to-2025",
    "haproxy",
)


def _handshake_headers(session: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": HANDSHAKE,
        "Mcp-Session-Id": session,
    }


def _initialize(port: int) -> str:
    """A translated session's id, from ``initialize`` through the translating proxy (the
    backend's answer to its ``server/discover`` is the fixed result, id 1)."""
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": HANDSHAKE,
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "1"},
        },
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/mcp",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        session = answer.headers.get("mcp-session-id")
    if not session:
        raise RuntimeError("the translating proxy minted no session on initialize")
    return str(session)


def translation(tmp: Path, s: Settings) -> JSON:
    content_type, answer = MCP_ANSWERS["json"]
    c = max(s.post_concurrency)
    secret = secrets.token_urlsafe(36)
    keys = {"bench": secret}
    with ExitStack() as stack:
        direct = stack.enter_context(responder(tmp, answer, content_type))
        plain = stack.enter_context(
            switchboard(
                tmp, [direct.port], workers=s.workers, route_kind="mcp",
                name="switchboard-2025", session_keys=keys,
            )
        )  # fmt: skip
        translating = stack.enter_context(
            switchboard(
                tmp, [direct.port], workers=s.workers, route_kind="mcp",
                name="switchboard-translated", session_keys=keys,
                route_options={"backend_era": "2026-07-28"},
            )
        )  # fmt: skip
        old_backend = stack.enter_context(handshake_responder(tmp, answer))
        downgrading = stack.enter_context(
            switchboard(
                tmp, [old_backend.port], workers=s.workers, route_kind="mcp",
                name="switchboard-to-2025", session_keys=keys,
                route_options={"backend_era": "2025-11-25"},
            )
        )  # fmt: skip
        anchor = stack.enter_context(haproxy_proxy(tmp, [direct.port], threads=s.workers))
        tokens = SessionTokens(Keyring({"bench": secret.encode()}, "bench"))
        replica_session = tokens.issue(
            replica_id(f"http://127.0.0.1:{direct.port}"), "backend-session-1"
        )
        scripts = {
            "switchboard-2025": wrk.write_script(
                tmp / "handshake.lua",
                wrk.Request(HANDSHAKE_BODY, _handshake_headers(replica_session)),
            ),
            "switchboard-translated": wrk.write_script(
                tmp / "translated.lua",
                wrk.Request(HANDSHAKE_BODY, _handshake_headers(_initialize(translating.port))),
            ),
        }
        modern = wrk.write_script(tmp / "modern.lua", wrk.Request(SDK_BODY, SDK_HEADERS))
        targets = [
            plain,
            translating,
            replace(plain, name="switchboard-2026"),
            downgrading,
            anchor,
        ]
        progress("translation: targets up (untranslated 2025, translated, 2026); warming up")
        for target in targets:
            _warm_up(scripts.get(target.name, modern), [target], c)
        runs = _wrk_rounds(
            "translation",
            modern,
            targets,
            connections=c,
            rounds=s.rounds,
            duration=s.duration,
            backend=direct.server,
            scripts=scripts,
        )
    summary = _summarize_wrk(runs)
    cost = {
        name: round(1e6 / summary[name]["req_per_cpu_s"], 1)
        for name in NAMES
        if summary.get(name, {}).get("req_per_cpu_s")
    }
    return {
        "description": "a 2025-11-25 tools/call through an mcp route untranslated (the "
        "session a replica's) and translated to a 2026-07-28 backend (backend_era), the "
        "SDK-shaped 2026-07-28 call untranslated and translated to a 2025-11-25 backend "
        "(within an upstream session), HAProxy as the anchor; wrk + Lua",
        "concurrency": c,
        "rounds": s.rounds,
        "duration_s": s.duration,
        "summary": summary,
        "proxy_cpu_us_per_request": cost,
        "runs": runs,
    }
