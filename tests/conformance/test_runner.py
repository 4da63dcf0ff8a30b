"""conformance/run.py's own logic: reading the suite's results, comparing two runs, and
the proxy config it writes. The suite itself runs with `make conformance` (it needs Node
and the npm registry), not here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conformance import run
from proxy.config import load


def _scenario(out: Path, name: str, checks: list[dict[str, str]]) -> None:
    folder = out / f"server-{name}-2026-11-22T20-09-32-707Z"
    folder.mkdir(parents=True)
    (folder / "checks.json").write_text(json.dumps(checks))


def test_collect_checks_reads_every_scenario(tmp_path: Path) -> None:
    _scenario(tmp_path, "ping", [{"id": "ping", "status": "SUCCESS"}])
    _scenario(
        tmp_path,
        "server-sse-polling",
        [
            {"id": "outgoing-request", "status": "INFO"},
            {"id": "outgoing-request", "status": "INFO"},
            {"id": "server-sse-retry-field", "status": "FAILURE", "errorMessage": "no retry"},
            {"id": "odd", "status": "SKIPPED"},
        ],
    )
    (tmp_path / "conformance.log").write_text("not a scenario folder")
    stdout = "\n".join(
        f"=== Running scenario: {s} ===" for s in ("ping", "server-sse-polling", "crashed")
    )
    scenarios, checks, messages = run.collect_checks(tmp_path, stdout)
    assert scenarios == ["ping", "server-sse-polling", "crashed"]
    assert checks == {
        "ping/ping": "pass",
        "server-sse-polling/outgoing-request": "info",
        "server-sse-polling/outgoing-request#2": "info",
        "server-sse-polling/server-sse-retry-field": "fail",
        "server-sse-polling/odd": "skip",
        "crashed/(no result)": "error",
    }
    assert messages == {"server-sse-polling/server-sse-retry-field": "no retry"}


def _suite(target: str, checks: dict[str, str]) -> run.SuiteRun:
    return run.SuiteRun("2025-11-25", target, "http://x/mcp", 0, 1.0, [], checks)


def test_only_differences_count_not_failures() -> None:
    direct = _suite("direct", {"a/1": "pass", "a/2": "fail", "b/1": "pass"})
    proxy = _suite("proxy", {"a/1": "pass", "a/2": "fail", "b/1": "fail", "c/1": "pass"})
    rows = run.compare(direct, proxy)
    assert [(r.key, r.direct, r.proxy, r.same) for r in rows] == [
        ("a/1", "pass", "pass", True),
        ("a/2", "fail", "fail", True),  # the backend's own failure: not a difference
        ("b/1", "pass", "fail", False),
        ("c/1", run.MISSING, "pass", False),
    ]
    table = run.format_table("2025-11-25", rows)
    assert table.count("DIFFERENT") == 2
    assert table.endswith("4 checks, 2 different")


def test_markdown_summary_has_one_line_per_scenario() -> None:
    rows = [
        run.Row("ping/ping", "pass", "pass"),
        run.Row("ping/wire", "info", "info"),
        run.Row("dns/valid", "pass", "fail"),
    ]
    lines = run.markdown_summary("2026-07-28", rows).splitlines()
    assert "| ping | 2 | 1 info, 1 pass | 1 info, 1 pass | yes |" in lines
    assert "| dns | 1 | 1 pass | 1 fail | **no** |" in lines
    assert lines[-1] == "| **all 2 scenarios** | 3 | | | 1 differ |"


@pytest.mark.parametrize("origins", ["backend", "none"])
def test_proxy_config_is_valid(tmp_path: Path, origins: str) -> None:
    path = tmp_path / "switchboard.toml"
    path.write_text(run.proxy_config(18080, 19901, 13001, 2, origins))
    config = load(path, environ={})
    assert config.server.listen == ("127.0.0.1:18080",)
    assert config.server.workers == 2
    (route,) = config.routes
    assert route.kind == "mcp"
    assert route.backends == ("http://127.0.0.1:13001",)
    if origins == "backend":
        assert "http://127.0.0.1:18080" in route.origins
    else:
        assert not route.origins
