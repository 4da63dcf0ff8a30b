"""The five workloads. Each returns a JSON-able dict: raw runs, per-target medians, and
the ratios the targets table needs.

1. ``post``: a small JSON-RPC POST (tools/call-sized, keep-alive) with wrk at several
   concurrencies, against the backend directly, Switchboard and HAProxy, interleaved.
2. ``mcp``: an SDK-shaped MCP request (a valid 2026-07-28 ``tools/call`` with the
   headers an SDK client sends, ``Accept: application/json, text/event-stream``) through
   an ``mcp`` route, answered by a fast backend with plain JSON and, separately, with a
   one-event SSE response: what MCP routing costs the proxy per request.
3. ``sdk``: the same through the official mcp SDK server (a valid 2026-07-28 tools/call
   of the demo backend's ``echo`` tool), checked once per target before measuring.
4. ``hold``: N idle SSE streams / WebSockets held through each target: RSS per
   connection, kernel socket memory, time to open, broadcast delay.
5. ``soak``: the largest number of SSE streams the box allows held through Switchboard
   for a fixed time with periodic events; drops and missed events must be zero.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import wrk
from bench.common import JSON, median, progress, ratio
from bench.hist import Histogram
from bench.procstat import ProcessTree, kernel_mem, rss_bytes
from bench.sse_hold import HolderFleet
from bench.targets import (
    StreamBackends,
    Target,
    haproxy_proxy,
    responder,
    sdk_backend,
    stream_backends,
    switchboard,
)

POST_BODY = (
    '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo",'
    '"arguments":{"text":"hello from the benchmark"}}}'
)
POST_RESULT = '{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hello"}]}}'
MODERN = "2026-07-28"
SDK_BODY = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {
            "name": "echo",
            "arguments": {"text": "hello from the benchmark"},
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": MODERN,
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"},
            },
        },
    },
    separators=(",", ":"),
)
SDK_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": MODERN,
    "Mcp-Method": "tools/call",
    "Mcp-Name": "echo",
}
MCP_RESULT = (
    '{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":'
    '"hello from the benchmark"}],"resultType":"complete"}}'
)
MCP_ANSWERS = {
    "json": ("application/json", MCP_RESULT),
    "sse": ("text/event-stream", f"event: message\ndata: {MCP_RESULT}\n\n"),
}
"""The fast backend's answer to the SDK-shaped request, by kind: plain JSON, or one SSE
event (what an SDK server streams for a call with nothing to report on the way)."""
TARGET_ORDER = ("direct", "switchboard", "haproxy")


@dataclass(slots=True)
class Settings:
    """Everything a profile decides (see ``bench.run.PROFILES``)."""

    workers: int = 2
    rounds: int = 3
    duration: float = 5.0
    post_concurrency: tuple[int, ...] = (1, 64)
    sdk_concurrency: int = 16
    sdk_rounds: int = 0
    """Rounds of the SDK workload (0: as ``rounds``); its backend is the noisiest part."""
    sdk_route_kind: str = "http"
    hold_kinds: tuple[str, ...] = ("sse", "ws")
    hold_streams: int = 4000
    hold_rounds: int = 1
    broadcasts: int = 3
    soak_streams: int = 16000
    soak_seconds: float = 300.0
    soak_interval: float = 5.0
    per_holder: int = 4000
    per_backend: int = 6000
    max_connections_per_worker: int = 9000
    haproxy_maxconn: int = 9800
    open_concurrency: int = 64
    settle: float = 2.0
    extra: dict[str, Any] = field(default_factory=dict)


def _fmt_run(name: str, res: JSON) -> str:
    text = (
        f"{name:12s} {res['rps']:9.0f} req/s  p50 {res['p50_ms']:7.3f} ms  "
        f"p99 {res['p99_ms']:7.3f} ms"
    )
    if "req_per_cpu_s" in res:
        text += f"  {res['req_per_cpu_s']:8.0f} req/proxy-CPU-s"
    if res["errors"]:
        text += f"  ERRORS {res['errors']}"
    return text


def _wrk_rounds(
    label: str,
    script: Path,
    targets: list[Target],
    *,
    connections: int,
    rounds: int,
    duration: float,
    backend: ProcessTree | None = None,
    scripts: dict[str, Path] | None = None,
) -> dict[str, list[JSON]]:
    """A B C A B C ...: every round runs every target once, in the same order. With
    ``backend``, also how many cores the backend got during each run; ``scripts``: a
    target's own script, by target name, in place of ``script``."""
    runs: dict[str, list[JSON]] = {t.name: [] for t in targets}
    for rnd in range(1, rounds + 1):
        for target in targets:
            per_pid0 = target.proxy.cpu_by_pid() if target.proxy else {}
            backend0 = backend.cpu() if backend else 0.0
            res = wrk.run(
                (scripts or {}).get(target.name, script),
                f"http://127.0.0.1:{target.port}/mcp",
                connections=connections,
                duration=duration,
            )
            if target.proxy is not None:
                per_pid = target.proxy.cpu_by_pid()
                # Root first (Switchboard's supervisor; HAProxy's only process).
                res["proxy_cpu_s_per_process"] = [
                    round(cpu - per_pid0.get(pid, 0.0), 2) for pid, cpu in per_pid.items()
                ]
                cpu = sum(res["proxy_cpu_s_per_process"])
                res["proxy_cpu_s"] = cpu
                res["req_per_cpu_s"] = ratio(res["requests"], cpu)
            if backend is not None:
                backend_cpu = backend.cpu() - backend0
                res["backend_cores"] = backend_cpu / res["seconds"]
                res["req_per_backend_cpu_s"] = ratio(res["requests"], backend_cpu)
            res["round"] = rnd
            runs[target.name].append(res)
            progress(f"{label} c={connections} round {rnd}/{rounds}: {_fmt_run(target.name, res)}")
    return runs


