"""Helpers for the SWE-ReX Apptainer deployment tests: a started deployment, and the process table.

The process helpers read /proc directly, independent of the code under test.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from atropos.host import read_stat
from atropos.integrations.swerex import ApptainerDeployment, ApptainerDeploymentConfig

HOST_PYTHON_PREFIX = sys.prefix
"""This interpreter's prefix (a venv with swe-rex): the `python_standalone_dir` of the tests."""


@asynccontextmanager
async def deployed(config: ApptainerDeploymentConfig) -> AsyncIterator[ApptainerDeployment]:
    """A started deployment, stopped on the way out whatever happens."""
    deployment = config.get_deployment()
    try:
        await deployment.start()
        yield deployment
    finally:
        await deployment.stop()


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time), None when the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def process_tree(root: int) -> dict[int, str]:
    """`root` and its live descendants, each with its start time (to tell a reused pid apart)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree: dict[int, str] = {}
    pending = [root]
    while pending:
        pid = pending.pop()
        started = start_time(pid)
        if started is None or pid in tree:
            continue
        tree[pid] = started
        pending += [child for child, parent in parents.items() if parent == pid]
    return tree


def survivors(tree: dict[int, str]) -> list[int]:
    """The processes of `tree` that still run (a zombie does not: it died, and waits only for its
    parent, here often PID 1 after a reparenting, to reap it, which it may do a moment later)."""
    return [pid for pid, started in tree.items() if start_time(pid) == started and not _zombie(pid)]


def _zombie(pid: int) -> bool:
    info = read_stat(pid)
    return info is not None and info.state == "Z"


def processes_with_args(*args: str) -> list[int]:
    """Live processes whose command line contains `args` in a row."""
    needle = "\0".join(args).encode()
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if needle in handle.read() and start_time(int(entry)) is not None:
                    found.append(int(entry))
        except OSError:
            continue
    return found


def cmdlines(pids: Iterable[int]) -> list[bytes]:
    out: list[bytes] = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                out.append(handle.read())
        except OSError:
            continue
    return out
