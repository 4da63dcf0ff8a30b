"""Configuration (proxy.config): defaults, the bundled file, errors, overrides, JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h11
import msgspec
import pytest

from proxy import config as cfg
from proxy.config import (
    BUNDLED_CONFIG,
    Config,
    ConfigError,
    RouteConfig,
    effective_workers,
    from_json,
    load,
    parse_backend_url,
    parse_hostport,
    parse_route_flag,
    to_json,
)
from proxy.routing import RouteTable

NO_ENV: dict[str, str] = {}
ROUTE = '[[routes]]\nprefix = "/mcp"\nbackends = ["http://127.0.0.1:9001"]\n'


def write(tmp_path: Path, text: str, name: str = "switchboard.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, **kwargs: Any) -> Config:
    kwargs.setdefault("environ", NO_ENV)
    return load(write(tmp_path, text), **kwargs)


def config_error(tmp_path: Path, text: str, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, **kwargs)
    return info.value


def assert_names(exc: ConfigError, path: Path, key: str, *problem: str) -> None:
    """The error names the file, the key and what is wrong, in its message too."""
    assert exc.source == str(path)
    assert exc.key == key
    message = str(exc)
    assert message.startswith(f"{path}: {key}: ")
    for fragment in problem:
        assert fragment in exc.problem, (fragment, exc.problem)
        assert fragment in message


# -- defaults and the bundled config --------------------------------------------------


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, "")
    assert config == Config()
    assert config.server.listen == ("127.0.0.1:8080",)
    assert config.server.workers == 0
    assert config.limits.max_header_bytes == 16384
    assert config.limits.max_body_bytes == 16 * 1024 * 1024
    assert config.forwarding.host == "preserve"
    assert config.forwarding.x_forwarded_for == "append"
    assert config.forwarding.via == "switchboard"
    assert config.log.level == "info"
    assert config.routes == ()
    assert config.demo.enabled is False


def test_defaults_pass_validation() -> None:
    assert cfg.validate(Config(), "defaults") == Config()


def test_bundled_config_is_valid_and_runs_the_demo() -> None:
    assert BUNDLED_CONFIG.is_file()
    config = load(None, environ=NO_ENV)
    assert config == load(BUNDLED_CONFIG, environ=NO_ENV)
    assert config.demo.enabled is True
    parse_hostport(config.demo.listen)
    assert config.routes, "the bundled config must route somewhere"
    prefixes = [r.prefix for r in config.routes]
    assert "/mcp" in prefixes
    demo_url = f"http://{config.demo.listen}"
    mcp = next(r for r in config.routes if r.prefix == "/mcp")
    assert mcp.backends == (demo_url,)
    RouteTable.from_config(config.routes)  # buildable, as a worker would


def test_routes_on_the_command_line_replace_the_bundled_config() -> None:
    routes = [parse_route_flag("/=http://127.0.0.1:9")]
    config = load(None, environ=NO_ENV, routes=routes)
    assert config.demo.enabled is False
    assert config.server.workers == 0
    assert config.routes == (RouteConfig(prefix="/", backends=("http://127.0.0.1:9",)),)


def test_routes_on_the_command_line_are_added_to_a_files_routes(tmp_path: Path) -> None:
    routes = [parse_route_flag("/b=http://127.0.0.1:9002")]
    config = load_text(tmp_path, ROUTE, routes=routes)
    assert [r.prefix for r in config.routes] == ["/mcp", "/b"]


def test_command_line_route_errors_are_attributed_to_the_command_line() -> None:
    with pytest.raises(ConfigError) as info:
        load(None, environ=NO_ENV, routes=[parse_route_flag("api=http://127.0.0.1:9")])
    assert info.value.source == "command line"
    assert info.value.key == "routes[0].prefix"


def test_full_config_loads(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
[server]
listen = ["0.0.0.0:8080", "[::1]:8081"]
workers = 4
max_connections_per_worker = 100
retry_after_seconds = 2

[limits]
max_header_bytes = 8192
max_body_bytes = 0

[upstream]
connect_timeout = 1.5
stream_idle_timeout = 0

[forwarding]
host = "rewrite"
x_forwarded_for = "replace"
via = "edge"

[log]
level = "debug"
access_log = false

[[routes]]
prefix = "/mcp"
backends = ["http://10.0.0.5:8000", "http://[fd00::5]:8000/base"]
host = "preserve"
strip_prefix = true
""",
    )
    assert config.server.listen == ("0.0.0.0:8080", "[::1]:8081")
    assert effective_workers(config) == 4
    assert config.limits.max_body_bytes == 0
    assert config.upstream.connect_timeout == 1.5
    assert config.forwarding.host == "rewrite"
    assert config.log.access_log is False
    assert config.routes[0].strip_prefix is True
    assert config.routes[0].backends[1] == "http://[fd00::5]:8000/base"