def _summarize_wrk(runs: dict[str, list[JSON]]) -> JSON:
    keys = (
        "rps",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "proxy_cpu_s",
        "req_per_cpu_s",
        "backend_cores",
        "req_per_backend_cpu_s",
        "errors",
    )
    out: JSON = {}
    for name, results in runs.items():
        out[name] = {k: median(float(r[k]) for r in results) for k in keys if k in results[0]}
    direct = runs.get("direct", [])
    for name, results in runs.items():
        if name == "direct" or not direct:
            continue
        # Added latency paired by round: the same moment of the shared box.
        added = [
            float(r["p50_ms"]) - float(d["p50_ms"]) for r, d in zip(results, direct, strict=False)
        ]
        out[name]["added_p50_ms"] = median(added)
        out[name]["added_p99_ms"] = median(
            float(r["p99_ms"]) - float(d["p99_ms"]) for r, d in zip(results, direct, strict=False)
        )
        out[name]["rps_vs_direct"] = ratio(out[name]["rps"], out["direct"]["rps"])
    sb, hap = out.get("switchboard"), out.get("haproxy")
    if sb and hap:
        out["ratios"] = {
            "req_per_cpu_s_switchboard_over_haproxy": ratio(
                sb.get("req_per_cpu_s", math.nan), hap.get("req_per_cpu_s", math.nan)
            ),
            # Undefined (null) when HAProxy added nothing measurable in this run.
            "added_p50_switchboard_over_haproxy": ratio(sb["added_p50_ms"], hap["added_p50_ms"])
            if hap["added_p50_ms"] > 0
            else math.nan,
            "rps_switchboard_over_direct": sb["rps_vs_direct"],
            "rps_haproxy_over_direct": hap["rps_vs_direct"],
        }
    return out


def _three_targets(
    stack: ExitStack, tmp: Path, direct: Target, s: Settings, route_kind: str = "http"
) -> list[Target]:
    sb = stack.enter_context(
        switchboard(tmp, [direct.port], workers=s.workers, route_kind=route_kind)
    )
    hap = stack.enter_context(haproxy_proxy(tmp, [direct.port], threads=s.workers))
    return [direct, sb, hap]


def _warm_up(script: Path, targets: list[Target], connections: int) -> None:
    for target in targets:
        wrk.run(script, f"http://127.0.0.1:{target.port}/mcp", connections=connections, duration=1)


