"""Serving an ASGI app for tests: hypercorn on trio, on loopback, in the caller's nursery."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIFramework


async def serve_asgi(
    app: Any, port: int = 0, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``app`` on 127.0.0.1:``port`` (0: any free port) until cancelled;
    ``task_status`` gets the port."""
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 0.5
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(hypercorn_serve, cast("ASGIFramework", app), config)
        )
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
