"""Which program a server runs as its slots' runner: the compiled one or the Python one.

The compiled runner (runner/, Rust) is a static binary: no interpreter to start in every slot, and
nothing of the node to bring into a task's own image. The package's build makes it where cargo is
there (setuptools-rust, pyproject.toml) and installs it next to the `atropos-sandbox` script; where
it could not be built, servers run the Python runner (atropos.sandbox.runner), which takes the same
arguments and speaks the same protocol.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from typing import Literal

from atropos.sandbox.models import RunnerMode
from atropos.sandbox.rootfs import RUNNER_BINARY, package_dir

RUNNER_BIN_ENV = "ATROPOS_RUNNER_BIN"  # the compiled runner to use, wherever it is (development, tests)

RunnerOption = Literal["auto", "compiled", "python"]
RUNNER_OPTIONS: tuple[RunnerOption, ...] = ("auto", "compiled", "python")


class RunnerNotFound(RuntimeError):
    """`--runner compiled` and no binary where one is looked for (the message names those places)."""


@dataclass(frozen=True)
class SlotProgram:
    """The runner a server's slots run: `binary` (its path on the node) for the compiled one."""

    kind: RunnerMode
    binary: str | None = None


def binary_candidates() -> list[str]:
    """Where the compiled runner is looked for, in this order: $ATROPOS_RUNNER_BIN alone where set;
    in a source checkout its own release build, then the installed scripts' directory (an editable
    install's copy there is a snapshot of the checkout's, stale after the next `cargo build`)."""
    explicit = os.environ.get(RUNNER_BIN_ENV)
    if explicit:
        return [explicit]
    name = os.path.basename(RUNNER_BINARY)
    crate = os.path.join(os.path.dirname(package_dir()), "runner")
    checkout = [os.path.join(crate, "target", "release", name)] if os.path.isfile(f"{crate}/Cargo.toml") else []
    return [*checkout, os.path.join(sysconfig.get_path("scripts"), name)]


def find_binary() -> str | None:
    """The first of `binary_candidates()` that is an executable file; None when none is."""
    return next((p for p in binary_candidates() if os.path.isfile(p) and os.access(p, os.X_OK)), None)


def choose_runner(option: RunnerOption) -> SlotProgram:
    """`auto`: the compiled runner where its binary is found, else the Python one."""
    if option == "python":
        return SlotProgram("python")
    binary = find_binary()
    if binary is not None:
        return SlotProgram("compiled", os.path.realpath(binary))
    if option == "compiled":
        raise RunnerNotFound(
            f"--runner compiled: no executable {os.path.basename(RUNNER_BINARY)} at "
            f"{' or '.join(binary_candidates())} (install the package where cargo is on PATH, build it with "
            f"`cargo build --release` in the checkout's runner/, or set ${RUNNER_BIN_ENV}; --runner python runs "
            "the Python runner)"
        )
    return SlotProgram("python")
