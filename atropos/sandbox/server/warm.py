"""Warm slots: sandboxes started before their first call, so that a burst of fresh slots (the first
step of a training run, a scale-up) does not wait for a sandbox, a runner and a shell to start, one
CPU's worth at a time.

The server keeps `target` slots warm: runner started, nothing run since it started or since the
slot's last reset. It fills them lowest index first (the pool hands slots out in that order), one
start at a time so that the starts real calls need go first, and refills as warm slots are used or
a warm runner dies. A slot that is handed out warm is as clean as a cold one: its runner has run
nothing; a warm runner that died is started again before its slot's next call, never used dead.
"""

from __future__ import annotations

import asyncio
import logging

from atropos.sandbox.server.loops import SlotLoop
from atropos.sandbox.server.slot_runner import SlotFailure, SlotRunner

log = logging.getLogger("atropos.sandbox")

_RETRY = 2.0  # seconds before trying again after a warm start failed


class WarmSlots(SlotLoop):
    def __init__(self, slots: list[SlotRunner], target: int) -> None:
        super().__init__()
        self.slots = slots
        self.target = min(target, len(slots))
        self._changed = asyncio.Event()
        for slot in slots:
            slot.on_change = self._changed.set

    @property
    def enabled(self) -> bool:
        return self.target > 0

    @property
    def ready(self) -> int:
        return sum(1 for slot in self.slots if slot.warm)

    async def _run(self) -> None:
        while True:
            self._changed.clear()
            await self._fill()
            await self._changed.wait()

    async def _fill(self) -> None:
        while self.ready < self.target:
            cold = next((s for s in self.slots if not s.started and not s.used), None)
            if cold is None:
                return  # every unused slot is started: the rest are in use
            try:
                await cold.warm_up()
            except SlotFailure as exc:
                log.warning("slot %d: warm start failed (%s); trying again in %.0fs", cold.index, exc, _RETRY)
                await asyncio.sleep(_RETRY)
