"""The runner's watch over limits the kernel cannot enforce alone: workspace size, and the
process count of a slot (a fork bomb is bounded by RLIMIT_NPROC or a pids cgroup, but it keeps
the slot's CPU busy until its processes are killed; root is bounded by neither).

Processes are counted in the slot's own PID namespace (bubblewrap), where listing /proc costs
microseconds, so that check runs on every tick, also between calls: a fork bomb started in the
background is stopped even if no call follows. Without a PID namespace (isolation `none`) only
the workspace is watched, and only while calls run. When a limit is crossed, every process of
the slot but the runner is killed; running calls say which limit stopped them, and the next
call says so when it happened between calls.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

from atropos.sandbox.runner.protocol import LimitKind
from atropos.sandbox.runner.rlimits import RunnerLimits, count_tasks, workspace_bytes

_TICK = 0.25
# a workspace scan walks the tree: never spend more than ~5% of the time on it
_SCAN_SHARE = 20.0
_MIN_SCAN_INTERVAL = 1.0
# always present in a slot's PID namespace: the runner (its pid 1) and its helper threads, the
# session's shell, and some room
_RESIDENT = 8
# Where the kernel bounds the count (pids cgroup, RLIMIT_NPROC), a fork bomb churns just below
# the limit as its processes die and retry, so a sample rarely sees the limit itself: a slot this
# close to it is stopped (a legitimate job this close could not fork much longer anyway).
_NEAR_FULL = 0.9


class LimitWatch:
    def __init__(
        self, root: str, limits: RunnerLimits, *, own_pid_namespace: bool, kill_all: Callable[[], object]
    ) -> None:
        self.root = root
        self.limits = limits
        self.count = own_pid_namespace and limits.processes is not None
        self.kill_all = kill_all
        self.trips = 0
        self.last_kind: LimitKind | None = None
        self.unreported: LimitKind | None = None  # a trip while no call ran
        self._active = 0
        self._task: asyncio.Task[None] | None = None
        self.last_size = 0  # the workspace at the last scan (kept across hibernation)
        self._next_scan = 0.0

    def start(self) -> None:
        """With a PID namespace the watch runs for the runner's life; else per call (enter)."""
        if self.count:
            self._ensure_task()

    def enter(self) -> None:
        self._active += 1
        if self.limits.workspace is not None:
            self._ensure_task()

    def leave(self) -> None:
        self._active -= 1

    def tripped_since(self, trips: int) -> LimitKind | None:
        return self.last_kind if self.trips != trips else None

    def take_unreported(self) -> LimitKind | None:
        kind, self.unreported = self.unreported, None
        return kind

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while self.count or self._active > 0:
            await asyncio.sleep(_TICK)
            try:
                await self._check()
            except Exception as exc:  # the watch must outlive any surprise, or limits stop holding
                print(f"runner: limit watch: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    async def _check(self) -> None:
        tasks = count_tasks() if self.count else 0
        kind: LimitKind | None = (
            "processes" if self.count and tasks >= _NEAR_FULL * (self.limits.processes or 0) else None
        )
        busy = self._active > 0 or tasks > _RESIDENT
        if kind is None and busy:
            kind = await self._over_workspace()
        if kind is not None:
            self.record_trip(kind)
            self.kill_all()  # inline: at the process limit no helper thread can start

    def record_trip(self, kind: LimitKind) -> None:
        self.trips += 1
        self.last_kind = kind
        if self._active == 0:
            self.unreported = kind

    async def _over_workspace(self) -> LimitKind | None:
        limit = self.limits.workspace
        now = time.monotonic()
        if limit is None or now < self._next_scan:
            return None
        try:
            size = await asyncio.to_thread(workspace_bytes, self.root)
        except RuntimeError:  # no thread to be had (the slot is at its process limit)
            size = workspace_bytes(self.root)
        cost = time.monotonic() - now
        self._next_scan = time.monotonic() + max(_MIN_SCAN_INTERVAL, _SCAN_SHARE * cost)
        # only growth past the limit trips: a command that deletes files to get under it may run
        grew = size > self.last_size
        self.last_size = size
        return "workspace" if size > limit and grew else None
