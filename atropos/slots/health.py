"""The pool's watch over its servers: each answers /health, or is lost (a refused connection at
once, silence after `health_timeout`)."""

from __future__ import annotations

import asyncio
import time

from atropos.sandbox.client import ServerRefused
from atropos.slots.fleet import Fleet, Member


class HealthWatch:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.fleet.config.health_interval)
            await asyncio.gather(*(self.check(m) for m in list(self.fleet.members.values())))

    async def check(self, member: Member) -> None:
        if member.info.server_id not in self.fleet.members:
            return
        deadline = self.fleet.config.health_timeout
        try:
            await member.client.health(timeout=deadline)
            member.last_ok = time.monotonic()
        except ServerRefused as exc:  # nothing listens any more: the server is gone
            self.fleet.lose(member.info.server_id, f"connection refused ({exc!r})")
        except Exception as exc:
            if time.monotonic() - member.last_ok >= deadline:
                self.fleet.lose(member.info.server_id, f"/health unanswered for {deadline}s ({exc!r})")
