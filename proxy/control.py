"""Control-plane commands: ``switchboard db|keys|routes ...`` against PostgreSQL.

``add_subcommands(commands)`` adds the ``db``, ``keys`` and ``routes`` command groups to
the main parser's subparsers; ``run(args)`` executes a parsed one and returns the exit
status. ``main(argv)`` is the same as a standalone parser (tests, development).

The database comes from ``--dsn`` or ``SWITCHBOARD_DATABASE_URL`` (a libpq URL or
key=value string, usually PgBouncer's address). Output is an aligned table for people,
or JSON with ``--json``. Exit status: 0 done, 1 the database refused or cannot be
reached (the message names host:port), 2 usage error (no DSN).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import psycopg

    from proxy.store import postgres as store

    Handler = Callable[[argparse.Namespace, psycopg.Connection[Any], TextIO, TextIO], int]

# psycopg, psycopg_pool and msgspec are imported inside the commands: adding these
# subcommands to the main parser must not slow down `switchboard run` (~180 ms).

DSN_ENV = "SWITCHBOARD_DATABASE_URL"


class UsageError(Exception):
    pass


# --- output -----------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, headers first."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [list(headers), *rows]
    ]
    return "\n".join(lines)


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def _json(value: Any) -> str:
    import msgspec

    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


def _key_json(info: store.KeyInfo) -> dict[str, Any]:
    return {
        "prefix": info.prefix,
        "name": info.name,
        "tenant": info.tenant,
        "created_at": info.created_at.isoformat(),
        "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None,
        "limits": info.limits,
        "allowed_tools": list(info.allowed_tools) if info.allowed_tools is not None else None,
    }


def _route_json(info: store.RouteInfo) -> dict[str, Any]:
    return {
        "prefix": info.prefix,
        "kind": info.kind,
        "backends": list(info.backends),
        "options": info.options,
    }


# --- commands ---------------------------------------------------------------------------


def cmd_db_migrate(
    args: argparse.Namespace, conn: psycopg.Connection[Any], out: TextIO, err: TextIO
) -> int:
    from proxy.store.schema import LATEST_VERSION, migrate

    applied = migrate(conn)
    if args.json:
        print(_json({"applied": applied, "version": LATEST_VERSION}), file=out)
    elif applied:
        print(
            f"applied migration(s) {', '.join(map(str, applied))}; "
            f"schema at version {LATEST_VERSION}",
            file=out,
        )
    else:
        print(f"schema up to date (version {LATEST_VERSION}); nothing applied", file=out)
    return 0


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}")
    return int(value)


def _tool_list(value: str) -> list[str]:
    tools = [t.strip() for t in value.split(",") if t.strip()]
    if not tools:
        raise argparse.ArgumentTypeError("expected tool names separated by commas")
    return tools


def cmd_keys_create(
    args: argparse.Namespace, conn: psycopg.Connection[Any], out: TextIO, err: TextIO
) -> int:
    from proxy.store import postgres as store

    limits: dict[str, Any] = {}
    if args.rpm is not None:
        limits["requests_per_minute"] = args.rpm
    new = store.create_key(
        conn, tenant=args.tenant, name=args.name, limits=limits, allowed_tools=args.tools
    )
    if args.json:
        print(_json({"key": new.key, **_key_json(new.info)}), file=out)
    else:
        # The key alone on stdout (KEY=$(switchboard keys create ...)); notes on stderr.
        print(new.key, file=out)
    print(
        f"created key {new.info.prefix!r} ({new.info.name}) for tenant {new.info.tenant!r}. "
        "Store the key now: it is shown only this once (only its hash is kept).",
        file=err,
    )
    return 0


def cmd_keys_list(
    args: argparse.Namespace, conn: psycopg.Connection[Any], out: TextIO, err: TextIO
) -> int:
    from proxy.store import postgres as store

    keys = store.list_keys(conn, tenant=args.tenant)
    if args.json:
        print(_json([_key_json(k) for k in keys]), file=out)
        return 0
    rows = [
        [
            k.prefix,
            k.name,
            k.tenant,
            _when(k.created_at),
            _when(k.revoked_at),
            str(k.limits.get("requests_per_minute", "-")),
            ",".join(k.allowed_tools) if k.allowed_tools is not None else "*",
        ]
        for k in keys
    ]
    headers = ["PREFIX", "NAME", "TENANT", "CREATED", "REVOKED", "RPM", "TOOLS"]
    print(format_table(headers, rows), file=out)
    return 0


def cmd_keys_revoke(
    args: argparse.Namespace, conn: psycopg.Connection[Any], out: TextIO, err: TextIO
) -> int:
    from proxy.store import postgres as store

    info, changed = store.revoke_key(conn, args.prefix)
    if args.json:
        print(_json({**_key_json(info), "changed": changed}), file=out)
    elif changed:
        print(f"revoked key {info.prefix} ({info.name}, tenant {info.tenant})", file=out)
    else:
        print(f"key {info.prefix} was already revoked at {_when(info.revoked_at)}", file=out)
    return 0


def cmd_routes_add(
    args: argparse.Namespace, conn: psycopg.Connection[Any], out: TextIO, err: TextIO
) -> int:
    from proxy.store import postgres as store

    route = store.add_route(conn, args.prefix, args.urls, kind=args.kind)
    if args.json:
        print(_json(_route_json(route)), file=out)
    else:
        print(f"added {route.kind} route {route.prefix} -> {', '.join(route.backends)}", file=out)
    return 0


def cmd_routes_list(
    args: argparse.Namespace, conn: psycopg.Connection[Any], out: TextIO, err: TextIO
) -> int:
    from proxy.store import postgres as store

    routes = store.list_routes(conn)
    if args.json:
        print(_json([_route_json(r) for r in routes]), file=out)
        return 0
    rows = [[r.prefix, r.kind, ", ".join(r.backends)] for r in routes]
    print(format_table(["PREFIX", "KIND", "BACKENDS"], rows), file=out)
    return 0


def cmd_routes_remove(
    args: argparse.Namespace, conn: psycopg.Connection[Any], out: TextIO, err: TextIO
) -> int:
    from proxy.store import postgres as store

    store.remove_route(conn, args.prefix)
    if args.json:
        print(_json({"removed": args.prefix}), file=out)
    else:
        print(f"removed route {args.prefix}", file=out)
    return 0


# --- argparse ---------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--dsn",
        metavar="DSN",
        help=f"PostgreSQL (or PgBouncer) connection string (default: ${DSN_ENV})",
    )
    parent.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parent


def add_subcommands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``db``, ``keys`` and ``routes`` to a parser's subcommands. Each leaf sets
    ``control_handler``; pass the parsed args to ``run``."""
    common = _common()

    db = commands.add_parser("db", help="database schema (PostgreSQL)")
    db_cmds = db.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    p = db_cmds.add_parser(
        "migrate",
        parents=[common],
        help="create or upgrade the schema (idempotent)",
        description="Apply the schema migrations the database lacks, in order, each in a "
        "transaction under an advisory lock; a second run applies nothing.",
    )
    p.set_defaults(control_handler=cmd_db_migrate)

    keys = commands.add_parser("keys", help="API keys: create, list, revoke")
    key_cmds = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    p = key_cmds.add_parser(
        "create",
        parents=[common],
        help="create an API key (printed once)",
        description="Create an API key sb_<prefix>_<secret> for a tenant (created if "
        "new). The key is printed once on stdout; only its SHA-256 is stored.",
    )
    p.add_argument("--tenant", required=True, help="tenant name")
    p.add_argument("--name", required=True, help="a name for the key (who or what uses it)")
    p.add_argument("--rpm", type=_positive_int, metavar="N", help="requests per minute limit")
    p.add_argument(
        "--tools",
        type=_tool_list,
        metavar="A,B",
        help="tools the key may call (default: all)",
    )
    p.set_defaults(control_handler=cmd_keys_create)
    p = key_cmds.add_parser("list", parents=[common], help="list keys (never the secrets)")
    p.add_argument("--tenant", help="only this tenant's keys")
    p.set_defaults(control_handler=cmd_keys_list)
    p = key_cmds.add_parser("revoke", parents=[common], help="revoke a key by its prefix")
    p.add_argument("prefix", metavar="PREFIX", help="the key's public prefix (or the key)")
    p.set_defaults(control_handler=cmd_keys_revoke)

    routes = commands.add_parser("routes", help="routes: add, list, remove")
    route_cmds = routes.add_subparsers(dest="routes_command", metavar="COMMAND", required=True)
    p = route_cmds.add_parser("add", parents=[common], help="add a route over backends")
    p.add_argument("prefix", metavar="PREFIX", help="path prefix, e.g. /mcp")
    p.add_argument("urls", nargs="+", metavar="URL", help="backend base URLs (replicas)")
    p.add_argument("--kind", choices=("http", "mcp"), default="http", help="route kind")
    p.set_defaults(control_handler=cmd_routes_add)
    p = route_cmds.add_parser("list", parents=[common], help="list routes")
    p.set_defaults(control_handler=cmd_routes_list)
    p = route_cmds.add_parser("remove", parents=[common], help="remove a route")
    p.add_argument("prefix", metavar="PREFIX")
    p.set_defaults(control_handler=cmd_routes_remove)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchboard", description="Switchboard control plane")
    add_subcommands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return parser


