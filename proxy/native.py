"""The request path compiled to C with mypyc, and how to build it.

The modules below are ordinary, type-checked Python. ``python -m proxy.native build``
compiles them with mypyc (part of mypy) into extension modules placed beside their
sources, which Python then imports in their stead: the same code, run without the
interpreter's per-bytecode cost (docs/benchmarks.md has what it buys). Without a C
compiler and Python's headers the proxy runs the Python sources as they are; the build
is an optimisation, never a requirement.

An extension module older than its source would run code that is no longer there:
``stale()`` names such modules, the proxy refuses to start with one (``check``), and
``make`` rebuilds whenever a source changes. ``python -m proxy.native clean`` removes
the built modules.

Left out, on purpose: modules that hold msgspec structs (mypyc compiles class bodies as
its own classes), the h11 patch (h11 hands it bytearrays where bytes are declared: a
compiled function checks declared types at run time), modules off the request path
(configuration, the control plane, the supervisor, the worker's other Trio tasks).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
"""The ``proxy`` package directory."""
SOURCE_ROOT = PACKAGE_ROOT.parent

GROUP = "proxy.native"
"""The compiled modules share one library, ``proxy/native__mypyc*.so``."""

COMPILED = (
    "proxy/labels.py",
    "proxy/mcp_routing.py",
    "proxy/metrics.py",
    "proxy/routing.py",
    "proxy/net/client_io.py",
    "proxy/net/context.py",
    "proxy/net/reactor.py",
    "proxy/net/trio_loop.py",
    "proxy/net/upstream.py",
    "proxy/protocol/answers.py",
    "proxy/protocol/body.py",
    "proxy/protocol/byte_classes.py",
    "proxy/protocol/chunked.py",
    "proxy/protocol/connection.py",
    "proxy/protocol/connection_core.py",
    "proxy/protocol/era_probe.py",
    "proxy/protocol/eras.py",
    "proxy/protocol/event_stream.py",
    "proxy/protocol/exchange.py",
    "proxy/protocol/fast_head.py",
    "proxy/protocol/fast_response.py",
    "proxy/protocol/head_reader.py",
    "proxy/protocol/http1.py",
    "proxy/protocol/jsonrpc.py",
    "proxy/protocol/listen_translation.py",
    "proxy/protocol/mcp.py",
    "proxy/protocol/proxy_header.py",
    "proxy/protocol/request_side.py",
    "proxy/protocol/routing_side.py",
    "proxy/protocol/session_token.py",
    "proxy/protocol/sse.py",
    "proxy/protocol/tool_lists.py",
    "proxy/protocol/translating_side.py",
    "proxy/protocol/tunnel.py",
    "proxy/protocol/upstream_sessions.py",
    "proxy/protocol/upstream_side.py",
    "proxy/protocol/ws_frames.py",
)
"""Sources compiled, relative to the source root."""


def built(source: str) -> list[Path]:
    """The extension modules built from ``source`` (none where it was not built)."""
    path = SOURCE_ROOT / source
    return [
        path.with_name(path.stem + suffix)
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        if path.with_name(path.stem + suffix).exists()
    ]


def _group_libraries() -> list[Path]:
    return sorted(PACKAGE_ROOT.glob("native__mypyc*"))


def stale() -> list[str]:
    """Compiled modules whose source changed after they were built."""
    found = []
    for source in COMPILED:
        mtime = (SOURCE_ROOT / source).stat().st_mtime
        if any(ext.stat().st_mtime < mtime for ext in built(source)):
            found.append(source)
    return found


def compiled() -> bool:
    """Whether the request path runs compiled (every listed module built)."""
    return all(built(source) for source in COMPILED) and bool(_group_libraries())


def stale_reason() -> str | None:
    """Why the compiled modules must not run (some are older than their sources), or
    None where they may."""
    old = stale()
    if not old:
        return None
    return (
        f"compiled modules are older than their sources ({', '.join(old)}): run "
        "`python -m proxy.native build` (or `make native`), or `python -m proxy.native clean`"
    )


def check() -> None:
    """Refuse to run code older than its source."""
    reason = stale_reason()
    if reason is not None:
        raise SystemExit(reason)


def clean() -> None:
    for source in COMPILED:
        for ext in built(source):
            ext.unlink()
    for lib in _group_libraries():
        lib.unlink()


def build() -> int:
    """Compile ``COMPILED`` in place; 0 on success. Where no compiler is found, say so
    and leave the Python sources to run (1)."""
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        print("proxy.native: mypyc is not installed; the request path runs as Python")
        return 1
    clean()
    print(f"proxy.native: compiling {len(COMPILED)} modules with mypyc (a minute or two)")
    sys.stdout.flush()
    script = (
        "import sys\n"
        "from setuptools import setup\n"
        "from mypyc.build import mypycify\n"
        "sources = sys.argv[1:]\n"
        "sys.argv = [sys.argv[0], 'build_ext', '--inplace', '--build-temp', "
        "'build/native', '--build-lib', 'build/native-lib']\n"
        f"setup(name='switchboard-native', packages=[], ext_modules=mypycify(sources, "
        f"opt_level='3', group_name={GROUP!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *COMPILED],
        cwd=SOURCE_ROOT,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        clean()  # nothing half-built is left to shadow the sources
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        print(f"proxy.native: the build failed; the request path runs as Python\n{tail}")
        return 1
    # setuptools keeps the build tree's times on the copies it places: mark them built
    # now, after every source they came from.
    for source in COMPILED:
        for ext in built(source):
            os.utime(ext)
    for lib in _group_libraries():
        os.utime(lib)
    print(f"proxy.native: {len(COMPILED)} modules compiled")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.native",
        description="Compile the request path with mypyc (build), remove the compiled "
        "modules (clean), or say whether they are built and current (status).",
    )
    parser.add_argument("action", choices=("build", "clean", "status"))
    args = parser.parse_args(argv)
    if args.action == "build":
        return build()
    if args.action == "clean":
        clean()
        return 0
    old = stale()
    state = "compiled" if compiled() else "not compiled (Python sources)"
    print(f"request path: {state}" + (f"; stale: {', '.join(old)}" if old else ""))
    return 1 if old else 0


if __name__ == "__main__":
    sys.exit(main())
