"""Results out: the targets table, JSON, markdown tables and matplotlib plots.

``write`` puts ``<profile>.json``, ``<profile>.md`` and ``<profile>-*.png`` into the
output folder; with ``publish`` the markdown also replaces the block between the
``<!-- bench:results -->`` markers of docs/benchmarks.md (``<!-- bench:100k -->`` for
the 100k profile) and the plots go to docs/img/.
matplotlib is imported lazily: without it the plots are skipped with a warning.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import JSON, REPO, progress, ratio

OWN_BLOCK = frozenset({"100k"})
"""Profiles that publish to a docs block of their own; the others write ``results``."""
DOCS = REPO / "docs" / "benchmarks.md"
DOCS_IMG = REPO / "docs" / "img"
ORDER = ("direct", "switchboard", "haproxy")
COLORS = {"direct": "#8c8c8c", "switchboard": "#1f77b4", "haproxy": "#ff7f0e"}


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _fmt(value: Any, digits: int = 2) -> str:
    if not isinstance(value, int | float) or value != value:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


# -- targets ------------------------------------------------------------------------------


def _target(key: str, name: str, goal: str, measured: float, met: bool | None, detail: str) -> JSON:
    return {
        "key": key,
        "target": name,
        "goal": goal,
        "measured": None if measured != measured else measured,
        "met": met,
        "detail": detail,
    }


def _check(value: float, ok: Callable[[float], bool]) -> bool | None:
    return None if value != value else ok(value)


def targets(results: JSON) -> list[JSON]:
    """The performance targets, measured against their goals (None: not measured)."""
    w = results["workloads"]
    out: list[JSON] = []
    post = _get(w, "post", "concurrency") or {}
    cs = sorted(int(c) for c in post)
    if cs:
        hi, lo = post[str(cs[-1])]["summary"], post[str(cs[0])]["summary"]
        value = _num(_get(hi, "ratios", "req_per_cpu_s_switchboard_over_haproxy"))
        out.append(
            _target(
                "req_per_cpu_vs_haproxy",
                f"requests per proxy CPU-second ÷ HAProxy's (small POST, c={cs[-1]})",
                "≥ 0.5",
                value,
                _check(value, lambda v: v >= 0.5),
                f"Switchboard {_fmt(_get(hi, 'switchboard', 'req_per_cpu_s'))}, HAProxy "
                f"{_fmt(_get(hi, 'haproxy', 'req_per_cpu_s'))} req/CPU-s",
            )
        )
        sb_added = _num(_get(lo, "switchboard", "added_p50_ms"))
        hap_added = _num(_get(lo, "haproxy", "added_p50_ms"))
        value = ratio(sb_added, hap_added) if hap_added > 0 else math.nan
        met = _check(value, lambda v: v <= 2)
        note = ""
        if hap_added <= 0:
            # HAProxy's addition is below the noise of this run: no ratio can be formed,
            # and a Switchboard that adds a measurable amount is not within 2x of nothing.
            met = False if sb_added > 0 else None
            note = "; HAProxy's added p50 is not measurable (≤ 0) in this run"
        out.append(
            _target(
                "added_p50_vs_haproxy",
                f"added p50 latency ÷ HAProxy's added p50 (small POST, c={cs[0]})",
                "≤ 2",
                value,
                met,
                f"Switchboard {'+' * (sb_added > 0)}{_fmt(sb_added, 3)} ms, HAProxy "
                f"{'+' * (hap_added > 0)}{_fmt(hap_added, 3)} ms over "
                f"direct ({_fmt(_get(lo, 'direct', 'p50_ms'), 3)} ms){note}",
            )
        )
    for kind, answer in (("json", "JSON"), ("sse", "one SSE event")):
        summary = _get(w, "mcp", "answers", kind, "summary")
        if not summary:
            continue
        value = _num(_get(summary, "ratios", "req_per_cpu_s_switchboard_over_haproxy"))
        out.append(
            _target(
                f"mcp_{kind}_req_per_cpu_vs_haproxy",
                f"requests per proxy CPU-second ÷ HAProxy's (SDK-shaped MCP tools/call, "
                f"answered with {answer}, c={_get(w, 'mcp', 'concurrency')})",
                "≥ 0.4",
                value,
                _check(value, lambda v: v >= 0.4),
                f"Switchboard {_fmt(_get(summary, 'switchboard', 'req_per_cpu_s'))}, HAProxy "
                f"{_fmt(_get(summary, 'haproxy', 'req_per_cpu_s'))} req/CPU-s",
            )
        )
    per_event = _num(_get(w, "hold", "summary", "sse", "switchboard", "proxy_cpu_us_per_event"))
    if per_event == per_event:
        hap_event = _num(_get(w, "hold", "summary", "sse", "haproxy", "proxy_cpu_us_per_event"))
        out.append(
            _target(
                "cpu_per_sse_event_us",
                "worker CPU per relayed SSE event (µs, broadcast to held streams)",
                "≤ 40 µs",
                per_event,
                per_event <= 40,
                f"HAProxy {_fmt(hap_event, 0)} µs",
            )
        )
    soak_run = _get(w, "soak", "run")
    hold_rss = _num(_get(w, "hold", "summary", "sse", "switchboard", "rss_per_conn_bytes"))
    soak_rss = _num(_get(soak_run, "rss_per_conn_bytes"))
    rss = soak_rss if soak_rss == soak_rss else hold_rss
    if rss == rss:
        parts = []
        if soak_rss == soak_rss:
            parts.append(f"{_fmt(soak_rss / 1024, 1)} KiB at {soak_run['streams']} streams")
        if hold_rss == hold_rss:
            parts.append(
                f"{_fmt(hold_rss / 1024, 1)} KiB at {_get(w, 'hold', 'streams')} "
                f"(HAProxy {_fmt(_num(_get(w, 'hold', 'summary', 'sse', 'haproxy', 'rss_per_conn_bytes')) / 1024, 1)} KiB)"  # noqa: E501
            )
        out.append(
            _target(
                "rss_per_sse_conn_kib",
                "user-space RSS per idle held SSE client connection (KiB)",
                "≤ 5 KiB",
                rss / 1024,
                rss / 1024 <= 5,
                "; ".join(parts) + "; proxy processes' RSS growth ÷ streams",
            )
        )
    soak = _get(w, "soak")
    if soak:
        s = soak["run"]["soak"]
        planned = int(soak["streams"])
        held = int(soak["held"])
        failed = int(soak["run"]["opened"]["failed"])
        long_enough = float(s["seconds"]) >= 300
        met = held >= planned and failed == 0 and int(soak["drops"]) == 0 and long_enough
        out.append(
            _target(
                "sse_streams_held",
                "concurrent SSE streams held, zero drops, 5 min",
                f"fd-bound max here: {planned:,}"
                if _get(results, "settings", "extra", "soak_streams_rule")
                else f"{planned:,} (as asked)",
                float(held),
                met,
                f"{held:,} held for {s['seconds']:.0f} s through {soak['workers']} workers, "
                f"{soak['drops']} drops ({s['dropped']} closed, {s['missed_events']} events "
                f"missed, {s['behind_at_end']} behind), {failed} failed to open, "
                f"{s['events_broadcast']} broadcasts"
                + ("" if long_enough else " — shorter than 5 min: not a full soak"),
            )
        )
    sdk_ratio = _num(_get(w, "sdk", "summary", "switchboard", "rps_vs_direct"))
    if sdk_ratio == sdk_ratio:
        out.append(
            _target(
                "sdk_throughput_ratio",
                "SDK-backend throughput proxy ÷ direct",
                "≥ 0.95",
                sdk_ratio,
                sdk_ratio >= 0.95,
                f"direct {_fmt(_get(w, 'sdk', 'summary', 'direct', 'rps'))} req/s, Switchboard "
                f"{_fmt(_get(w, 'sdk', 'summary', 'switchboard', 'rps'))}, HAProxy "
                f"{_fmt(_get(w, 'sdk', 'summary', 'haproxy', 'rps'))} "
                f"(HAProxy ÷ direct {_fmt(_get(w, 'sdk', 'summary', 'haproxy', 'rps_vs_direct'))})"
                f", c={_get(w, 'sdk', 'concurrency')}; the backend got "
                + " / ".join(
                    _fmt(_get(w, "sdk", "summary", n, "backend_cores"))
                    for n in ("direct", "switchboard", "haproxy")
                )
                + " cores (direct / Switchboard / HAProxy)",
            )
        )
    return out


def targets_table(rows: Sequence[JSON]) -> str:
    lines = ["| Target | Goal | Measured | Met | Detail |", "|---|---|---|---|---|"]
    for row in rows:
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        lines.append(
            f"| {row['target']} | {row['goal']} | {_fmt(row['measured'])} | {met} | "
            f"{row['detail']} |"
        )
    return "\n".join(lines)


# -- markdown -----------------------------------------------------------------------------


def _wrk_table(summary: JSON, *, added: bool = True, backend_cpu: bool = False) -> list[str]:
    head = "| Target | req/s | p50 ms | p99 ms |"
    rule = "|---|---|---|---|"
    if added:
        head += " added p50 ms |"
        rule += "---|"
    head += " ÷ direct | proxy CPU-s | req per proxy CPU-s | backend cores |"
    rule += "---|---|---|---|"
    if backend_cpu:
        head += " req per backend CPU-s |"
        rule += "---|"
    lines = [head, rule]
    for name in ORDER:
        row = summary.get(name)
        if not row:
            continue
        cells = [
            name,
            _fmt(row.get("rps")),
            _fmt(row.get("p50_ms"), 3),
            _fmt(row.get("p99_ms"), 3),
        ]
        if added:
            cells.append(_fmt(row.get("added_p50_ms"), 3))
        cells += [
            _fmt(row.get("rps_vs_direct")),
            _fmt(row.get("proxy_cpu_s")),
            _fmt(row.get("req_per_cpu_s")),
            _fmt(row.get("backend_cores")),
        ]
        if backend_cpu:
            cells.append(_fmt(row.get("req_per_backend_cpu_s")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _revision_line(rev: Any) -> list[str]:
    if not isinstance(rev, dict) or not rev.get("commit"):
        return []
    changes = rev.get("proxy_changes") or []
    text = f"Code: commit `{rev['commit']}`"
    if changes:
        text += f" with uncommitted changes under proxy/ ({len(changes)} files)"
    return [text + ".", ""]


def markdown(results: JSON, img_prefix: str = "") -> str:
    m = results["machine"]
    w = results["workloads"]
    s = results["settings"]
    out = [
        f"Profile **{results['profile']}**, run {results['started_utc']}, took "
        f"{results['wall_s']:.0f} s:",
        "",
        "```sh",
        results["command"],
        "```",
        "",
        *_revision_line(results.get("revision")),
        f"Machine: {m['nproc']} CPUs ({m['cpu_model'] or 'unknown model'}), "
        f"{m['mem_total_gib']} GiB RAM, kernel {m['kernel']}, Python {m['python']}, "
        f"open-files limit {m['nofile_limit']}"
        + "".join(
            f", {version}"
            for version in (m["haproxy"].split(" - ")[0], m["wrk"])
            if version != "missing"
        )
        + "."
        + (
            " A shared, noisy machine: compare targets within one run, not across runs."
            if m.get("shared")
            else ""
        ),
        "",
        *(["```", m["free_g"], "```", ""] if m.get("free_g") else []),
        "### Targets",
        "",
        targets_table(results["targets"]),
        "",
    ]
    post = _get(w, "post")
    if post:
        out += [
            "### 1. Small JSON-RPC POST",
            "",
            f"{post['description']}; {post['body_bytes']}-byte body, {post['workers']} "
            f"Switchboard workers / HAProxy threads, {post['rounds']} interleaved rounds of "
            f"{post['duration_s']:.0f} s, medians. Added latency is paired by round. Proxy "
            f"CPU-s: user + system time of the proxy's processes during the run (Switchboard: "
            f"supervisor + workers; HAProxy: its process); backend cores: CPU-seconds the "
            f"backend used per second of the run.",
            "",
        ]
        for c, data in post["concurrency"].items():
            out += [f"Concurrency {c}:", "", *_wrk_table(data["summary"]), ""]
        out += [f"![small POST]({img_prefix}post.png)", ""]
    mcp = _get(w, "mcp")
    if mcp:
        out += [
            "### 2. SDK-shaped MCP tools/call through an mcp route",
            "",
            f"{mcp['description']}; concurrency {mcp['concurrency']}, {mcp['rounds']} "
            f"interleaved rounds of {mcp['duration_s']:.0f} s, medians. Every target was "
            f"checked first: 200 with the backend's answer.",
            "",
        ]
        for kind, data in mcp["answers"].items():
            answer = "JSON" if kind == "json" else "one SSE event"
            out += [f"Answered with {answer}:", "", *_wrk_table(data["summary"]), ""]
        out += [f"![MCP route]({img_prefix}mcp.png)", ""]
    sdk = _get(w, "sdk")
    if sdk:
        out += [
            "### 3. Through the official MCP SDK server",
            "",
            f"{sdk['description']}; concurrency {sdk['concurrency']}, {sdk.get('rounds', '?')} "
            f"interleaved rounds of {sdk.get('duration_s', 0):.0f} s, medians; route kind "
            f"`{sdk['route_kind']}`. Every target was checked first: 200 with the echoed text.",
            "",
            *_wrk_table(sdk["summary"], backend_cpu=True),
            "",
            f"![SDK backend]({img_prefix}sdk.png)",
            "",
        ]
    hold = _get(w, "hold")
    if hold:
        out += [
            "### 4. Idle held connections",
            "",
            f"{hold['streams']:,} connections per measurement, {hold['workers']} workers / "
            f"threads, a fresh proxy each time. RSS: growth of the proxy processes' RSS "
            f"(for *direct*: the backend processes') ÷ connections. TCP buffer memory: "
            f"/proc/net/sockstat `mem` growth ÷ connections (all four sockets of a proxied "
            f"stream); slab: /proc/meminfo `Slab` growth ÷ connections (host-wide, noisy). "
            f"Broadcast delay: from the start of a broadcast in the backend to the client's "
            f"receipt, over all connections and {s['broadcasts']} broadcasts; "
            f"'write→recv' starts at the backend's write to that connection's socket.",
            "",
        ]
        for kind, by_target in hold["summary"].items():
            out += [
                f"{'SSE streams' if kind == 'sse' else 'WebSockets'}:",
                "",
                "| Target | open | open s | opens/s | RSS/conn KiB | TCP buf B/conn | "
                "slab KiB/conn | broadcast p50 ms | p99 ms | write→recv p99 ms | "
                "proxy CPU µs/event | drops |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for name in ORDER:
                r = by_target.get(name)
                if not r:
                    continue
                out.append(
                    f"| {name} | {r['opened']:,} | {_fmt(r['open_s'], 1)} | "
                    f"{_fmt(r['open_per_s'])} | {_fmt(r['rss_per_conn_bytes'] / 1024, 1)} | "
                    f"{_fmt(r['tcp_mem_per_conn_bytes'], 0)} | "
                    f"{_fmt(r['slab_per_conn_bytes'] / 1024, 1)} | {_fmt(r['delay_p50_ms'], 1)}"
                    f" | {_fmt(r['delay_p99_ms'], 1)} | {_fmt(r['write_delay_p99_ms'], 1)} | "
                    f"{_fmt(r['proxy_cpu_us_per_event'], 0)} | "
                    f"{r['dropped'] + r['missed_events']} |"
                )
            out.append("")
        out += [f"![held connections]({img_prefix}hold.png)", ""]
    soak = _get(w, "soak")
    if soak:
        run = soak["run"]
        sk = run["soak"]
        out += [
            "### 5. Soak: the most SSE streams this box allows",
            "",
            f"{soak['streams']:,} SSE streams through Switchboard ({soak['workers']} workers)"
            + (
                f" — {s['extra']['soak_streams_rule']}"
                if s["extra"].get("soak_streams_rule")
                else ""
            )
            + f"; an event to every stream every {sk['interval_s']:.0f} s.",
            "",
            "| streams | opened in s | held s | broadcasts | open at end | closed | missed "
            "events | failed to open | broadcast p50 / p99 ms | RSS/conn KiB (start → end) | "
            "kernel TCP buf B/conn | proxy CPU-s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {soak['streams']:,} | {_fmt(run['opened']['seconds'], 1)} | {sk['seconds']:.0f}"
            f" | {sk['events_broadcast']} | {sk['open_at_end']:,} | {sk['dropped']} | "
            f"{sk['missed_events'] + sk['behind_at_end']} | {run['opened']['failed']} | "
            f"{_fmt(sk['delay_from_broadcast']['p50_ms'], 1)} / "
            f"{_fmt(sk['delay_from_broadcast']['p99_ms'], 1)} | "
            f"{_fmt(run['rss_per_conn_bytes'] / 1024, 1)} → "
            f"{_fmt(sk.get('rss_per_conn_bytes_after', math.nan) / 1024, 1)} | "
            f"{_fmt(run['tcp_mem_per_conn_bytes'], 0)} | {_fmt(sk['proxy_cpu_s'])} |",
            "",
            f"![soak]({img_prefix}soak.png)",
            "",
        ]
    tuning = results.get("kernel_tuning") or {}
    if tuning.get("changed") or tuning.get("not_writable"):
        out += [
            "Kernel settings raised for the run: "
            + (
                ", ".join(f"`{k}` {v['was']} → {v['set']}" for k, v in tuning["changed"].items())
                or "none"
            )
            + (
                "; not writable: " + ", ".join(f"`{k}`" for k in tuning["not_writable"])
                if tuning.get("not_writable")
                else ""
            ),
            "",
        ]
    return "\n".join(out)


# -- plots --------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def _bars(ax: Any, groups: Sequence[str], series: dict[str, list[float]], ylabel: str) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name, color=COLORS.get(name))
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def plots(results: JSON, folder: Path, prefix: str) -> list[Path]:
    plt = _pyplot()
    if plt is None:
        progress("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    w = results["workloads"]
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = folder / f"{prefix}{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    post = _get(w, "post", "concurrency")
    if post:
        cs = list(post)
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        groups = [f"c={c}" for c in cs]
        series = {
            n: [_num(_get(post[c], "summary", n, "rps")) for c in cs]
            for n in ORDER
            if _get(post[cs[0]], "summary", n)
        }
        _bars(axes[0], groups, series, "requests/s (median)")
        axes[0].set_title("Small POST throughput")
        series = {n: [_num(_get(post[c], "summary", n, "p50_ms")) for c in cs] for n in series}
        _bars(axes[1], groups, series, "p50 latency, ms (log)")
        axes[1].set_yscale("log")
        axes[1].set_title("Small POST p50 latency")
        series = {
            n: [_num(_get(post[c], "summary", n, "req_per_cpu_s")) for c in cs]
            for n in ("switchboard", "haproxy")
        }
        _bars(axes[2], groups, series, "requests per proxy CPU-second")
        axes[2].set_title("Proxy efficiency")
        save(fig, "post")
    answers = _get(w, "mcp", "answers")
    if answers:
        kinds = list(answers)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        groups = ["JSON answer" if k == "json" else "one SSE event" for k in kinds]
        series = {
            n: [_num(_get(answers[k], "summary", n, "rps")) for k in kinds]
            for n in ORDER
            if _get(answers[kinds[0]], "summary", n)
        }
        _bars(axes[0], groups, series, "requests/s (median)")
        axes[0].set_title(f"MCP tools/call, c={_get(w, 'mcp', 'concurrency')}")
        series = {
            n: [_num(_get(answers[k], "summary", n, "req_per_cpu_s")) for k in kinds]
            for n in ("switchboard", "haproxy")
        }
        _bars(axes[1], groups, series, "requests per proxy CPU-second")
        axes[1].set_title("Proxy efficiency, MCP route")
        save(fig, "mcp")
    sdk = _get(w, "sdk", "summary")
    if sdk:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        names = [n for n in ORDER if n in sdk]
        _bars(axes[0], ["tools/call"], {n: [_num(sdk[n]["rps"])] for n in names}, "requests/s")
        axes[0].set_title(f"SDK backend, c={_get(w, 'sdk', 'concurrency')}")
        _bars(
            axes[1],
            ["p50", "p99"],
            {n: [_num(sdk[n]["p50_ms"]), _num(sdk[n]["p99_ms"])] for n in names},
            "latency, ms",
        )
        axes[1].set_title("SDK backend latency")
        save(fig, "sdk")
    hold = _get(w, "hold", "summary")
    if hold:
        kinds = list(hold)
        names = [n for n in ORDER if any(n in hold[k] for k in kinds)]
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        labels = ["SSE" if k == "sse" else "WebSocket" for k in kinds]

        def metric(key: str, scale: float = 1.0) -> dict[str, list[float]]:
            return {
                n: [_num(_get(hold[k], n, key)) / scale for k in kinds]
                for n in names
                if n != "direct" or key != "rss_per_conn_bytes"
            }

        _bars(axes[0], labels, metric("rss_per_conn_bytes", 1024), "KiB per connection")
        axes[0].axhline(6, color="red", linestyle="--", linewidth=1)
        axes[0].set_title("Proxy RSS per held connection (goal ≤ 5 KiB)")
        _bars(axes[1], labels, metric("delay_p99_ms"), "ms")
        axes[1].set_title("Broadcast delay p99")
        _bars(axes[2], labels, metric("open_per_s"), "connections/s")
        axes[2].set_title("Opening rate")
        save(fig, "hold")
    soak = _get(w, "soak", "run", "soak")
    if soak and soak["timeline"]:
        tl = soak["timeline"]
        ts = [p["t_s"] for p in tl]
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        axes[0].plot(ts, [p["open"] for p in tl], label="open")
        axes[0].plot(ts, [p["delivered"] for p in tl], label="got the event", linestyle="--")
        axes[0].set_ylim(bottom=0)
        axes[0].set_xlabel("s")
        axes[0].set_title("Streams held / event delivered")
        axes[0].legend(fontsize=8)
        axes[1].plot(ts, [p["p50_ms"] for p in tl], label="p50")
        axes[1].plot(ts, [p["p99_ms"] for p in tl], label="p99")
        axes[1].set_xlabel("s")
        axes[1].set_ylabel("ms")
        axes[1].set_title("Broadcast delay per event")
        axes[1].legend(fontsize=8)
        rss_mib = [p["rss_bytes"] / 2**20 for p in tl]
        axes[2].plot(ts, rss_mib)
        axes[2].set_xlabel("s")
        axes[2].set_ylabel("MiB")
        # Room above a flat line, which would otherwise sit on the frame.
        axes[2].set_ylim(bottom=0, top=max(rss_mib, default=1.0) * 1.15 or 1.0)
        axes[2].set_title("Switchboard RSS (all processes)")
        save(fig, "soak")
    return written


# -- files --------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """NaN is not JSON: write null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write(results: JSON, folder: Path, *, publish: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    profile = results["profile"]
    paths = [folder / f"{profile}.json", folder / f"{profile}.md"]
    paths[0].write_text(json.dumps(_clean(results), indent=1) + "\n")
    paths[1].write_text(markdown(results, img_prefix=f"{profile}-") + "\n")
    paths += plots(results, folder, f"{profile}-")
    if publish:
        paths += _publish(results)
    return paths


def _publish(results: JSON) -> list[Path]:
    """Plots into docs/img/ and the markdown into this profile's block of the docs (the
    100k run has its own, so a full run on a small box does not replace it)."""
    profile = results["profile"]
    key = profile if profile in OWN_BLOCK else "results"
    begin, end = f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"
    prefix = "bench-" if key == "results" else f"bench-{key}-"
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    paths = plots(results, DOCS_IMG, prefix)
    block = markdown(results, img_prefix=f"img/{prefix}")
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if begin not in text or end not in text:
        text = text.rstrip() + f"\n\n## Latest results ({key})\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    DOCS.write_text(f"{head}{begin}\n{block}\n{end}{tail}")
    return [*paths, DOCS]


def main() -> None:
    """Render the markdown and plots again from a results file, without running anything:
    ``python -m bench.report bench/results/full.json [--publish]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--publish", action="store_true")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    results["targets"] = targets(results)
    for path in write(results, args.results.parent, publish=args.publish):
        print(path)


if __name__ == "__main__":
    main()
