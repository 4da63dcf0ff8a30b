"""Workload ``tracing``: what OpenTelemetry tracing costs a proxied request.

SDK-shaped MCP ``tools/call`` requests (no ``traceparent``: every trace is a root,
sampled by ratio) through an ``mcp`` route, at concurrency 64, to Switchboard with
tracing off, at 1 % and at 100 % sampling, and to HAProxy as the anchor, interleaved.
The traced proxies export over OTLP/HTTP to a collector stand-in (HAProxy answering 200
to every export), so the exporter's thread does its whole work, and its CPU is counted
with the workers'. Cost per request = proxy CPU-seconds / requests.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from bench import wrk
from bench.common import JSON, progress
from bench.targets import haproxy_proxy, responder, switchboard
from bench.workloads import (
    MCP_ANSWERS,
    SDK_BODY,
    SDK_HEADERS,
    Settings,
    _summarize_wrk,
    _warm_up,
    _wrk_rounds,
)

RATIOS = {"switchboard": 0.0, "switchboard-1pct": 0.01, "switchboard-100pct": 1.0}


def tracing(tmp: Path, s: Settings) -> JSON:
    script = wrk.write_script(tmp / "tracing.lua", wrk.Request(SDK_BODY, SDK_HEADERS))
    content_type, answer = MCP_ANSWERS["json"]
    c = max(s.post_concurrency)
    with ExitStack() as stack:
        direct = stack.enter_context(responder(tmp, answer, content_type))
        collector = stack.enter_context(responder(tmp, "{}"))
        targets = [direct]
        for name, ratio in RATIOS.items():
            section: dict[str, object] = {
                "sample_ratio": ratio,
                "endpoint": f"http://127.0.0.1:{collector.port}/v1/traces",
            }
            targets.append(
                stack.enter_context(
                    switchboard(
                        tmp,
                        [direct.port],
                        workers=s.workers,
                        route_kind="mcp",
                        name=name,
                        tracing=section,
                    )
                )
            )
        targets.append(stack.enter_context(haproxy_proxy(tmp, [direct.port], threads=s.workers)))
        progress("tracing: targets up (off, 1 %, 100 %); warming up")
        _warm_up(script, targets, c)
        runs = _wrk_rounds(
            "tracing",
            script,
            targets,
            connections=c,
            rounds=s.rounds,
            duration=s.duration,
            backend=direct.server,
        )
    summary = _summarize_wrk(runs)
    cost = {
        name: round(1e6 / summary[name]["req_per_cpu_s"], 1)
        for name in (*RATIOS, "haproxy")
        if summary.get(name, {}).get("req_per_cpu_s")
    }
    return {
        "description": "SDK-shaped 2026-07-28 tools/call through an mcp route, Switchboard "
        "with tracing off, at 1 % and at 100 % sampling (OTLP/HTTP export to a collector "
        "stand-in), HAProxy as the anchor; wrk + Lua",
        "concurrency": c,
        "rounds": s.rounds,
        "duration_s": s.duration,
        "summary": summary,
        "proxy_cpu_us_per_request": cost,
        "runs": runs,
    }