def post(tmp: Path, s: Settings) -> JSON:
    """Workload 1: small JSON-RPC POST, HAProxy ``http-request return`` as the backend."""
    script = wrk.write_script(
        tmp / "post.lua", wrk.Request(POST_BODY, {"Content-Type": "application/json"})
    )
    with ExitStack() as stack:
        direct = stack.enter_context(responder(tmp, POST_RESULT))
        targets = _three_targets(stack, tmp, direct, s)
        progress(
            f"post: targets up (switchboard {s.workers} workers, haproxy nbthread "
            f"{s.workers}); warming up"
        )
        _warm_up(script, targets, max(s.post_concurrency))
        by_c: JSON = {}
        for c in s.post_concurrency:
            runs = _wrk_rounds(
                "post",
                script,
                targets,
                connections=c,
                rounds=s.rounds,
                duration=s.duration,
                backend=direct.server,
            )
            by_c[str(c)] = {"summary": _summarize_wrk(runs), "runs": runs}
    return {
        "description": "small JSON-RPC POST (tools/call-sized body, keep-alive), wrk + Lua; "
        "backend: HAProxy answering with http-request return",
        "body_bytes": len(POST_BODY),
        "workers": s.workers,
        "rounds": s.rounds,
        "duration_s": s.duration,
        "concurrency": by_c,
    }


def mcp(tmp: Path, s: Settings) -> JSON:
    """Workload 2: SDK-shaped MCP requests through an ``mcp`` route, the backend answering
    at once with JSON, then with one SSE event."""
    script = wrk.write_script(tmp / "mcp.lua", wrk.Request(SDK_BODY, SDK_HEADERS))
    c = max(s.post_concurrency)
    by_kind: JSON = {}
    for kind, (content_type, answer) in MCP_ANSWERS.items():
        with ExitStack() as stack:
            direct = stack.enter_context(responder(tmp, answer, content_type))
            targets = _three_targets(stack, tmp, direct, s, route_kind="mcp")
            checks = {t.name: check_mcp(t.port, kind) for t in targets}
            progress(f"mcp ({kind} answer): the call answered 200 through every target")
            _warm_up(script, targets, c)
            runs = _wrk_rounds(
                f"mcp-{kind}",
                script,
                targets,
                connections=c,
                rounds=s.rounds,
                duration=s.duration,
                backend=direct.server,
            )
        by_kind[kind] = {"checks": checks, "summary": _summarize_wrk(runs), "runs": runs}
    return {
        "description": "SDK-shaped 2026-07-28 tools/call (Accept: application/json, "
        "text/event-stream; MCP-Protocol-Version, Mcp-Method, Mcp-Name) through an mcp "
        "route, wrk + Lua; backend: HAProxy answering with http-request return (JSON, or "
        "one SSE event)",
        "concurrency": c,
        "rounds": s.rounds,
        "duration_s": s.duration,
        "answers": by_kind,
    }


def check_mcp(port: int, kind: str) -> JSON:
    """One SDK-shaped call through ``port``; raises unless it is 200 with the answer."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/mcp",
        data=SDK_BODY.encode(),
        headers=SDK_HEADERS,
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        status = response.status
        content_type = response.headers.get("content-type", "")
        body = response.read()
    expected_type, answer = MCP_ANSWERS[kind]
    if status != 200 or not content_type.startswith(expected_type) or body != answer.encode():
        raise RuntimeError(f"{kind} call through port {port} failed: {status} {body[:200]!r}")
    return {"status": status, "content_type": content_type, "bytes": len(body)}


def check_sdk(port: int) -> JSON:
    """One tools/call through ``port``; raises unless it is 200 with a result."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/mcp",
        data=SDK_BODY.encode(),
        headers=SDK_HEADERS,
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        status = response.status
        body = json.loads(response.read())
    result = body.get("result")
    if status != 200 or "error" in body or not isinstance(result, dict) or result.get("isError"):
        raise RuntimeError(f"tools/call through port {port} failed: {status} {body}")
    text = result["content"][0]["text"]
    if text != "hello from the benchmark":
        raise RuntimeError(f"unexpected echo {text!r}")
    return {"status": status, "result_text": text}


