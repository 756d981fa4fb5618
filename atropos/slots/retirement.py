"""Servers with an end the backend knows (a SLURM job's time limit): retired before it, so that no
call is lost to it.

A server retires once its time left is at most `retire_before` (or half the time it had when it
joined, if that is less: a job shorter than the margin still serves half its time), or as soon as a
call would not end before it. Retiring, it takes no new leases and its replacement starts at once;
its leased slots keep serving the calls that end in time, so a trajectory keeps its files, and a
call that would outlast the server is refused before it runs (SlotDraining, a SlotLost: acquire
another slot). `retire_before=0` turns all of this off: the server serves until it is stopped, and
its calls then end in SlotLost.
"""

from __future__ import annotations

import asyncio

from atropos.errors import SlotDraining
from atropos.slots.fleet import Fleet

# a call must end this long before the server's end: the pool's clock and the backend's are
# compared through a poll of the backend, not exactly
_CALL_MARGIN = 5.0


class Retirement:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._first_left: dict[str, float] = {}  # server -> time left when first seen

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.fleet.config.health_interval)
            self.check()

    def check(self) -> None:
        if not self.fleet.config.retire_before:
            return
        for server_id, member in list(self.fleet.members.items()):
            left = self.fleet.backend.ends_in(server_id)
            if left is None or member.retiring:
                continue
            first = self._first_left.setdefault(server_id, left)
            if left <= min(self.fleet.config.retire_before, first / 2):
                self.fleet.retire(server_id, f"{max(left, 0):.0f}s before its backend stops it")
        for gone in self._first_left.keys() - self.fleet.members.keys():
            del self._first_left[gone]

    def time_left(self, server_id: str) -> float | None:
        left = self.fleet.backend.ends_in(server_id)
        return None if left is None else max(left, 0.0)

    def refusal(self, server_id: str, slot_index: int, timeout: float) -> SlotDraining | None:
        """The error a call of up to `timeout` seconds gets instead of running, if it would not end
        before its server does (which then retires, if it was not retiring already)."""
        if not self.fleet.config.retire_before:
            return None
        left = self.fleet.backend.ends_in(server_id)
        if left is None or timeout + _CALL_MARGIN <= left:
            return None
        self.fleet.retire(server_id, f"a call of up to {timeout:.0f}s would outlast its {max(left, 0):.0f}s left")
        return SlotDraining(
            f"slot {server_id}/{slot_index}: its server is stopped by its backend in {max(left, 0):.0f}s, before "
            f"this call of up to {timeout:.0f}s could end; the call did not run. Acquire another slot"
        )
