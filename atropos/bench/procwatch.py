"""Watch this process's descendants during a run: their memory over time, and which survive it.

`ProcessWatch.sample()` records every descendant (pid and start time, so a reused pid is never
mistaken for one of ours) and the resident memory of this process and of its descendants.
`leaked()` after the pool closed: the recorded descendants still alive, plus live processes whose
command line holds one of the run's markers (its work dir, the tags of its abusive commands).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from atropos.host import command_line, snapshot, start_time, tree_members

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class MemorySample:
    t: float
    """seconds since the watch started"""
    owner_mb: float
    children_mb: float
    children: int

    def to_json(self) -> dict[str, float]:
        return {
            "t": round(self.t, 1),
            "owner_mb": round(self.owner_mb, 1),
            "children_mb": round(self.children_mb, 1),
            "children": self.children,
        }


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * _PAGE / 1e6
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class ProcessWatch:
    markers: list[str] = field(default_factory=list)
    samples: list[MemorySample] = field(default_factory=list)
    seen: dict[int, float | None] = field(default_factory=dict)  # pid -> start time
    _t0: float = field(default_factory=time.monotonic)
    _before: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        # children that existed before the run (a test's other fixtures) are not the run's
        self._before = tree_members(os.getpid(), snapshot(), include_root=False)

    def sample(self) -> MemorySample:
        me = os.getpid()
        children = tree_members(me, snapshot(), include_root=False)
        for pid in children - self._before:
            if pid not in self.seen:
                self.seen[pid] = start_time(pid)
        taken = MemorySample(time.monotonic() - self._t0, rss_mb(me), sum(rss_mb(p) for p in children), len(children))
        self.samples.append(taken)
        return taken

    def leaked(self) -> dict[int, str]:
        """Processes of the run still alive: pid -> command line."""
        alive = snapshot()
        found: dict[int, str] = {}
        for pid, started in self.seen.items():
            if pid in alive and started is not None and start_time(pid) == started:
                found[pid] = command_line(pid)
        for pid in alive:
            if pid != os.getpid() and pid not in found:
                cmd = command_line(pid)
                if any(marker in cmd for marker in self.markers):
                    found[pid] = cmd
        return found
