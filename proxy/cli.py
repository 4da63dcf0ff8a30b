"""The ``switchboard`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import trio

from proxy import __version__, control, native
from proxy.config import (
    BUNDLED_CONFIG,
    Config,
    ConfigError,
    effective_workers,
    load,
    parse_hostport,
    parse_route_flag,
    to_json,
)
from proxy.config_errors import Origins
from proxy.startup import StartupError

_DESCRIPTION = """\
Switchboard: a connection proxy for MCP servers (HTTP/1.1, SSE, WebSocket).

Run with no options to start the bundled demo: the proxy on http://127.0.0.1:8080 in
front of a small MCP server it starts beside itself.
"""

_RUN_EPILOG = f"""\
examples:
  switchboard run
      the bundled default config ({BUNDLED_CONFIG.name}) with the demo MCP backend
  switchboard run --config /etc/switchboard/switchboard.toml
  switchboard run --listen 0.0.0.0:8080 --mcp /mcp=http://10.0.0.5:8000,http://10.0.0.6:8000
      a config-less quick start: an MCP route over two replicas, other options default
  switchboard run --listen 0.0.0.0:8080 --route /=http://10.0.0.7:9000
      a plain HTTP route

Any config key can also be set from the environment as SWITCHBOARD_<SECTION>__<KEY>,
e.g. SWITCHBOARD_LIMITS__MAX_BODY_BYTES=1048576. Command-line flags win over the
environment, which wins over the file. See docs/configuration.md for every key.
"""


def _listen(value: str) -> str:
    try:
        parse_hostport(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _route(value: str) -> dict[str, Any]:
    try:
        return parse_route_flag(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _mcp_route(value: str) -> dict[str, Any]:
    try:
        return parse_route_flag(value, kind="mcp")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}")
    return int(value)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="TOML config file (default: the bundled demo config, unless --route is given)",
    )
    parser.add_argument(
        "--listen",
        "-l",
        action="append",
        type=_listen,
        metavar="HOST:PORT",
        help="address to listen on; repeat for several (overrides server.listen)",
    )
    parser.add_argument(
        "--route",
        "-r",
        action="append",
        type=_route,
        metavar="PREFIX=URL[,URL...]",
        help="proxy paths under PREFIX to these backends, round-robin; repeat for several "
        "routes (added to the config file's routes, or used alone without --config)",
    )
    parser.add_argument(
        "--mcp",
        "-m",
        action="append",
        type=_mcp_route,
        dest="route",
        metavar="PREFIX=URL[,URL...]",
        help="an MCP-aware route: sessions pinned to a replica with signed session ids, "
        "both protocol eras and legacy SSE, health-aware balancing; repeatable",
    )
    parser.add_argument(
        "--workers",
        "-w",
        type=_workers,
        metavar="N",
        help="worker processes (default: server.workers, 0 = one per CPU core)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="log level (default: log.level, info)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"switchboard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="start the proxy (supervisor + workers)",
        epilog=_RUN_EPILOG,
        description="Start the proxy: a supervisor and N SO_REUSEPORT worker processes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_options(run)

    check = commands.add_parser(
        "check-config",
        help="validate a config and print the effective settings as JSON",
        description="Load the config exactly as 'run' would, report the first problem "
        "(file, key, what is wrong) or print the effective settings; exit 0 if valid.",
    )
    _add_config_options(check)

    demo = commands.add_parser(
        "demo-backend",
        help="run only the bundled demo MCP backend",
        description="Serve the demo MCP server (official mcp SDK on hypercorn/trio).",
    )
    demo.add_argument(
        "--listen",
        default="127.0.0.1:8931",
        metavar="HOST:PORT",
        help="address to serve on (default: %(default)s)",
    )
    control.add_subcommands(commands)
    return parser


def config_from_args(args: argparse.Namespace, origins: Origins | None = None) -> Config:
    """The config ``run``/``check-config`` use; ``origins`` is filled with where each
    setting came from."""
    overrides: dict[str, dict[str, Any]] = {}
    if args.listen:
        overrides.setdefault("server", {})["listen"] = args.listen
    if args.workers is not None:
        overrides.setdefault("server", {})["workers"] = args.workers
    if args.log_level:
        overrides.setdefault("log", {})["level"] = args.log_level
    return load(args.config, overrides=overrides, routes=args.route, origins=origins)


def _print_ready(config: Config) -> None:
    workers = effective_workers(config)
    lines = [f"switchboard {__version__}: {workers} worker(s) ready"]
    for listen in config.server.listen:
        host, port = parse_hostport(listen)
        shown = f"[{host}]" if ":" in host else host
        for route in config.routes:
            lines.append(f"  http://{shown}:{port}{route.prefix} -> {', '.join(route.backends)}")
    if config.demo.enabled and config.server.listen:
        host, port = parse_hostport(config.server.listen[0])
        lines.append("try the demo MCP backend through the proxy:")
        lines.append(
            f"  curl -sN http://{host}:{port}/mcp -H 'content-type: application/json' "
            "-H 'accept: application/json, text/event-stream' -H 'mcp-protocol-version: "
            '2025-11-25\' -d \'{"jsonrpc":"2.0","id":1,"method":"initialize",'
            '"params":{"protocolVersion":"2025-11-25","capabilities":{},'
            '"clientInfo":{"name":"curl","version":"1"}}}\''
        )
    lines.append("Ctrl-C stops it.")
    print("\n".join(lines), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run", *(argv or [])])
    if getattr(args, "control_handler", None) is not None:
        raise SystemExit(control.run(args))
    if args.command == "demo-backend":
        from proxy.demo.backend import main as demo_main

        demo_main(["--listen", args.listen])
        return
    native.check()  # never run compiled code older than its source
    origins = Origins()
    try:
        config = config_from_args(args, origins)
    except ConfigError as exc:
        print(f"switchboard: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.command == "check-config":
        sys.stdout.buffer.write(to_json(config) + b"\n")
        return
    if not config.routes and not config.database.url:
        print(
            "switchboard: config error: no routes: give --route PREFIX=URL, a [[routes]] "
            "table in the config, or a control-plane database (database.url)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from proxy.observability import configure_logging
    from proxy.supervisor import Supervisor

    configure_logging(config.log.level, role="supervisor")
    supervisor = Supervisor(config, reload_config=lambda: config_from_args(args), origins=origins)
    try:
        trio.run(lambda: supervisor.run(on_ready=lambda: _print_ready(config)))
    except BaseException as exc:
        error = startup_error(exc)
        if error is None:
            raise
        print(f"switchboard: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def startup_error(exc: BaseException) -> StartupError | None:
    """``exc`` if it is a StartupError, or the first of a group (Trio nurseries wrap
    what their tasks raise) made only of StartupErrors; else None."""
    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        errors = [startup_error(inner) for inner in exc.exceptions]
        if errors and all(e is not None for e in errors):
            return errors[0]
    return None
