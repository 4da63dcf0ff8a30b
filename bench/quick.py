"""Quick side-by-side throughput check: backend direct vs through Switchboard.

The backend is HAProxy answering a fixed JSON-RPC result itself (``http-request
return``), so it is never the bottleneck. The targets are interleaved over several rounds
(direct, proxy, direct, proxy, ...) and medians reported, because these machines are
shared and noisy. CPU seconds of the proxy processes come from /proc.

    python -m bench.quick [--workers 1] [--rounds 3] [--duration 5] [--connections 64]
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BODY = (
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo",'
    b'"arguments":{"text":"hello from the benchmark"}}}'
)
RESULT = '{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hello"}]}}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def start_backend(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    cfg = tmp / "backend.cfg"
    cfg.write_text(
        "global\n  maxconn 8000\n  nbthread 1\n"
        "defaults\n  mode http\n  timeout client 30s\n  timeout server 30s\n"
        "  timeout connect 5s\n"
        f"frontend backend\n  bind 127.0.0.1:{port}\n"
        f"  http-request return status 200 content-type application/json string '{RESULT}'\n"
    )
    return subprocess.Popen(["haproxy", "-f", str(cfg)], stdout=subprocess.DEVNULL)


def start_proxy(tmp: Path, port: int, backend_port: int, workers: int) -> subprocess.Popen[bytes]:
    cfg = tmp / "switchboard.toml"
    cfg.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nworkers = {workers}\n'
        "[log]\naccess_log = false\n"
        f'[[routes]]\nprefix = "/"\nbackends = ["http://127.0.0.1:{backend_port}"]\n'
    )
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def cpu_seconds(root: psutil.Process) -> float:
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def run_wrk(tmp: Path, port: int, connections: int, duration: int) -> dict[str, float]:
    script = tmp / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{BODY.decode()}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "1",
            "-c",
            str(connections),
            "-d",
            f"{duration}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/mcp",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p50 = _latency(out, "50%")
    p99 = _latency(out, "99%")
    return {
        "rps": rps,
        "requests": requests,
        "p50_ms": p50,
        "p99_ms": p99,
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def _latency(out: str, label: str) -> float:
    match = re.search(rf"{re.escape(label)}\s+([\d.]+)(us|ms|s)", out)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    for tool in ("wrk", "haproxy"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (make apt installs it)")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        backend_port, proxy_port = free_port(), free_port()
        backend = start_backend(tmp, backend_port)
        proxy = start_proxy(tmp, proxy_port, backend_port, args.workers)
        try:
            wait_port(backend_port)
            wait_port(proxy_port)
            time.sleep(0.5)
            proxy_root = psutil.Process(proxy.pid)
            results: dict[str, list[dict[str, float]]] = {"direct": [], "switchboard": []}
            for rnd in range(1, args.rounds + 1):
                for name, port in (("direct", backend_port), ("switchboard", proxy_port)):
                    cpu_before = cpu_seconds(proxy_root)
                    result = run_wrk(tmp, port, args.connections, args.duration)
                    if name == "switchboard":
                        cpu = cpu_seconds(proxy_root) - cpu_before
                        result["proxy_cpu_s"] = cpu
                        result["req_per_cpu_s"] = result["requests"] / cpu if cpu else 0.0
                    results[name].append(result)
                    print(
                        f"round {rnd}/{args.rounds} {name:12s} {result['rps']:10.0f} req/s "
                        f"p50 {result['p50_ms']:.3f} ms p99 {result['p99_ms']:.3f} ms",
                        flush=True,
                    )
            direct = statistics.median(r["rps"] for r in results["direct"])
            proxied = statistics.median(r["rps"] for r in results["switchboard"])
            per_cpu = statistics.median(r["req_per_cpu_s"] for r in results["switchboard"])
            print(f"\nmedian direct      {direct:10.0f} req/s")
            print(
                f"median switchboard {proxied:10.0f} req/s ({args.workers} worker(s), "
                f"c={args.connections})"
            )
            print(f"ratio proxy/direct {proxied / direct:10.3f}")
            print(f"switchboard requests per proxy CPU-second {per_cpu:10.0f}")
        finally:
            for proc in (proxy, backend):
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    main()
