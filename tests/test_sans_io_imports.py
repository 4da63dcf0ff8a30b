"""The sans-IO rule: protocol rules, routing and config never pull in trio or sockets.

Each check imports in a fresh interpreter, because the test process itself has long since
imported trio (pytest-trio) and everything else.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import proxy

PROXY_DIR = Path(proxy.__file__).resolve().parent
REPO_ROOT = PROXY_DIR.parent

# Every module of proxy/protocol is sans-IO, new ones included, plus the policy modules.
SANS_IO_FILES = (
    *sorted((PROXY_DIR / "protocol").glob("*.py")),
    *(
        PROXY_DIR / name
        for name in (
            "routing.py",
            "mcp_routing.py",
            "config.py",
            "auth.py",
            "ratelimit.py",
            "admission.py",
            "snapshot.py",
            "conncaps.py",
            "audit.py",
            "labels.py",
        )
    ),
)
SANS_IO_MODULES = tuple(
    "proxy.protocol"
    if f.name == "__init__.py"
    else f"proxy.{f.relative_to(PROXY_DIR).with_suffix('').as_posix().replace('/', '.')}"
    for f in SANS_IO_FILES
)
# I/O modules (ours and the stdlib's) that sans-IO code must not load.
FORBIDDEN_MODULES = (
    "trio",
    "socket",
    "selectors",
    "asyncio",
    "ssl",
    "psycopg",
    "psycopg_pool",
    "redis",
    "hiredis",
)
FORBIDDEN_OURS = ("proxy.net", "proxy.worker", "proxy.supervisor", "proxy.cli", "proxy.demo")


def _modules_after_import(*modules: str) -> set[str]:
    """sys.modules of a fresh interpreter after importing ``modules``."""
    code = (
        "import json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    __import__(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert isinstance(loaded, list)
    return {str(name) for name in loaded}


def test_sans_io_modules_import_no_trio_and_no_sockets() -> None:
    loaded = _modules_after_import(*SANS_IO_MODULES)
    assert set(SANS_IO_MODULES) <= loaded  # the imports really happened
    for name in FORBIDDEN_MODULES:
        assert name not in loaded, f"{name} imported by the sans-IO modules"
    ours = sorted(m for m in loaded if m.startswith(FORBIDDEN_OURS))
    assert ours == [], f"I/O modules of ours imported by sans-IO code: {ours}"


@pytest.mark.parametrize("module", SANS_IO_MODULES)
def test_each_sans_io_module_alone_imports_no_trio(module: str) -> None:
    loaded = _modules_after_import(module)
    assert module in loaded
    assert "trio" not in loaded
    assert "socket" not in loaded


def test_the_io_nucleus_does_import_trio_and_socket() -> None:
    # The positive control: the subprocess check above would see trio if it were there.
    loaded = _modules_after_import("proxy.net.reactor")
    assert "trio" in loaded
    assert "socket" in loaded


def _imported_top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", SANS_IO_FILES, ids=lambda p: p.name)
def test_sans_io_sources_have_no_io_imports_even_lazy_ones(path: Path) -> None:
    # ast.walk also sees imports inside functions, which the subprocess check cannot.
    names = _imported_top_level_names(path)
    assert names, f"no imports parsed from {path}"  # the walk works at all
    bad = sorted(
        name
        for name in names
        if name.split(".")[0] in FORBIDDEN_MODULES
        or name == "proxy.net"
        or name.startswith(FORBIDDEN_OURS)
    )
    assert bad == [], f"{path.name} imports {bad}"
