"""The ``switchboard`` command line, run as a real subprocess (``python -m proxy``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import proxy

REPO_ROOT = Path(proxy.__file__).resolve().parent.parent
OPTIONS = ("--mcp", "--config", "--listen", "--route", "--workers", "--log-level")
SHORT_OPTIONS = ("-c", "-l", "-r", "-m", "-w")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(extra or {})
    return env


def switchboard(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO_ROOT,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[server]\nworkers = "x"\n[[routes]]\nprefix = "/"\nbackends = ["http://127.0.0.1:9"]\n',
        encoding="utf-8",
    )
    return path


def check_config_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = switchboard("check-config", *args, env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


# -- help ---------------------------------------------------------------------------------


def test_top_level_help_lists_the_commands() -> None:
    result = switchboard("--help")
    assert result.returncode == 0, result.stderr
    for command in ("run", "check-config", "demo-backend", "--version"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_command_help_mentions_every_option(command: str) -> None:
    result = switchboard(command, "--help")
    assert result.returncode == 0, result.stderr
    for option in (*OPTIONS, *SHORT_OPTIONS):
        assert option in result.stdout, option
    for level in ("debug", "info", "warning", "error"):
        assert level in result.stdout


def test_run_help_shows_examples_and_the_environment_convention() -> None:
    result = switchboard("run", "--help")
    assert "SWITCHBOARD_" in result.stdout
    assert "--mcp /mcp=" in result.stdout
    assert "--route /=" in result.stdout


def test_console_script_help() -> None:
    script = Path(sys.executable).with_name("switchboard")
    if not script.exists():
        pytest.skip("the switchboard console script is not installed in this environment")
    result = subprocess.run(
        [str(script), "run", "--help"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for option in OPTIONS:
        assert option in result.stdout


def test_version() -> None:
    result = switchboard("--version")
    assert result.returncode == 0
    assert f"switchboard {proxy.__version__}" in result.stdout


# -- check-config ---------------------------------------------------------------------------


def test_check_config_with_a_bad_config_exits_2_naming_file_key_and_problem(
    tmp_path: Path,
) -> None:
    path = bad_config(tmp_path)
    result = switchboard("check-config", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "config error" in result.stderr
    assert str(path) in result.stderr
    assert "server.workers" in result.stderr
    assert "Expected int, got str" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_with_a_missing_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    result = switchboard("check-config", "--config", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr
    assert "not found" in result.stderr


def test_check_config_with_a_route_flag_prints_json() -> None:
    data = check_config_json("--route", "/=http://127.0.0.1:9")
    [route] = data["routes"]
    assert route["prefix"] == "/"
    assert route["backends"] == ["http://127.0.0.1:9"]
    assert route["kind"] == "http"
    assert route["host"] is None
    assert route["strip_prefix"] is False
    assert data["demo"]["enabled"] is False  # --route alone: no bundled config


def test_check_config_with_an_mcp_flag_makes_an_mcp_route() -> None:
    data = check_config_json(
        "--mcp", "/mcp=http://127.0.0.1:9,http://127.0.0.1:10", "--route", "/=http://127.0.0.1:11"
    )
    kinds = {route["prefix"]: route["kind"] for route in data["routes"]}
    assert kinds == {"/mcp": "mcp", "/": "http"}


def test_check_config_without_options_shows_the_bundled_demo_config() -> None:
    data = check_config_json()
    assert data["demo"]["enabled"] is True
    assert any(route["prefix"] == "/mcp" for route in data["routes"])


def test_check_config_flags_override_environment_which_overrides_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(
        '[server]\nworkers = 2\n[log]\nlevel = "warning"\n'
        '[[routes]]\nprefix = "/a"\nbackends = ["http://127.0.0.1:9"]\n',
        encoding="utf-8",
    )
    env = {"SWITCHBOARD_SERVER__WORKERS": "3", "SWITCHBOARD_LOG__LEVEL": "error"}
    from_env = check_config_json("--config", str(path), env=env)
    assert from_env["server"]["workers"] == 3
    assert from_env["log"]["level"] == "error"
    flags = check_config_json(
        "--config",
        str(path),
        "--workers",
        "5",
        "--log-level",
        "debug",
        "--listen",
        "0.0.0.0:1",
        "-l",
        "[::1]:2",
        "--route",
        "/b=http://127.0.0.1:10,http://127.0.0.1:11",
        env=env,
    )
    assert flags["server"]["workers"] == 5
    assert flags["log"]["level"] == "debug"
    assert flags["server"]["listen"] == ["0.0.0.0:1", "[::1]:2"]
    assert [r["prefix"] for r in flags["routes"]] == ["/a", "/b"]
    assert flags["routes"][1]["backends"] == ["http://127.0.0.1:10", "http://127.0.0.1:11"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--workers", "two"), "whole number"),
        (("--listen", "nohost"), "HOST:PORT"),
        (("--route", "/api"), "PREFIX=URL"),
        (("--log-level", "loud"), "invalid choice"),
    ],
)
def test_bad_flags_exit_2_with_usage(args: tuple[str, ...], fragment: str) -> None:
    result = switchboard("check-config", *args)
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert fragment in result.stderr


def test_bad_route_flag_value_is_a_config_error() -> None:
    result = switchboard("check-config", "--route", "api=http://127.0.0.1:9")
    assert result.returncode == 2
    assert "command line" in result.stderr
    assert "routes[0].prefix" in result.stderr


# -- run --------------------------------------------------------------------------------------


def test_run_with_a_bad_config_fails_fast(tmp_path: Path) -> None:
    path = bad_config(tmp_path)
    result = switchboard("run", "--config", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr
    assert "server.workers" in result.stderr
    assert "worker(s) ready" not in result.stderr
    assert "Traceback" not in result.stderr


def _run_main_in_fresh_interpreter(*argv: str) -> dict[str, Any]:
    code = (
        "import json, sys\n"
        "from proxy.cli import main\n"
        "code = None\n"
        "try:\n"
        f"    main({list(argv)!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print(json.dumps({'code': code, 'modules': sorted(sys.modules)}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.splitlines()[-1])
    assert isinstance(data, dict)
    data["stderr"] = result.stderr
    return data


def test_run_with_a_bad_config_starts_no_supervisor_or_workers(tmp_path: Path) -> None:
    outcome = _run_main_in_fresh_interpreter("run", "--config", str(bad_config(tmp_path)))
    assert outcome["code"] == 2
    assert "server.workers" in outcome["stderr"]
    for module in ("proxy.supervisor", "proxy.worker", "proxy.net.listener"):
        assert module not in outcome["modules"], module
    assert "proxy.cli" in outcome["modules"]  # the check itself is sound


def test_run_without_routes_fails_fast(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("", encoding="utf-8")
    outcome = _run_main_in_fresh_interpreter("run", "--config", str(path))
    assert outcome["code"] == 2
    assert "no routes" in outcome["stderr"]
    assert "proxy.supervisor" not in outcome["modules"]
