"""Hibernation of idle slots: a slot whose last call ended `after` seconds ago, and that runs nothing
but its session's idle shell, gives back its runner's memory (~10 MB of Python) until its next
call; asleep it costs its floor, bubblewrap, the shell and a holder process (see
atropos.sandbox.runner.hibernate). Network `public` costs a slot no process of its own: its link to
the server's hub stays as it is.

The next call pays for waking it (a new Python runner: tens of milliseconds, measured by
`atropos-sandbox bench --only scale`); nothing else about the slot changes: the shell keeps its
working directory, variables and functions, the workspace its files, and a slot asleep is woken
before anything reads or writes through it. Warm slots (started, never used) never sleep: they are
kept for a burst's first calls. `after` 0 turns it off.
"""

from __future__ import annotations

import asyncio
import logging
import time

from atropos.sandbox.server.loops import SlotLoop
from atropos.sandbox.server.slot_runner import SlotRunner

log = logging.getLogger("atropos.sandbox")

_LONGEST_TICK = 5.0


class Hibernation(SlotLoop):
    def __init__(self, slots: list[SlotRunner], after: float) -> None:
        super().__init__()
        self.slots = slots
        self.after = after

    @property
    def enabled(self) -> bool:
        return self.after > 0

    @property
    def asleep(self) -> int:
        return sum(1 for slot in self.slots if slot.hibernated)

    async def _run(self) -> None:
        tick = min(max(self.after / 4, 0.05), _LONGEST_TICK)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for slot in self.slots:
                if slot.sleepable and now - slot.idle_since >= self.after:
                    try:
                        await slot.hibernate()
                    except Exception:  # a slot that cannot sleep stays awake; the others still may
                        log.exception("slot %d: hibernation failed", slot.index)