def sdk(tmp: Path, s: Settings) -> JSON:
    """Workload 2: the demo MCP server (official SDK) behind each target."""
    script = wrk.write_script(tmp / "sdk.lua", wrk.Request(SDK_BODY, SDK_HEADERS))
    with ExitStack() as stack:
        direct = stack.enter_context(sdk_backend())
        targets = _three_targets(stack, tmp, direct, s, route_kind=s.sdk_route_kind)
        checks = {t.name: check_sdk(t.port) for t in targets}
        progress("sdk: tools/call echo answered 200 with a result through every target")
        _warm_up(script, targets, s.sdk_concurrency)
        runs = _wrk_rounds(
            "sdk",
            script,
            targets,
            connections=s.sdk_concurrency,
            rounds=s.sdk_rounds or s.rounds,
            duration=s.duration,
            backend=direct.server,
        )
    return {
        "description": "2026-07-28 tools/call of the demo backend's echo tool (mcp SDK "
        "MCPServer, hypercorn on trio, one process), wrk + Lua",
        "concurrency": s.sdk_concurrency,
        "rounds": s.sdk_rounds or s.rounds,
        "duration_s": s.duration,
        "route_kind": s.sdk_route_kind,
        "checks": checks,
        "summary": _summarize_wrk(runs),
        "runs": runs,
    }


# -- held connections ----------------------------------------------------------------------


class _Sources:
    """Hands out fresh source addresses, so no run meets the TIME_WAIT sockets of the
    previous one on the same address."""

    next = 0

    @classmethod
    def take(cls, count: int) -> int:
        first = cls.next
        cls.next += count
        return first


def _proxy_for(
    name: str, tmp: Path, backends: StreamBackends, s: Settings
) -> AbstractContextManager[Target]:
    if name == "switchboard":
        return switchboard(
            tmp,
            backends.ports,
            workers=s.workers,
            max_connections_per_worker=s.max_connections_per_worker,
        )
    if name == "haproxy":
        return haproxy_proxy(tmp, backends.ports, threads=s.workers, maxconn=s.haproxy_maxconn)
    return nullcontext(backends.target())


def _wait_delivered(fleet: HolderFleet, seq: int, expected: int, timeout: float) -> JSON:
    deadline = time.monotonic() + timeout
    while True:
        status = fleet.status(seq)
        if status["have"] >= expected or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def _broadcast(
    backends: StreamBackends, fleet: HolderFleet, seq: int, timeout: float = 30.0
) -> JSON:
    fanout = backends.broadcast(seq)
    status = fleet.status()
    delivered = _wait_delivered(fleet, seq, int(status["open"]), timeout)
    return {
        "seq": seq,
        "backend_fanout_s": max(float(f["seconds"]) for f in fanout),
        "open": delivered["open"],
        "delivered": delivered["have"],
        "dropped": delivered["dropped"],
    }