def test_effective_workers_zero_means_cpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert effective_workers(Config()) == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert effective_workers(Config()) == 1


# -- errors: file, key, problem ----------------------------------------------------------


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    exc = config_error(tmp_path, '[server]\nworkers = "x"\n')
    assert_names(exc, tmp_path / "switchboard.toml", "server.workers", "int", "str")


def test_wrong_type_inside_a_route_names_the_route(tmp_path: Path) -> None:
    exc = config_error(tmp_path, '[[routes]]\nprefix = 5\nbackends = ["http://h:1"]\n')
    assert_names(exc, tmp_path / "switchboard.toml", "routes[0].prefix", "str")


def test_bad_enum_value_names_the_key_and_the_valid_values(tmp_path: Path) -> None:
    exc = config_error(tmp_path, '[forwarding]\nhost = "sometimes"\n')
    assert_names(exc, tmp_path / "switchboard.toml", "forwarding.host", "sometimes")
    assert exc.problem == "Invalid enum value 'sometimes' (valid values: preserve, rewrite)"
    exc = config_error(tmp_path, ROUTE + 'kind = "grpc"\n')
    assert exc.problem == "Invalid enum value 'grpc' (valid values: http, mcp)"
    exc = config_error(tmp_path, "", environ={"SWITCHBOARD_LOG__LEVEL": "loud"})
    assert str(exc) == (
        "environment variable SWITCHBOARD_LOG__LEVEL: log.level: "
        "Invalid enum value 'loud' (valid values: debug, info, warning, error)"
    )


def test_unknown_key_is_named(tmp_path: Path) -> None:
    exc = config_error(tmp_path, "[server]\nworkerz = 2\n")
    assert_names(exc, tmp_path / "switchboard.toml", "server", "unknown key", "workerz")


def test_unknown_key_in_a_route_is_named(tmp_path: Path) -> None:
    exc = config_error(tmp_path, ROUTE + "strip = true\n")
    assert_names(exc, tmp_path / "switchboard.toml", "routes[0]", "unknown key", "strip")


def test_missing_route_field_is_named(tmp_path: Path) -> None:
    exc = config_error(tmp_path, '[[routes]]\nprefix = "/a"\n')
    assert_names(exc, tmp_path / "switchboard.toml", "routes[0]", "backends")


def test_unknown_section_is_named_like_an_unknown_key(tmp_path: Path) -> None:
    # An unknown [section] is an unknown key at the top level: it should be reported the
    # same way as an unknown key inside a section ("unknown key NAME" under a non-empty
    # key), not as msgspec's raw text with an empty key.
    path = write(tmp_path, "[servers]\nworkers = 2\n")
    with pytest.raises(ConfigError) as info:
        load(path, environ=NO_ENV)
    exc = info.value
    assert exc.source == str(path)
    assert "servers" in str(exc)
    assert exc.key != "", f"no key named in {str(exc)!r}"
    assert exc.problem.startswith("unknown key"), exc.problem
    assert "servers" in exc.problem


@pytest.mark.parametrize(
    ("listen", "problem"),
    [
        ("nohost", "HOST:PORT"),
        ("127.0.0.1:http", "port"),
        ("127.0.0.1:70000", "port"),
        ("127.0.0.1:", "port"),
    ],
)
def test_bad_listen_address(tmp_path: Path, listen: str, problem: str) -> None:
    exc = config_error(tmp_path, f'[server]\nlisten = ["127.0.0.1:1", "{listen}"]\n')
    assert_names(exc, tmp_path / "switchboard.toml", "server.listen[1]", problem)


def test_empty_listen_list(tmp_path: Path) -> None:
    exc = config_error(tmp_path, "[server]\nlisten = []\n")
    assert_names(exc, tmp_path / "switchboard.toml", "server.listen", "at least one")


def test_bad_demo_listen_is_checked_only_when_enabled(tmp_path: Path) -> None:
    assert load_text(tmp_path, '[demo]\nlisten = "nope"\n').demo.listen == "nope"
    exc = config_error(tmp_path, '[demo]\nenabled = true\nlisten = "nope"\n')
    assert_names(exc, tmp_path / "switchboard.toml", "demo.listen", "HOST:PORT")


