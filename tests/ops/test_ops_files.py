"""The operations files are checked with the real tools, and against the code.

- ``docs/ops/haproxy.cfg`` passes ``haproxy -c`` with warnings fatal, and checks the
  admin port Switchboard really listens on;
- ``docs/ops/alerts.yml`` passes ``promtool check rules``, and its unit tests
  (``alerts.test.yml``, one or more per alert) pass ``promtool test rules``;
- ``docs/ops/grafana-dashboard.json`` is a dashboard whose every query parses as PromQL;
- every ``switchboard_*`` series the alerts, their tests and the dashboard use is one that
  ``proxy.metrics.Metrics`` exposes (asked of the real prometheus_client registry);
- ``systemd/switchboard.service`` passes ``systemd-analyze verify`` without a word, and
  its stop timeout outlasts the supervisor's drain.

A test is skipped only when its tool is not installed (``make test`` installs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from proxy.config import AdminConfig, ServerConfig, parse_hostport
from proxy.supervisor import _KILL_GRACE

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "docs" / "ops"
HAPROXY_CFG = OPS / "haproxy.cfg"
ALERTS = OPS / "alerts.yml"
ALERT_TESTS = OPS / "alerts.test.yml"
DASHBOARD = OPS / "grafana-dashboard.json"
UNIT = ROOT / "systemd" / "switchboard.service"
EXEC_START = "ExecStart=/usr/local/bin/switchboard run --config /etc/switchboard/switchboard.toml"

METRIC_NAME = re.compile(r"\bswitchboard_[a-z_]+")
# Grafana's variables, replaced by values PromQL accepts, so that promtool can parse.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$job": "switchboard",
    "$instance": ".+",
}
TARGET_CONNECTIONS = 100_000
"""What the files are sized for: client connections per host / through HAProxy."""


def tool(name: str) -> str:
    # /usr/sbin (haproxy) is not on an ordinary user's PATH on Debian.
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    path = shutil.which(name, path=search)
    if path is None:
        pytest.skip(f"{name} is not installed (make test installs it)")
    return path


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


def report(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


# -- what proxy/metrics.py exposes -------------------------------------------------------

_LIST_FAMILIES = """
import json
from prometheus_client import REGISTRY
from proxy.metrics import Metrics

