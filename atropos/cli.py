"""`atropos-sandbox` command line: each subsystem registers its own sub-commands."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# module that defines `register(subparsers)`; imported lazily so that one broken or optional
# subsystem (e.g. the Atropos environment without atroposlib) never breaks the others.
_SUBCOMMANDS: tuple[str, ...] = (
    "atropos.sandbox.server",
    "atropos.sandbox.status",
    "atropos.backends.job_cli",
    "atropos.images.cli",
    "atropos.demo",
    "atropos.bench.cli",
    "atropos.backends.cleanup",
)


def build_parser() -> argparse.ArgumentParser:
    from atropos import __version__

    parser = argparse.ArgumentParser(
        prog="atropos-sandbox",
        description="Isolated multi-slot sandboxes for LLM-agent RL rollouts.",
    )
    parser.add_argument("--version", action="version", version=f"atropos-sandbox {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # subsystem not present in this build
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    result = handler(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