def hold_one(
    tmp: Path,
    kind: str,
    target_name: str,
    streams: int,
    s: Settings,
    *,
    soak_seconds: float = 0.0,
    broadcasts: int | None = None,
    label: str = "hold",
) -> JSON:
    """Open ``streams`` connections of ``kind`` through ``target_name``, measure, broadcast,
    optionally soak, close. Proxy and backends are fresh for every call (RSS never
    shrinks back, so a reused proxy would skew the next baseline)."""
    n_backends = max(2, math.ceil(streams / s.per_backend))
    out: JSON = {"kind": kind, "target": target_name, "streams": streams}
    with ExitStack() as stack:
        backends = stack.enter_context(stream_backends(n_backends))
        target = stack.enter_context(_proxy_for(target_name, tmp, backends, s))
        time.sleep(0.5)
        measured = target.proxy.pids() if target.proxy else backends.pids()
        rss0, kmem0 = rss_bytes(measured), kernel_mem()
        cpu0 = target.proxy.cpu() if target.proxy else 0.0
        n_holders = math.ceil(streams / s.per_holder)
        fleet = HolderFleet(
            kind,
            target.ports,
            streams,
            per_process=s.per_holder,
            concurrency=s.open_concurrency,
            first_source=_Sources.take(n_holders),
        )
        stack.callback(fleet.close)
        tag = f"{label} {kind} {target_name}"
        opened = fleet.wait_opened(
            lambda o, f: progress(f"{tag}: {o}/{streams} open" + (f", {f} failed" if f else "")),
            timeout=max(120.0, streams / 50),
        )
        progress(
            f"{tag}: {opened['open']} open in {opened['seconds']:.1f} s"
            + (f", {opened['failed']} failed: {opened['errors']}" if opened["failed"] else "")
        )
        time.sleep(s.settle)
        if target.proxy:
            measured = target.proxy.pids()
        rss1, kmem1 = rss_bytes(measured), kernel_mem()
        cpu1 = target.proxy.cpu() if target.proxy else 0.0
        n_open = max(1, int(opened["open"]))
        kdelta = kmem1.minus(kmem0)
        out.update(
            opened=opened,
            open_per_s=ratio(opened["open"], opened["seconds"]),
            measured_processes="proxy" if target.proxy else "backend",
            n_processes=len(measured),
            rss_before_bytes=rss0,
            rss_after_bytes=rss1,
            rss_per_conn_bytes=(rss1 - rss0) / n_open,
            tcp_sockets_delta=kdelta.tcp_inuse,
            tcp_mem_per_conn_bytes=kdelta.tcp_mem_bytes / n_open,
            slab_per_conn_bytes=kdelta.slab_bytes / n_open,
            proxy_cpu_s_open=cpu1 - cpu0,
            backend_streams=backends.streams(),
        )
        seq = 0
        fanouts = []
        for _ in range(s.broadcasts if broadcasts is None else broadcasts):
            seq += 1
            fanouts.append(_broadcast(backends, fleet, seq))
            time.sleep(0.2)
        cpu2 = target.proxy.cpu() if target.proxy else 0.0
        report = fleet.report(reset=True)
        events = max(1, int(report["events"]))
        out.update(
            broadcasts=fanouts,
            delay_from_broadcast=report["from_broadcast"].summary_ms(),
            delay_from_write=report["from_write"].summary_ms(),
            proxy_cpu_us_per_event=(cpu2 - cpu1) / events * 1e6 if target.proxy else math.nan,
        )
        progress(
            f"{tag}: RSS {out['rss_per_conn_bytes'] / 1024:.1f} KiB/conn, broadcast p99 "
            f"{out['delay_from_broadcast']['p99_ms']:.1f} ms (from the write: "
            f"{out['delay_from_write']['p99_ms']:.1f} ms)"
        )
        if soak_seconds > 0:
            out["soak"] = _soak(backends, fleet, target, seq, soak_seconds, s.soak_interval, tag)
            if target.proxy:
                out["soak"]["rss_per_conn_bytes_after"] = (
                    rss_bytes(target.proxy.pids()) - rss0
                ) / n_open
        final = fleet.report(reset=True)
        out["dropped"] = final["dropped"]
        out["drop_reasons"] = final["drop_reasons"]
        out["missed_events"] = final["missed"]
    return out


def _soak(
    backends: StreamBackends,
    fleet: HolderFleet,
    target: Target,
    seq: int,
    seconds: float,
    interval: float,
    tag: str,
) -> JSON:
    """Periodic broadcasts for ``seconds``, the last one at the end; every one is checked
    for delivery (each connection must receive every event, in order)."""
    start = time.monotonic()
    cpu0 = target.proxy.cpu() if target.proxy else 0.0
    timeline: list[JSON] = []
    total = Histogram()
    next_at = start
    last_print = start
    end = start + seconds
    while True:
        seq += 1
        b = _broadcast(backends, fleet, seq, timeout=max(10.0, interval))
        rep = fleet.report(reset=True)
        total.merge(rep["from_broadcast"])
        delay = rep["from_broadcast"].summary_ms()
        timeline.append(
            {
                "t_s": round(time.monotonic() - start, 2),
                "seq": seq,
                "open": b["open"],
                "delivered": b["delivered"],
                "dropped": rep["dropped"],
                "missed": rep["missed"],
                "p50_ms": delay["p50_ms"],
                "p99_ms": delay["p99_ms"],
                "rss_bytes": target.proxy.rss() if target.proxy else 0,
            }
        )
        if time.monotonic() - last_print >= 10 or not timeline[:-1]:
            last_print = time.monotonic()
            progress(
                f"{tag} soak {time.monotonic() - start:5.0f}/{seconds:.0f} s: open {b['open']}, "
                f"dropped {rep['dropped']}, missed {rep['missed']}, event {seq} delivered to "
                f"{b['delivered']}, p99 {delay['p99_ms']:.1f} ms"
            )
        if time.monotonic() >= end:
            break  # the last event went out at the end of the soak and was checked
        next_at = min(next_at + interval, end)
        time.sleep(max(0.0, next_at - time.monotonic()))
    held_s = time.monotonic() - start
    cpu = (target.proxy.cpu() if target.proxy else 0.0) - cpu0
    final = fleet.report(reset=False, final_seq=seq)
    return {
        "seconds": round(held_s, 1),
        "interval_s": interval,
        "events_broadcast": len(timeline),
        "open_at_end": final["open"],
        "dropped": final["dropped"],
        "missed_events": final["missed"],
        "behind_at_end": final["behind"],
        "delay_from_broadcast": total.summary_ms(),
        "proxy_cpu_s": cpu,
        "timeline": timeline,
    }


