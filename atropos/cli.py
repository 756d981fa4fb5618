"""`atropos-sandbox` command line: each subsystem registers its own sub-commands."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# command -> the module that defines `register(subparsers)` for it; imported lazily so that one broken
# or optional subsystem (e.g. the Atropos environment without atroposlib) never breaks the others, and
# only the one a command line names: a server's start (every container and job runs
# `atropos-sandbox server`) then pays for its own imports alone, ~0.35 s of CPU less
_SUBCOMMANDS: dict[str, str] = {
    "server": "atropos.sandbox.server",
    "status": "atropos.sandbox.status",
    "job": "atropos.backends.job_cli",
    "image": "atropos.images.cli",
    "demo": "atropos.demo",
    "bench": "atropos.bench.cli",
    "cleanup": "atropos.backends.cleanup",
}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for `argv`: with only the named command's sub-parser where it names one, else with all
    of them (help, a typo: argparse lists the choices)."""
    from atropos import __version__

    parser = argparse.ArgumentParser(
        prog="atropos-sandbox",
        description="Isolated multi-slot sandboxes for LLM-agent RL rollouts.",
    )
    parser.add_argument("--version", action="version", version=f"atropos-sandbox {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    named = argv[0] if argv and argv[0] in _SUBCOMMANDS else None
    for command, name in _SUBCOMMANDS.items():
        if named is not None and command != named:
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # subsystem not present in this build
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(given)
    args = parser.parse_args(given)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    result = handler(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