def test_route_prefix_without_leading_slash(tmp_path: Path) -> None:
    exc = config_error(tmp_path, '[[routes]]\nprefix = "mcp"\nbackends = ["http://h:1"]\n')
    assert_names(exc, tmp_path / "switchboard.toml", "routes[0].prefix", "must start with '/'")


def test_duplicate_prefix(tmp_path: Path) -> None:
    exc = config_error(tmp_path, ROUTE + ROUTE)
    assert_names(exc, tmp_path / "switchboard.toml", "routes[1].prefix", "duplicate", "/mcp")


def test_route_without_backends(tmp_path: Path) -> None:
    exc = config_error(tmp_path, '[[routes]]\nprefix = "/a"\nbackends = []\n')
    assert_names(exc, tmp_path / "switchboard.toml", "routes[0].backends", "at least one")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://127.0.0.1:9001", "http://"),
        ("127.0.0.1:9001", "http://"),
        ("http://", "no host"),
        ("http://:9001/x", "no host"),
        ("http://127.0.0.1:99999", "bad port"),
        ("http://127.0.0.1:9001/?x=1", "query"),
        ("http://127.0.0.1:9001/#frag", "fragment"),
    ],
)
def test_bad_backend_url(tmp_path: Path, url: str, problem: str) -> None:
    text = f'[[routes]]\nprefix = "/a"\nbackends = ["http://127.0.0.1:1", "{url}"]\n'
    exc = config_error(tmp_path, text)
    assert_names(exc, tmp_path / "switchboard.toml", "routes[0].backends[1]", problem)


def test_backend_url_port_zero_is_rejected_not_replaced_by_80(tmp_path: Path) -> None:
    # parse_backend_url does `parts.port or 80`, so ":0" silently becomes port 80.
    text = '[[routes]]\nprefix = "/a"\nbackends = ["http://127.0.0.1:0"]\n'
    exc = config_error(tmp_path, text)
    assert_names(exc, tmp_path / "switchboard.toml", "routes[0].backends[0]")


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/caf\u00e9", "http://127.0.0.1:9/a b"])
def test_backend_url_accepted_by_the_config_can_be_used_by_a_worker(url: str) -> None:
    # What validation accepts must not blow up later: the worker builds Backend objects
    # (ASCII base path) and h11 requests from it (a valid request-target).
    data = {"routes": [{"prefix": "/a", "backends": [url]}]}
    try:
        config = cfg.from_mapping(data, "f.toml")
    except ConfigError as exc:
        assert exc.key == "routes[0].backends[0]"
        return
    table = RouteTable.from_config(config.routes)
    backend = table.routes[0].backends[0]
    target = table.routes[0].upstream_target(backend, b"/a/x")
    h11.Request(method="GET", target=target, headers=[("host", "h")])


@pytest.mark.parametrize(
    ("section", "key", "value", "problem"),
    [
        ("limits", "header_timeout", "-1", "> 0"),
        ("limits", "header_timeout", "0", "> 0"),
        ("limits", "body_timeout", "-0.5", "> 0"),
        ("upstream", "connect_timeout", "-1", "> 0"),
        ("upstream", "stream_idle_timeout", "-1", ">= 0"),
        ("server", "drain_timeout", "-1", ">= 0"),
        ("server", "workers", "-1", ">= 0"),
        ("server", "max_connections_per_worker", "0", "> 0"),
        ("limits", "max_body_bytes", "-1", ">= 0"),
        ("limits", "max_header_bytes", "255", "at least 256"),
    ],
)
def test_out_of_range_numbers(
    tmp_path: Path, section: str, key: str, value: str, problem: str
) -> None:
    exc = config_error(tmp_path, f"[{section}]\n{key} = {value}\n")
    assert_names(exc, tmp_path / "switchboard.toml", f"{section}.{key}", problem)


def test_zero_is_allowed_where_it_means_unlimited(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        "[upstream]\nstream_idle_timeout = 0\nmax_connections_per_backend = 0\n"
        "[limits]\nmax_body_bytes = 0\n[server]\ndrain_timeout = 0\n",
    )
    assert config.upstream.stream_idle_timeout == 0
    assert config.server.drain_timeout == 0


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("limits", "header_timeout"),
        ("upstream", "response_timeout"),
        ("upstream", "stream_idle_timeout"),
        ("server", "drain_timeout"),
    ],
)
def test_nan_timeout_is_rejected(tmp_path: Path, section: str, key: str) -> None:
    # TOML has `nan`; every comparison with it is False, so `_positive` lets it through,
    # and trio then raises ValueError ("must not be NaN") on every request.
    exc = config_error(tmp_path, f"[{section}]\n{key} = nan\n")
    assert_names(exc, tmp_path / "switchboard.toml", f"{section}.{key}")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(path, environ=NO_ENV)
    assert info.value.source == str(path)
    assert "not found" in str(info.value)
    assert str(path) in str(info.value)


