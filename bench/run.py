"""Side-by-side benchmark of Switchboard: backend directly, Switchboard, HAProxy (anchor).

    python -m bench.run                      # full profile, about 9-10 minutes
    python -m bench.run --quick              # the same workloads, small, under 2 minutes
    python -m bench.run --profile 100k       # >= 100,000 SSE streams for 5 min (16 cores)
    python -m bench.run --publish            # also update docs/benchmarks.md + docs/img/

Workloads (``--workloads post,mcp,sdk,hold,soak``; see ``bench.workloads``): small
JSON-RPC POST at concurrency 1 and 64; an SDK-shaped MCP tools/call through an mcp route,
answered with JSON and with one SSE event; the same through the official mcp SDK server; N idle SSE
streams and WebSockets held through each target; a soak of the most SSE streams the box
allows (file-descriptor bound) through Switchboard with periodic events. Targets are
interleaved (A B C A B C ...) over several rounds and medians reported, because the
machines this runs on are shared and noisy. Results: ``OUT/<profile>.json``,
``OUT/<profile>.md`` and PNG plots beside them.

Needs ``wrk`` and ``haproxy`` (``make apt``) and matplotlib for the plots (skipped with
a warning when it is missing). Runs offline: everything listens on 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench.common import JSON, REPO, machine, progress, raise_nofile, revision
from bench.kernel import tune_kernel
from bench.workloads import WORKLOADS, Settings, iter_names

PROFILES: dict[str, tuple[str, Settings]] = {
    "quick": (
        "post,mcp,sdk,hold,soak",
        Settings(
            rounds=2,
            duration=2,
            hold_streams=1000,
            broadcasts=2,
            soak_streams=2000,
            soak_seconds=15,
            soak_interval=3,
            settle=0.5,
        ),
    ),
    "full": (
        "post,mcp,sdk,hold,soak",
        Settings(
            rounds=3,
            duration=4,
            sdk_rounds=4,
            hold_streams=2500,
            broadcasts=3,
            soak_streams=0,  # 0: as many as the open-files limit allows
            soak_seconds=300,
            soak_interval=15,
        ),
    ),
    "100k": (
        "soak",
        Settings(
            workers=16,
            hold_streams=10000,
            soak_streams=100_000,
            soak_seconds=300,
            soak_interval=15,
            per_holder=5000,
            per_backend=8000,
            open_concurrency=128,
        ),
    ),
}
FD_RESERVE = 400
"""Descriptors a worker needs besides its streams (listeners, pools, pipes, epoll)."""


def fd_bound_streams(workers: int, nofile: int, per_worker_cap: int) -> int:
    """The most streams the workers can hold: two descriptors each (client + backend),
    a 10 % margin for SO_REUSEPORT's uneven spread, rounded down to a thousand."""
    per_worker = min(per_worker_cap, (nofile - FD_RESERVE) // 2)
    return max(1000, int(workers * per_worker * 0.9) // 1000 * 1000)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--quick", action="store_true", help="same as --profile quick")
    parser.add_argument("--workloads", help="comma-separated subset of post,mcp,sdk,hold,soak")
    parser.add_argument("--workers", type=int, help="Switchboard workers = HAProxy threads")
    parser.add_argument("--rounds", type=int, help="rounds of wrk runs (A B C per round)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run")
    parser.add_argument(
        "--concurrency", type=int, action="append", help="small-POST concurrency (repeatable)"
    )
    parser.add_argument("--sdk-concurrency", type=int)
    parser.add_argument("--sdk-rounds", type=int, help="rounds of the SDK workload")
    parser.add_argument(
        "--sdk-route-kind",
        choices=("http", "mcp"),
        help="route kind in front of the SDK server (mcp: MCP-aware route, if supported)",
    )
    parser.add_argument("--hold-streams", type=int, help="connections per hold measurement")
    parser.add_argument("--streams", type=int, help="SSE streams in the soak (0 = fd-bound)")
    parser.add_argument("--soak-seconds", type=float)
    parser.add_argument("--soak-interval", type=float, help="seconds between soak events")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--publish",
        action="store_true",
        help="write the results into docs/benchmarks.md and the plots into docs/img/",
    )
    parser.add_argument(
        "--tune-kernel",
        choices=("auto", "yes", "no"),
        default="auto",
        help="raise sysctls (somaxconn, port range, conntrack, ...) where writable and "
        "too low, restored afterwards; auto: only for 20,000+ streams",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.profile = "quick"
    return args


def settings_for(args: argparse.Namespace, nofile: int) -> tuple[str, Settings]:
    workloads, base = PROFILES[args.profile]
    s = dataclasses.replace(base, extra={})
    overrides = {
        "workers": args.workers,
        "rounds": args.rounds,
        "duration": args.duration,
        "sdk_concurrency": args.sdk_concurrency,
        "sdk_rounds": args.sdk_rounds,
        "sdk_route_kind": args.sdk_route_kind,
        "hold_streams": args.hold_streams,
        "soak_streams": args.streams,
        "soak_seconds": args.soak_seconds,
        "soak_interval": args.soak_interval,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(s, key, value)
    if args.rounds is not None and args.sdk_rounds is None:
        s.sdk_rounds = 0  # --rounds counts for both wrk workloads
    if args.concurrency:
        s.post_concurrency = tuple(args.concurrency)
    per_worker_fds = (nofile - FD_RESERVE) // 2
    if s.soak_streams <= 0:
        s.soak_streams = fd_bound_streams(s.workers, nofile, s.max_connections_per_worker)
        s.extra["soak_streams_rule"] = (
            f"fd-bound: {s.workers} workers x min({s.max_connections_per_worker}, "
            f"({nofile} - {FD_RESERVE}) / 2) x 0.9"
        )
    biggest = max(s.soak_streams, s.hold_streams)
    # Room for SO_REUSEPORT's uneven spread, within the descriptors a worker has.
    wanted = max(s.max_connections_per_worker, math.ceil(biggest / s.workers * 1.15))
    s.max_connections_per_worker = min(wanted, per_worker_fds)
    s.haproxy_maxconn = max(256, min(s.hold_streams * 2, per_worker_fds))
    return args.workloads or workloads, s


TOOLS_NEEDED = {
    "post": ("wrk", "haproxy"),
    "mcp": ("wrk", "haproxy"),
    "sdk": ("wrk", "haproxy"),
    "hold": ("haproxy",),
}
"""External programs per workload; the soak runs Switchboard alone."""


def check_tools(names: list[str]) -> None:
    needed = sorted({tool for name in names for tool in TOOLS_NEEDED.get(name, ())})
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        sys.exit(f"missing: {', '.join(missing)} (Debian packages; `make apt` installs them)")


def preflight(s: Settings, names: list[str], nofile: int) -> None:
    per_worker_fds = (nofile - FD_RESERVE) // 2
    if "soak" in names and s.soak_streams / s.workers * 1.05 > per_worker_fds:
        sys.exit(
            f"{s.soak_streams} streams over {s.workers} workers need about "
            f"{math.ceil(s.soak_streams / s.workers * 2.1) + FD_RESERVE} open files per "
            f"worker; the limit is {nofile}. Raise it (ulimit -n, LimitNOFILE) or use "
            f"--streams {fd_bound_streams(s.workers, nofile, 10**9)}."
        )
    if "hold" in names and s.hold_streams * 2 + FD_RESERVE > nofile:
        sys.exit(f"--hold-streams {s.hold_streams}: HAProxy (one process) needs 2 files each")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    nofile = raise_nofile()
    selected, s = settings_for(args, nofile)
    names = list(iter_names(selected))
    check_tools(names)
    preflight(s, names, nofile)
    command = "python -m bench.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    results: JSON = {
        "schema": 1,
        "profile": args.profile,
        "command": command.strip(),
        "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "revision": revision(),
        "settings": dataclasses.asdict(s),
        "workloads": {},
    }
    progress(
        f"bench.run profile {args.profile}: workloads {', '.join(names)}; "
        f"{s.workers} Switchboard workers / HAProxy threads; open-files limit {nofile}"
    )
    big = max(s.soak_streams if "soak" in names else 0, s.hold_streams if "hold" in names else 0)
    tune = args.tune_kernel == "yes" or (args.tune_kernel == "auto" and big >= 20000)
    with (
        tempfile.TemporaryDirectory(prefix="switchboard-bench-") as tmpdir,
        tune_kernel(big if tune else 0) as tuning,
    ):
        results["kernel_tuning"] = tuning
        for name in names:
            t0 = time.monotonic()
            progress(f"== workload {name} ==")
            results["workloads"][name] = WORKLOADS[name](Path(tmpdir), s)
            results["workloads"][name]["wall_s"] = round(time.monotonic() - t0, 1)
    results["wall_s"] = round(time.monotonic() - started, 1)
    results["targets"] = report.targets(results)
    paths = report.write(results, args.out, publish=args.publish)
    print(report.targets_table(results["targets"]))
    progress(
        f"done in {time.monotonic() - started:.0f} s (workloads {results['wall_s']:.0f} s); "
        f"wrote {', '.join(str(p) for p in paths)}"
    )


if __name__ == "__main__":
    main()
