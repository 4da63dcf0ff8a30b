"""Blocking context managers (processes started and stopped with waits) used from trio."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager
from typing import TypeVar

import trio

T = TypeVar("T")


@asynccontextmanager
async def entered_in_thread(manager: AbstractContextManager[T]) -> AsyncIterator[T]:
    """Enter and exit ``manager`` in a worker thread, so the tasks of this trio loop
    (backends a proxy talks to, say) keep running while it starts and stops."""
    value = await trio.to_thread.run_sync(manager.__enter__)
    try:
        yield value
    finally:
        await trio.to_thread.run_sync(manager.__exit__, None, None, None)