Metrics()
print(json.dumps({f.name: f.type for f in REGISTRY.collect() if f.name.startswith("switchboard_")}))
"""


@cache
def exposed_series_names() -> frozenset[str]:
    """The series names /metrics can carry, from the real metric objects: created in a
    fresh interpreter, since creating them registers them in its default registry."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    result = subprocess.run(
        [sys.executable, "-c", _LIST_FAMILIES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, report(result)
    families: dict[str, str] = json.loads(result.stdout)
    names: set[str] = set()
    for name, kind in families.items():
        if kind == "counter":
            # Multiprocess mode exports no _created series.
            names.add(f"{name}_total")
        elif kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return frozenset(names)


def test_exposed_names_are_read_from_the_code() -> None:
    names = exposed_series_names()
    assert "switchboard_requests_total" in names
    assert "switchboard_request_duration_seconds_bucket" in names
    assert "switchboard_connections_active" in names
    # A histogram's bare name is not a series.
    assert "switchboard_request_duration_seconds" not in names


# -- HAProxy -----------------------------------------------------------------------------


def test_haproxy_config_is_valid() -> None:
    # -dW: zero-warning mode, a warning fails the check too.
    result = run(tool("haproxy"), "-dW", "-c", "-f", str(HAPROXY_CFG))
    assert result.returncode == 0, report(result)


def haproxy_sections() -> dict[str, list[str]]:
    """Section header ("backend be_switchboard") -> its directives, comments dropped."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in HAPROXY_CFG.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not line[0].isspace():
            current = sections.setdefault(line.strip(), [])
        else:
            current.append(" ".join(line.split()))
    return sections


def test_haproxy_config_matches_switchboard() -> None:
    sections = haproxy_sections()
    backend = sections["backend be_switchboard"]
    assert "disabled" not in backend and "disabled" not in sections["frontend fe_mcp"]
    _, admin_port = parse_hostport(AdminConfig().listen)
    # Health checks go to the admin server's /ready, on its port.
    assert "option httpchk GET /ready" in backend
    servers_defaults = [d for d in backend if d.startswith("default-server ")]
    assert len(servers_defaults) == 1
    options = servers_defaults[0].split()
    assert options[options.index("port") + 1] == str(admin_port)
    assert "check" in options
    # The client address reaches Switchboard in a PROXY v2 header.
    assert "send-proxy-v2" in options
    assert "balance leastconn" in backend
    global_maxconn = [d for d in sections["global"] if d.startswith("maxconn ")]
    assert global_maxconn and int(global_maxconn[0].split()[1]) >= TARGET_CONNECTIONS
    assert any(d.startswith("hard-stop-after ") for d in sections["global"])
    assert "timeout tunnel 1h" in sections["defaults"]


# -- Prometheus rules ------------------------------------------------------------------


def test_alert_rules_are_valid() -> None:
    result = run(tool("promtool"), "check", "rules", str(ALERTS))
    assert result.returncode == 0, report(result)


def test_alert_rule_unit_tests_pass() -> None:
    result = run(tool("promtool"), "test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, report(result)


def alert_blocks() -> dict[str, str]:
    """Alert name -> the text of its rule."""
    text = ALERTS.read_text()
    starts = list(re.finditer(r"^\s*- alert: (\w+)\s*$", text, flags=re.MULTILINE))
    assert starts, "no alert in alerts.yml"
    blocks = {}
    for match, following in zip(starts, [*starts[1:], None], strict=True):
        end = following.start() if following is not None else len(text)
        blocks[match.group(1)] = text[match.start() : end]
    return blocks


def test_every_alert_is_complete_and_unit_tested() -> None:
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    firing = set(
        re.findall(r"alertname: (\w+)\n\s+exp_alerts:", ALERT_TESTS.read_text(), re.MULTILINE)
    )
    for name, block in alert_blocks().items():
        for key in ("for:", "severity:", "summary:", "description:"):
            assert re.search(rf"^\s+{key}", block, re.MULTILINE), f"{name} has no {key}"
        assert name in tested, f"{name} has no unit test in alerts.test.yml"
        assert name in firing, f"no unit test in alerts.test.yml sees {name} fire"


def yaml_values(path: Path, key: str) -> list[str]:
    """The values of ``key:`` in a YAML file, plain scalars or ``|`` blocks (the only two
    forms these files use; there is no YAML parser among the dependencies)."""
    values = []
    lines = path.read_text().splitlines()
    for index, line in enumerate(lines):
        match = re.match(rf"^(\s*)(?:- )?{key}: ?(.*)$", line)
        if match is None:
            continue
        indent, value = len(match.group(1)), match.group(2).strip()
        if value in ("|", ">", "|-", ">-"):
            block = []
            for following in lines[index + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            value = "\n".join(block).strip()
        values.append(value.strip("'\""))
    return values


def test_alerts_use_only_exposed_metrics() -> None:
    exprs = yaml_values(ALERTS, "expr")
    assert len(exprs) == len(alert_blocks())
    series = yaml_values(ALERT_TESTS, "series")
    assert series
    for text in exprs + series:
        assert METRIC_NAME.search(text) or text.startswith("up{"), text
        unknown = set(METRIC_NAME.findall(text)) - exposed_series_names()
        assert not unknown, f"not exposed by proxy/metrics.py: {unknown} in {text}"


# -- Grafana -----------------------------------------------------------------------------


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def dashboard_queries() -> list[str]:
    """Every PromQL expression: panel targets and template variable queries."""
    board = dashboard()
    queries = [node["expr"] for node in walk(board["panels"]) if "expr" in node]
    for variable in board["templating"]["list"]:
        query = variable["query"]
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_dashboard_is_an_importable_dashboard() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    panels = [node for node in walk(board["panels"]) if "gridPos" in node]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for node in walk(board):
        datasource = node.get("datasource")
        if isinstance(datasource, dict) and datasource.get("type") == "prometheus":
            assert datasource["uid"] == "${DS_PROMETHEUS}"
    for panel in panels:
        if panel["type"] != "row":
            assert panel["targets"], f"panel {panel['title']!r} has no query"


def test_dashboard_uses_only_exposed_metrics() -> None:
    queries = dashboard_queries()
    assert len(queries) > 10
    used: set[str] = set()
    for query in queries:
        names = METRIC_NAME.findall(query)
        assert names, f"query on no Switchboard metric: {query}"
        used.update(names)
    unknown = used - exposed_series_names()
    assert not unknown, f"not exposed by proxy/metrics.py: {unknown}"


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses each query as the expression of a recording rule."""
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for index, query in enumerate(dashboard_queries()):
        if query.startswith("label_values("):
            # Grafana's own function; its argument is a PromQL selector.
            query = query.removeprefix("label_values(").rsplit(",", 1)[0]
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        assert "$" not in query, f"unknown Grafana variable in {query}"
        lines += [f"      - record: dashboard:query_{index}", f"        expr: {json.dumps(query)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = run(tool("promtool"), "check", "rules", str(rules))
    assert result.returncode == 0, report(result)


# -- systemd -----------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    """Map "Section.Key" to its values, in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|sec|min)?", value)
    assert match, f"unexpected time span {value!r}"
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze checks that ExecStart's binary exists, so the copy points it at
    this virtualenv's switchboard. It exits 0 on unknown keys and unparsable values (they
    are warnings), so any output about the unit fails the test. It does not look up
    User= (a missing user passes), so the unit is verified as written."""
    analyze = tool("systemd-analyze")
    text = UNIT.read_text()
    assert text.count(EXEC_START) == 1
    switchboard = Path(sys.prefix) / "bin" / "switchboard"
    assert switchboard.is_file(), "no switchboard console script: pip install -e ."
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("/usr/local/bin/switchboard", str(switchboard)))
    result = run(analyze, "verify", str(copy), cwd=tmp_path)
    about_unit = [
        line for line in (result.stdout + result.stderr).splitlines() if "switchboard" in line
    ]
    assert result.returncode == 0, report(result)
    assert not about_unit, report(result)


def test_systemd_unit_lifecycle_settings() -> None:
    unit = unit_settings()
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.NotifyAccess"] == ["main"]
    assert unit["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # SIGTERM to the supervisor only; it drains the workers and SIGKILLs stragglers
    # _KILL_GRACE after drain_timeout. systemd's SIGKILL must come later than that.
    assert unit["Service.KillMode"] == ["mixed"]
    drain = ServerConfig().drain_timeout + _KILL_GRACE
    assert seconds(unit["Service.TimeoutStopSec"][-1]) > drain
    assert seconds(unit["Service.WatchdogSec"][-1]) > 0
    assert int(unit["Service.LimitNOFILE"][-1]) >= 2 * TARGET_CONNECTIONS
    assert unit["Service.CapabilityBoundingSet"] == [""]
