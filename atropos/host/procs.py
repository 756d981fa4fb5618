"""Processes of this host, read from /proc: who they are, their trees, and killing a tree without races.

Standard library only: the slot runner (`python -S -I` inside the sandbox) imports it too.

A tree may fork faster than we kill, so it is frozen (SIGSTOP) until no new member appears, then
killed: a stopped process cannot fork, so nothing escapes between scans. A pid is only taken for
the process once recorded when its start time is the recorded one (`START_TOLERANCE_S`).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass

# /proc start times are in clock ticks: two readings of one process agree to the tick, so a larger
# difference means the pid now belongs to another process
START_TOLERANCE_S = 1.0
_FREEZE_ROUNDS = 200


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    state: str
    ppid: int
    pgid: int
    sid: int
    start_ticks: int
    """clock ticks after boot at which the process started"""


def read_stat(pid: int) -> ProcInfo | None:
    """`/proc/PID/stat` of one process, or None when it is gone (or not readable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: the fields start after the last ')'
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return ProcInfo(pid, fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def snapshot() -> dict[int, ProcInfo]:
    """Every live process; zombies are left out (already dead, their parent reaps them)."""
    procs: dict[int, ProcInfo] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = read_stat(int(name))
            if info is not None and info.state != "Z":
                procs[info.pid] = info
    return procs


def tree_members(root: int, procs: dict[int, ProcInfo], *, include_root: bool) -> set[int]:
    """Descendants of `root`, plus processes still in its session or process group.

    The session test catches orphans that were reparented away from the tree (`cmd &` whose
    parent exited) but did not call setsid themselves. This process is never a member.
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


def signal_pids(pids: Iterable[int], sig: int) -> set[int]:
    """Send `sig` to each pid; those that are gone or not ours are skipped. Returns the ones reached."""
    reached: set[int] = set()
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            continue
        reached.add(pid)
    return reached


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_trees(roots: Iterable[int], *, include_roots: bool = True, max_rounds: int = _FREEZE_ROUNDS) -> int:
    """Freeze every member of the roots' trees, and of the trees of what was frozen, until no new
    member appears; then SIGKILL them all. Returns how many were killed."""
    roots = set(roots)
    frozen: set[int] = set()
    for _ in range(max_rounds):
        procs = snapshot()
        members = set(frozen)
        for root in roots:
            members |= tree_members(root, procs, include_root=include_roots)
        for pid in frozen & procs.keys():
            members |= tree_members(pid, procs, include_root=True)
        new = members - frozen
        if not new:
            break
        signal_pids(new, signal.SIGSTOP)
        frozen |= new
    signal_pids(frozen, signal.SIGKILL)
    return len(frozen)


def kill_tree(root: int, *, include_root: bool = True) -> int:
    """Freeze then SIGKILL every member of `root`'s tree. Returns how many were killed."""
    return kill_trees((root,), include_roots=include_root)


def _boot_time() -> int | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def start_time(pid: int) -> float | None:
    """Unix time at which `pid` started, from /proc (None when unavailable)."""
    info, btime = read_stat(pid), _boot_time()
    if info is None or btime is None:
        return None
    return btime + info.start_ticks / os.sysconf("SC_CLK_TCK")


def same_process(pid: int, started: float | None) -> bool:
    """`pid` is still the process that had start time `started` (unknown times count as the same)."""
    now = start_time(pid)
    return started is None or now is None or abs(now - started) <= START_TOLERANCE_S


def pid_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def command_line(pid: int) -> str:
    """The process's arguments joined by spaces ("" when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


async def kill_child_tree(proc: asyncio.subprocess.Process) -> int:
    """SIGKILL a child started in a session of its own and everything it started, also what left its
    group or was orphaned (frozen first, so nothing forks away), then reap it; how many were killed."""
    killed = await asyncio.to_thread(kill_tree, proc.pid)
    signal_group(proc.pid, signal.SIGKILL)  # members of its group outside its tree
    await proc.wait()
    return killed
