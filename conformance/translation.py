"""Era translation in the conformance run (run.py): each spec version's suite through
Switchboard to a backend of the *other* era, the route's ``backend_era`` naming it, set
beside the same suite run directly against a backend of the client's own era.

- 2025-11-25 suite -> Switchboard (``backend_era = "2026-07-28"``) -> the reference
  everything server speaking only 2026-07-28 (``modern_only_server.py``).
- 2026-07-28 suite -> Switchboard (``backend_era = "2025-11-25"``) -> npm's
  ``@modelcontextprotocol/server-everything`` (TypeScript SDK 1.x: 2025-11-25 only),
  also run directly, to show what a 2026-07-28 client gets from it without the proxy.

Every check whose result differs between the direct run (the client's own era) and
the translated one must be listed, with both results and the reason, in
docs/conformance.md between the ``translation-differences`` markers; an unlisted
difference, or a listed one whose results changed, fails the run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOC = REPO / "docs" / "conformance.md"
NODE_DIR = REPO / "tests" / "support" / "node"
EVERYTHING_JS = NODE_DIR / "node_modules/@modelcontextprotocol/server-everything/dist/index.js"
MODERN_ONLY = HERE / "modern_only_server.py"

OTHER_ERA = {"2025-11-25": "2026-07-28", "2026-07-28": "2025-11-25"}
"""The client's spec version -> the era of the backend it is translated to."""
BACKEND_OF = {
    "2025-11-25": "reference everything server, 2026-07-28 only (modern_only_server.py)",
    "2026-07-28": "npm @modelcontextprotocol/server-everything (2025-11-25 only)",
}

_BEGIN = "<!-- translation-differences:begin -->"
_END = "<!-- translation-differences:end -->"
_ROW = re.compile(
    r"^\|\s*(?P<version>[\d-]+)\s*\|\s*`(?P<check>[^`]+)`\s*\|\s*(?P<direct>[\w-]+)\s*\|"
    r"\s*(?P<translated>[\w-]+)\s*\|"
)


def explained_differences(doc: Path = DOC) -> dict[tuple[str, str], tuple[str, str]]:
    """(spec version, check) -> (direct result, translated result), as docs list them."""
    text = doc.read_text() if doc.is_file() else ""
    if _BEGIN not in text:
        return {}
    block = text.split(_BEGIN, 1)[1].split(_END, 1)[0]
    out = {}
    for line in block.splitlines():
        match = _ROW.match(line.strip())
        if match:
            key = (match["version"], match["check"])
            out[key] = (match["direct"], match["translated"])
    return out


def unexplained(
    version: str,
    rows: list[tuple[str, str, str]],
    explained: dict[tuple[str, str], tuple[str, str]],
) -> list[tuple[str, str, str]]:
    """The (check, direct, translated) rows that differ and are not explained as they are."""
    return [
        (check, direct, translated)
        for check, direct, translated in rows
        if direct != translated and explained.get((version, check)) != (direct, translated)
    ]


def stale_explanations(
    version: str,
    rows: list[tuple[str, str, str]],
    explained: dict[tuple[str, str], tuple[str, str]],
) -> list[str]:
    """Checks docs explain for ``version`` that no longer differ (the list must stay true)."""
    differing = {check for check, direct, translated in rows if direct != translated}
    return sorted(c for (v, c) in explained if v == version and c not in differing)


@contextlib.contextmanager
def other_era_backend(
    version: str, server_root: Path, python: Path, port: int, log_file: IO[bytes]
) -> Iterator[subprocess.Popen[bytes]]:
    """The backend the ``version`` client is translated to, on ``port`` (path /mcp)."""
    if version == "2025-11-25":
        cmd = [str(python), str(MODERN_ONLY), "--port", str(port)]
        proc = subprocess.Popen(cmd, cwd=server_root, stdout=log_file, stderr=subprocess.STDOUT)
    else:
        node = shutil.which("node")
        if node is None or not EVERYTHING_JS.is_file():
            raise FileNotFoundError(
                f"{EVERYTHING_JS} (npm ci in tests/support/node: `make node` installs it)"
            )
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PORT": str(port)}
        proc = subprocess.Popen(
            [node, str(EVERYTHING_JS), "streamableHttp"],
            cwd=NODE_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def markdown_table(
    version: str, rows: list[tuple[str, str, str]], other_direct: dict[str, str] | None
) -> str:
    """Per scenario: the suite directly against its own era's backend, through the proxy
    translated to the other era's, (and directly against the other era's backend)."""
    by_scenario: dict[str, list[tuple[str, str, str]]] = {}
    for row in rows:
        by_scenario.setdefault(row[0].split("/", 1)[0], []).append(row)

    def tally(statuses: list[str]) -> str:
        counts: dict[str, int] = {}
        for status in statuses:
            counts[status] = counts.get(status, 0) + 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "-"

    other = f" | directly to the {OTHER_ERA[version]} backend" if other_direct is not None else ""
    lines = [
        f"#### {version} clients, {OTHER_ERA[version]} backend ({BACKEND_OF[version]})",
        "",
        f"| scenario | checks | direct ({version} backend) | translated by Switchboard{other} |",
        "|---|---:|---|---|" + ("---|" if other_direct is not None else ""),
    ]
    for scenario, group in by_scenario.items():
        cells = [tally([r[1] for r in group]), tally([r[2] for r in group])]
        if other_direct is not None:
            cells.append(tally([other_direct.get(r[0], "-") for r in group]))
        lines.append(f"| {scenario} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
