"""Make h11 reject obsolete line folding instead of unfolding it.

RFC 9112 §5.2 lets a server either reject obs-fold with 400 or unfold it. A proxy that
unfolds forwards a different header than a folding-aware backend would have read, which
is the raw material of request smuggling, so Switchboard rejects it. h11 (the reference
parser) unfolds silently and offers no switch, so this module replaces its folding step
with one that raises. h11 turns the raised LocalProtocolError into a RemoteProtocolError
with status hint 400, exactly as for any other malformed header line.

h11 is pinned below 0.17 in setup.cfg; ``install`` checks the hook is still where it
expects and fails loudly otherwise, rather than silently accepting obs-fold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import h11
from h11 import _readers

_LEADING_WHITESPACE = re.compile(rb"[ \t]")


def _reject_obsolete_line_fold(lines: Iterable[bytes]) -> Iterable[bytes]:
    for line in lines:
        if _LEADING_WHITESPACE.match(line):
            raise h11.LocalProtocolError(
                "obsolete line folding (obs-fold) in header section", error_status_hint=400
            )
        yield line


def install() -> None:
    """Idempotent; called when ``proxy.protocol`` is imported."""
    if not hasattr(_readers, "_obsolete_line_fold"):
        raise RuntimeError(
            "this h11 version has no _readers._obsolete_line_fold hook; "
            "Switchboard cannot enforce its obs-fold rejection with it"
        )
    _readers._obsolete_line_fold = _reject_obsolete_line_fold