def _hold_summary(runs: list[JSON]) -> JSON:
    """Medians per kind and target over rounds."""
    keys = (
        "rss_per_conn_bytes",
        "tcp_mem_per_conn_bytes",
        "slab_per_conn_bytes",
        "open_per_s",
        "proxy_cpu_us_per_event",
    )
    out: JSON = {}
    for run in runs:
        out.setdefault(run["kind"], {}).setdefault(run["target"], []).append(run)
    summary: JSON = {}
    for kind, by_target in out.items():
        summary[kind] = {}
        for name, rs in by_target.items():
            row: JSON = {k: median(float(r[k]) for r in rs) for k in keys}
            row["open_s"] = median(float(r["opened"]["seconds"]) for r in rs)
            row["opened"] = min(int(r["opened"]["open"]) for r in rs)
            row["failed"] = max(int(r["opened"]["failed"]) for r in rs)
            row["delay_p50_ms"] = median(float(r["delay_from_broadcast"]["p50_ms"]) for r in rs)
            row["delay_p99_ms"] = median(float(r["delay_from_broadcast"]["p99_ms"]) for r in rs)
            row["write_delay_p99_ms"] = median(float(r["delay_from_write"]["p99_ms"]) for r in rs)
            row["dropped"] = sum(int(r["dropped"]) for r in rs)
            row["missed_events"] = sum(int(r["missed_events"]) for r in rs)
            summary[kind][name] = row
    return summary


def hold(tmp: Path, s: Settings) -> JSON:
    """Workload 3: the same N held connections through each target, interleaved."""
    runs: list[JSON] = []
    for rnd in range(1, s.hold_rounds + 1):
        for kind in s.hold_kinds:
            for name in TARGET_ORDER:
                run = hold_one(tmp, kind, name, s.hold_streams, s, label=f"hold r{rnd}")
                run["round"] = rnd
                runs.append(run)
    return {
        "description": "N idle connections held through each target; one fresh proxy and "
        "fresh backends per measurement",
        "streams": s.hold_streams,
        "rounds": s.hold_rounds,
        "workers": s.workers,
        "summary": _hold_summary(runs),
        "runs": runs,
    }


def soak(tmp: Path, s: Settings) -> JSON:
    """Workload 4: the most SSE streams this box allows, held through Switchboard."""
    run = hold_one(
        tmp,
        "sse",
        "switchboard",
        s.soak_streams,
        s,
        soak_seconds=s.soak_seconds,
        broadcasts=1,
        label="soak",
    )
    soak_part = run["soak"]
    return {
        "description": "SSE streams held through Switchboard with periodic broadcasts",
        "streams": s.soak_streams,
        "workers": s.workers,
        "run": run,
        "held": soak_part["open_at_end"],
        "drops": int(run["dropped"])
        + int(soak_part["missed_events"])
        + int(soak_part["behind_at_end"]),
    }


WORKLOADS: dict[str, Callable[[Path, Settings], JSON]] = {
    "post": post,
    "mcp": mcp,
    "sdk": sdk,
    "hold": hold,
    "soak": soak,
}


def _tracing(tmp: Path, s: Settings) -> JSON:
    from bench.tracing_cost import tracing  # it imports from this module

    return tracing(tmp, s)


WORKLOADS["tracing"] = _tracing


def _translation(tmp: Path, s: Settings) -> JSON:
    from bench.translation_cost import translation  # it imports from this module

    return translation(tmp, s)


WORKLOADS["translation"] = _translation


def iter_names(selected: str) -> Iterator[str]:
    for name in selected.split(","):
        name = name.strip()
        if name:
            if name not in WORKLOADS:
                raise ValueError(f"unknown workload {name!r} (have {', '.join(WORKLOADS)})")
            yield name