def test_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, environ=NO_ENV)  # a directory
    assert info.value.source == str(tmp_path)
    assert "cannot read" in info.value.problem


def test_invalid_toml(tmp_path: Path) -> None:
    exc = config_error(tmp_path, "[server\nworkers = 2\n")
    assert exc.source == str(tmp_path / "switchboard.toml")
    assert "not valid TOML" in exc.problem
    assert "line 1" in exc.problem  # tomllib's position survives


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    exc = config_error(tmp_path, "server = 5\n")
    assert_names(exc, tmp_path / "switchboard.toml", "server", "object")


# -- environment and command-line overrides ---------------------------------------------


def test_environment_override(tmp_path: Path) -> None:
    config = load_text(tmp_path, "", environ={"SWITCHBOARD_LIMITS__MAX_BODY_BYTES": "123"})
    assert config.limits.max_body_bytes == 123


def test_environment_overrides_merge_into_the_files_section(tmp_path: Path) -> None:
    text = '[server]\nworkers = 2\nlisten = ["127.0.0.1:1"]\n'
    config = load_text(tmp_path, text, environ={"SWITCHBOARD_SERVER__WORKERS": "3"})
    assert config.server.workers == 3  # env wins over the file
    assert config.server.listen == ("127.0.0.1:1",)  # the rest of the section is kept


def test_environment_values_are_toml_or_strings(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        "",
        environ={
            "SWITCHBOARD_SERVER__LISTEN": '["0.0.0.0:1", "0.0.0.0:2"]',
            "SWITCHBOARD_LOG__LEVEL": "debug",  # not TOML: taken as a string
            "SWITCHBOARD_LOG__ACCESS_LOG": "false",
            "SWITCHBOARD_UPSTREAM__CONNECT_TIMEOUT": "2.5",
        },
    )
    assert config.server.listen == ("0.0.0.0:1", "0.0.0.0:2")
    assert config.log.level == "debug"
    assert config.log.access_log is False
    assert config.upstream.connect_timeout == 2.5


def test_unrelated_environment_variables_are_ignored(tmp_path: Path) -> None:
    environ = {
        "SWITCHBOARD_WORKERS": "9",  # no section separator
        "OTHER_SERVER__WORKERS": "9",
        "switchboard_server__workers": "9",  # the prefix is case-sensitive
        "PATH": "/bin",
    }
    assert load_text(tmp_path, "", environ=environ) == Config()


def test_environment_errors_name_the_variable(tmp_path: Path) -> None:
    exc = config_error(tmp_path, "", environ={"SWITCHBOARD_SERVER__WORKERS": "many"})
    assert str(exc) == (
        "environment variable SWITCHBOARD_SERVER__WORKERS: server.workers: Expected int, got str"
    )
    exc = config_error(tmp_path, "", environ={"SWITCHBOARD_SERVER__NOPE": "1"})
    assert str(exc) == "environment variable SWITCHBOARD_SERVER__NOPE: server: unknown key nope"
    # Semantic checks too, and a list value's element.
    exc = config_error(tmp_path, "", environ={"SWITCHBOARD_SERVER__LISTEN": '["x"]'})
    assert str(exc) == (
        "environment variable SWITCHBOARD_SERVER__LISTEN: server.listen[0]: "
        "expected HOST:PORT, got 'x'"
    )
    # A bad value in the file is still the file's, whatever else the environment sets.
    exc = config_error(
        tmp_path, "[server]\nworkers = -1\n", environ={"SWITCHBOARD_SERVER__BACKLOG": "5"}
    )
    assert_names(exc, tmp_path / "switchboard.toml", "server.workers", ">= 0")


def test_environment_cannot_override_the_routes_list(tmp_path: Path) -> None:
    exc = config_error(tmp_path, ROUTE, environ={"SWITCHBOARD_ROUTES__PREFIX": "/x"})
    assert exc.key == "routes"
    assert "table" in exc.problem


