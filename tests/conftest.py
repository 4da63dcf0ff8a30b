"""Checks made once per test session."""

from __future__ import annotations

import pytest

from proxy import native


def pytest_sessionstart(session: pytest.Session) -> None:
    # Compiled modules older than their sources would be what the tests import: the
    # suite would pass or fail on code that is no longer there.
    reason = native.stale_reason()
    if reason is not None:
        raise pytest.UsageError(reason)
