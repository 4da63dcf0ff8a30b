"""Kept for old habits: ``python -m bench.quick`` is ``python -m bench.run --quick`` (the
quick profile of the side-by-side benchmark; ``make bench-quick`` runs ``bench.run``
directly).

The old flags still work: ``--workers``, ``--rounds``, ``--duration`` pass through and
``--connections N`` becomes ``--concurrency N``; anything else goes to ``bench.run``.
"""

from __future__ import annotations

import sys

from bench.run import main as run_main


def translate(argv: list[str]) -> list[str]:
    out = ["--quick"]
    for arg in argv:
        if arg == "--connections":
            out.append("--concurrency")
        elif arg.startswith("--connections="):
            out.append("--concurrency=" + arg.split("=", 1)[1])
        else:
            out.append(arg)
    return out


def main() -> None:
    run_main(translate(sys.argv[1:]))


if __name__ == "__main__":
    main()
