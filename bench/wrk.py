"""wrk with a Lua script: a fixed POST (body and headers), results as one JSON line.

The script's ``done`` hook prints the exact latency percentiles (µs) and error counts
(wrk counts non-2xx/3xx answers as ``errors.status``), so nothing is scraped from wrk's
human-readable output.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.common import JSON

_MARK = "WRKJSON "


def _lua_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True, slots=True)
class Request:
    body: str
    headers: Mapping[str, str]
    method: str = "POST"

    def lua(self) -> str:
        lines = [f"wrk.method = {_lua_string(self.method)}", f"wrk.body = {_lua_string(self.body)}"]
        for name, value in self.headers.items():
            lines.append(f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}")
        lines.append(
            """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,"errors_connect":%d,"errors_read":%d,' ..
    '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"p999_us":%d,"mean_us":%.1f,"max_us":%d}\\n',
    '"""
            + _MARK
            + """', summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.mean, latency.max))
end
"""
        )
        return "\n".join(lines)


def run(script: Path, url: str, *, connections: int, duration: float, threads: int = 1) -> JSON:
    """One wrk run; requests/s, latency percentiles (ms) and error counts."""
    threads = max(1, min(threads, connections))
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(duration))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith(_MARK)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    raw = json.loads(line[len(_MARK) :])
    seconds = raw["duration_us"] / 1e6
    errors = sum(int(raw[k]) for k in raw if k.startswith("errors_"))
    return {
        "rps": raw["requests"] / seconds if seconds else 0.0,
        "requests": raw["requests"],
        "seconds": seconds,
        "errors": errors,
        "non_2xx": raw["errors_status"],
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "p999_ms": raw["p999_us"] / 1000,
        "mean_ms": raw["mean_us"] / 1000,
    }


def write_script(path: Path, request: Request) -> Path:
    path.write_text(request.lua())
    return path
