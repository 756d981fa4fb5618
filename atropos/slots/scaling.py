"""The pool's scaler: more servers while trajectories wait and none is free, fewer once servers
have been idle for `idle_scale_down` (never below `min_containers`, at most one step per
`scale_cooldown`; the backend picks which idle server may go)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from atropos.slots.fleet import Fleet
from atropos.slots.leasing import SlotStatus

log = logging.getLogger("atropos.slots")

_SCALE_UP_RETRY = 5.0  # after a failed scale-up; doubled for each failure in a row, up to _SCALE_UP_BACKOFF_MAX
_SCALE_UP_BACKOFF_MAX = 300.0


def retry_after(failures: int) -> float:
    """Seconds before another scale-up after `failures` in a row (a job that can never start, an
    exhausted quota: not resubmitted every few seconds)."""
    return 0.0 if failures <= 0 else min(_SCALE_UP_RETRY * 2 ** (failures - 1), _SCALE_UP_BACKOFF_MAX)


class Scaler:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.wakeup = asyncio.Event()  # set when a trajectory starts waiting
        self._last_scale = 0.0
        self._up_failed = 0.0
        self._up_failures = 0  # in a row

    async def run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), timeout=1.0)
            self.wakeup.clear()
            try:
                await self.step()
            except Exception as exc:  # a failed scaling step must not stop the loop
                self.fleet.stats.error(exc)
                log.error("event=scale_failed error=%s", exc)

    async def step(self) -> None:
        fleet, c, book = self.fleet, self.fleet.config, self.fleet.book
        now = time.monotonic()
        waiting = book.waiting
        have = len(fleet) + fleet.replacing  # a replacement under way counts: it is coming
        backoff = retry_after(self._up_failures)
        if waiting and book.free_count == 0 and have < c.max_containers and now - self._up_failed >= backoff:
            want = min(math.ceil(waiting / c.slots_per_container), c.max_containers - have)
            fleet.progress(f"scaling up by {want}: {waiting} trajectories wait for a slot")
            fleet.stats.counters["scale_ups"] += 1
            self._last_scale = now
            try:
                infos = await fleet.backend.add_servers(want, fleet.progress)
            except Exception:
                self._up_failed = time.monotonic()
                self._up_failures += 1
                fleet.progress(f"scale-up failed; the next attempt in {retry_after(self._up_failures):.0f}s or later")
                raise
            self._up_failures = 0
            await fleet.admit(infos)
            return
        busy = {st.server_id for st in book.slots.values() if st.status is not SlotStatus.FREE}
        for busy_id in busy:
            if busy_id in fleet.members:
                fleet.members[busy_id].idle_since = now
        if waiting or len(fleet) <= c.min_containers or now - self._last_scale < c.scale_cooldown:
            return
        idle = sorted(
            (m for m in fleet.members.values() if now - m.idle_since >= c.idle_scale_down), key=lambda m: m.idle_since
        )
        sid = fleet.backend.pick_removable([m.info.server_id for m in idle])
        if sid is not None:
            idle_for = now - fleet.members[sid].idle_since
            fleet.stats.counters["scale_downs"] += 1
            self._last_scale = now
            fleet.progress(f"scaling down: server {sid} idle for {idle_for:.0f}s")
            await fleet.drain(sid, "removed by scale-down")