def test_os_environ_is_used_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_LIMITS__MAX_BODY_BYTES", "77")
    assert load(write(tmp_path, "")).limits.max_body_bytes == 77


def test_command_line_overrides_win_over_environment(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        "[server]\nworkers = 2\n",
        environ={"SWITCHBOARD_SERVER__WORKERS": "3", "SWITCHBOARD_LOG__LEVEL": "error"},
        overrides={"server": {"workers": 5}, "log": {"level": "debug"}},
    )
    assert config.server.workers == 5
    assert config.log.level == "debug"


def test_command_line_override_errors_are_validated(tmp_path: Path) -> None:
    exc = config_error(tmp_path, "", overrides={"server": {"listen": ["bad"]}})
    assert str(exc) == "--listen: server.listen[0]: expected HOST:PORT, got 'bad'"


# -- parse_route_flag, parse_hostport, parse_backend_url ------------------------------------


@pytest.mark.parametrize(
    ("flag", "prefix", "backends"),
    [
        ("/=http://127.0.0.1:9", "/", ["http://127.0.0.1:9"]),
        ("/mcp=http://a:1,http://b:2", "/mcp", ["http://a:1", "http://b:2"]),
        ("/mcp=http://a:1, http://b:2 ,", "/mcp", ["http://a:1", "http://b:2"]),
        ("/q=http://a:1/x=y", "/q", ["http://a:1/x=y"]),
    ],
)
def test_parse_route_flag(flag: str, prefix: str, backends: list[str]) -> None:
    assert parse_route_flag(flag) == {"prefix": prefix, "backends": backends}


@pytest.mark.parametrize("flag", ["/mcp", "=http://a:1", "/mcp=", ""])
def test_parse_route_flag_rejects(flag: str) -> None:
    with pytest.raises(ValueError, match="PREFIX=URL"):
        parse_route_flag(flag)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        (":8080", ("127.0.0.1", 8080)),
        ("[::1]:8080", ("::1", 8080)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_parse_hostport(value: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(value) == expected


def test_parse_backend_url() -> None:
    assert parse_backend_url("http://h:81/base/") == ("h", 81, "/base")
    assert parse_backend_url("http://h") == ("h", 80, "")
    assert parse_backend_url("http://[::1]:9") == ("::1", 9, "")


# -- JSON ---------------------------------------------------------------------------------


def test_json_round_trip(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        '[server]\nlisten = ["[::1]:1"]\nworkers = 3\n[forwarding]\nhost = "rewrite"\n'
        + ROUTE
        + '[[routes]]\nprefix = "/b"\nbackends = ["http://h:2", "http://h:3/x"]\n'
        'strip_prefix = true\nhost = "preserve"\n',
    )
    encoded = to_json(config)
    assert from_json(encoded) == config
    assert from_json(to_json(Config())) == Config()
    data = json.loads(encoded)
    assert data["server"]["workers"] == 3
    route = data["routes"][1]
    assert route["prefix"] == "/b"
    assert route["backends"] == ["http://h:2", "http://h:3/x"]
    assert route["host"] == "preserve"
    assert route["strip_prefix"] is True
    # Every section travels to the workers (they get the config as this JSON).
    assert set(data) == {field.name for field in msgspec.structs.fields(Config)}
    assert {"server", "limits", "upstream", "forwarding", "routes"} <= set(data)


def test_from_json_rejects_unknown_fields() -> None:
    with pytest.raises(msgspec.ValidationError):
        from_json(b'{"server": {"wat": 1}}')


def test_backend_era_is_kept_on_mcp_routes(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        '[[routes]]\nprefix = "/mcp"\nkind = "mcp"\nbackends = ["http://127.0.0.1:9000"]\n'
        'backend_era = "2026-07-28"\n',
    )
    [route] = RouteTable.from_config(config.routes).routes
    assert route.backend_era == "2026-07-28"


@pytest.mark.parametrize(
    ("kind", "era", "says"),
    [("http", "2026-07-28", 'kind = "mcp" routes only'), ("mcp", "2099-01-01", "2026-07-28")],
)
def test_backend_era_errors_say_what_is_wrong(
    tmp_path: Path, kind: str, era: str, says: str
) -> None:
    exc = config_error(
        tmp_path,
        f'[[routes]]\nprefix = "/x"\nkind = "{kind}"\nbackends = ["http://127.0.0.1:9000"]\n'
        f'backend_era = "{era}"\n',
    )
    assert_names(exc, tmp_path / "switchboard.toml", "routes[0].backend_era")
    assert says in str(exc)