def resolve_dsn(args: argparse.Namespace, environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    dsn = args.dsn or env.get(DSN_ENV, "")
    if not dsn:
        raise UsageError(f"no database given: pass --dsn or set {DSN_ENV}")
    return str(dsn)


def run(
    args: argparse.Namespace,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    environ: dict[str, str] | None = None,
) -> int:
    """Execute a parsed control command; return the exit status (messages on stderr)."""
    import psycopg

    from proxy.store import postgres as store

    out = stdout or sys.stdout
    err = stderr or sys.stderr
    handler: Handler = args.control_handler
    try:
        dsn = resolve_dsn(args, environ)
    except UsageError as exc:
        print(f"switchboard: {exc}", file=err)
        return 2
    try:
        with store.connect(dsn) as conn:
            return handler(args, conn, out, err)
    except store.StoreError as exc:
        print(f"switchboard: {exc}", file=err)
        return 1
    except psycopg.OperationalError as exc:
        print(f"switchboard: database at {store.describe_dsn(dsn)} failed: {exc}", file=err)
        return 1
    except psycopg.Error as exc:
        print(f"switchboard: database error: {exc}", file=err)
        return 1


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    environ: dict[str, str] | None = None,
) -> int:
    args = build_parser().parse_args(argv)
    return run(args, stdout=stdout, stderr=stderr, environ=environ)
