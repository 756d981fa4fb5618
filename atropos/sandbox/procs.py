"""Process-tree bookkeeping from /proc: find a command's whole tree and kill it without races.

A command may fork faster than we kill, so trees are frozen (SIGSTOP) until no new member
appears, then killed: a stopped process cannot fork, so nothing escapes between scans.
"""

from __future__ import annotations

import ctypes
import os
import signal
from dataclasses import dataclass

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int


def _read_stat(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: parse after the last ')'
    fields = raw[raw.rfind(b")") + 2 :].split()
    if len(fields) < 4 or fields[0] == b"Z":
        return None  # zombies are already dead; their parent reaps them
    return ProcInfo(pid, int(fields[1]), int(fields[2]), int(fields[3]))


def snapshot() -> dict[int, ProcInfo]:
    procs: dict[int, ProcInfo] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _read_stat(int(name))
            if info is not None:
                procs[info.pid] = info
    return procs


def tree_members(root: int, procs: dict[int, ProcInfo], *, include_root: bool) -> set[int]:
    """Descendants of `root`, plus processes still in its session or process group.

    The session test catches orphans that were reparented away from the tree (`cmd &` whose
    parent exited) but did not call setsid themselves.
    """
    children: dict[int, list[int]] = {}
    for info in procs.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: set[int] = set()
    stack = [root]
    while stack:
        pid = stack.pop()
        for child in children.get(pid, ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    found.update(p.pid for p in procs.values() if p.sid == root or p.pgid == root)
    if include_root and root in procs:
        found.add(root)
    else:
        found.discard(root)
    found.discard(os.getpid())
    return found


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_tree(root: int, *, include_root: bool = True, max_rounds: int = 200) -> int:
    """Freeze then SIGKILL every member of `root`'s tree. Returns how many were killed."""
    frozen: set[int] = set()
    for _ in range(max_rounds):
        members = tree_members(root, snapshot(), include_root=include_root) | frozen
        new = members - frozen
        if not new:
            break
        _signal(new, signal.SIGSTOP)
        frozen |= new
    _signal(frozen, signal.SIGKILL)
    return len(frozen)


def _prctl(option: int, arg: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, arg, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Orphans of our descendants are reparented to us, so we can still find and kill them."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    return _prctl(_PR_SET_PDEATHSIG, int(sig))
