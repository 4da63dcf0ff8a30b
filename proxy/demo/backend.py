"""A small MCP server used as a demo/test backend behind Switchboard.

Built with the official ``mcp`` SDK (v2: ``MCPServer``), served over Streamable HTTP
by hypercorn on trio.  Run it with ``python -m proxy.demo --listen 127.0.0.1:8931``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import partial
from typing import Any, cast

import anyio
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIFramework
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

__all__ = ["build_app", "main", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8931
DEFAULT_PATH = "/mcp"
GREETING_URI = "demo://greeting"
GREETING_TEXT = "Hello from the Switchboard demo MCP backend!"

# Short, so Ctrl-C does not hang on open SSE streams (hypercorn's default is 3 s).
_GRACEFUL_TIMEOUT_S = 1.0


def echo(text: str) -> str:
    """Return ``text`` unchanged."""
    return text


def add(a: int, b: int) -> int:
    """Return ``a + b``."""
    return a + b


async def slow_count(n: int, ctx: Context[Any, Any]) -> str:
    """Send ``n`` progress notifications 0.1 s apart, then return "done"."""
    for i in range(1, n + 1):
        # anyio rather than trio: the app may also be hosted by an asyncio ASGI server.
        await anyio.sleep(0.1)
        await ctx.report_progress(i, n, f"counted {i} of {n}")
    return "done"


def greeting() -> str:
    """Return a fixed greeting."""
    return GREETING_TEXT


def summarize(text: str) -> str:
    """Ask the model to summarize ``text``."""
    return f"Summarize the following text in one or two sentences:\n\n{text}"


async def healthz(request: Request) -> Response:
    """Plain liveness probe, outside the MCP endpoint."""
    return PlainTextResponse("ok")


@contextlib.contextmanager
def root_logging_preserved() -> Iterator[None]:
    # MCPServer.__init__ calls logging.basicConfig(); undo that so that merely
    # building the app never configures the host process's root logger.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def build_app(
    path: str = DEFAULT_PATH,
    *,
    allowed_hosts: Sequence[str] | None = None,
    allowed_origins: Sequence[str] = (),
) -> Starlette:
    """Build the ASGI app: MCP Streamable HTTP at ``path`` plus ``GET /healthz``.

    With ``allowed_hosts=None`` the SDK's Host/Origin (DNS-rebinding) checks are off,
    so requests forwarded by a proxy with any Host header are accepted.  Pass a list
    (entries like ``"127.0.0.1:*"`` or ``"example.com:8080"``) to turn them on.
    """
    with root_logging_preserved():
        server: MCPServer[Any] = MCPServer(
            "switchboard-demo",
            instructions="Demo backend bundled with Switchboard.",
            log_level="WARNING",
        )
    server.tool()(echo)
    server.tool()(add)
    server.tool()(slow_count)
    server.resource(GREETING_URI, name="greeting", mime_type="text/plain")(greeting)
    server.prompt()(summarize)
    server.custom_route("/healthz", methods=["GET"])(healthz)

    if allowed_hosts is None:
        # Explicit, because the SDK turns the checks on by itself when `host` is a
        # loopback name, which rejects (421) a proxied request whose Host differs.
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    else:
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=list(allowed_hosts),
            allowed_origins=list(allowed_origins),
        )
    return server.streamable_http_app(streamable_http_path=path, transport_security=security)


def _bind_address(host: str, port: int) -> str:
    # hypercorn parses "host:port"; IPv6 literals need brackets.
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(
    host: str,
    port: int,
    path: str = DEFAULT_PATH,
    *,
    allowed_hosts: Sequence[str] | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the demo backend on ``host:port`` until cancelled or ``shutdown_trigger`` returns.

    ``task_status.started()`` receives the bound port (useful with ``port=0``).
    """
    config = Config()
    config.bind = [_bind_address(host, port)]
    config.accesslog = None
    # A Logger object (not "-") so hypercorn adds no handler of its own; records
    # propagate to whatever logging the host process configured.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = _GRACEFUL_TIMEOUT_S

    # Starlette's loosely typed ASGI signature does not match hypercorn's TypedDict-based
    # one although they are the same protocol at runtime.
    app = cast("ASGIFramework", build_app(path, allowed_hosts=allowed_hosts))
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(hypercorn_serve, app, config, shutdown_trigger=shutdown_trigger)
        )
        # Binds look like "http://127.0.0.1:54321" or "http://[::1]:54321".
        task_status.started(int(binds[0].rsplit(":", 1)[1]))


def _listen_address(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (IPv6 as ``[::1]:PORT``) for argparse."""
    host, sep, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port_text)


async def _serve_until_signalled(
    host: str, port: int, path: str, allowed_hosts: Sequence[str] | None
) -> None:
    # Receiving SIGINT/SIGTERM as a shutdown trigger (instead of letting SIGINT raise
    # KeyboardInterrupt) lets hypercorn close connections gracefully, without a traceback.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def wait_for_signal() -> None:
            async for _ in signals:
                return

        async with trio.open_nursery() as nursery:
            bound_port: int = await nursery.start(
                partial(
                    serve,
                    host,
                    port,
                    path,
                    allowed_hosts=allowed_hosts,
                    shutdown_trigger=wait_for_signal,
                )
            )
            shown_host = f"[{host}]" if ":" in host else host
            print(
                f"demo MCP backend listening on http://{shown_host}:{bound_port}{path}",
                file=sys.stderr,
                flush=True,
            )


def _first_leaf(exc: BaseException) -> BaseException:
    # Trio nests exception groups once per nursery; the useful message is at the bottom.
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: run the demo backend until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m proxy.demo", description="Demo MCP backend (Streamable HTTP)."
    )
    parser.add_argument(
        "--listen",
        type=_listen_address,
        default=(DEFAULT_HOST, DEFAULT_PORT),
        metavar="HOST:PORT",
        help=f"address to listen on (default {DEFAULT_HOST}:{DEFAULT_PORT})",
    )
    parser.add_argument(
        "--path", default=DEFAULT_PATH, help=f"MCP endpoint path (default {DEFAULT_PATH})"
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        dest="allowed_hosts",
        metavar="HOST[:PORT|:*]",
        help="enable the SDK's Host-header (DNS-rebinding) check, allowing this Host; "
        "repeatable (default: check off, any Host accepted)",
    )
    args = parser.parse_args(argv)
    if not args.path.startswith("/"):
        parser.error("--path must start with '/'")
    host, port = args.listen

    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        trio.run(_serve_until_signalled, host, port, args.path, args.allowed_hosts)
    except* KeyboardInterrupt:
        # SIGINT that arrived before the signal receiver was installed.
        pass
    except* OSError as group:
        # Typically "address already in use"; report it without a traceback.
        parser.exit(1, f"error: {_first_leaf(group)}\n")
