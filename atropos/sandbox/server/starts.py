"""Slot starts in one server: how many run at once, and which calls go after them.

A slot's start (its sandbox, runner and network link) costs several milliseconds of CPU. When a
burst of trajectories begins, each fresh slot's first call starts it, and the next calls of the
slots already started compete with those starts for the node's CPU: the last trajectory to begin
waits for most of everyone else's work (256 fresh slots on 8 servers, ten calls each: first-call
p99 3.5 s; with their first calls alone: 1.35 s). So while a start that a call waits for is under
way, the calls of this server's started slots wait for it, up to `hold` seconds: trajectories that
have not begun go first. The work is the same, in another order. Warm starts (ahead of demand,
atropos.sandbox.server.warm) hold nothing back: no call waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

# runners starting at once: each costs CPU, and a burst of 64 on a small machine would starve the
# server's own event loop (health checks time out, the pool declares it lost)
AT_ONCE = max(2, os.cpu_count() or 2)

# the longest a started slot's call waits for other slots' starts: a start that is slow (a large
# image's root, a loaded node) delays the others' calls by this much at most
HOLD = 2.0


class Starts:
    def __init__(self, at_once: int = AT_ONCE, hold: float = HOLD) -> None:
        self._running = asyncio.Semaphore(at_once)
        self.hold = hold
        self.awaited = 0  # starts a call waits for: queued or under way
        self._none_awaited = asyncio.Event()
        self._none_awaited.set()

    @contextlib.asynccontextmanager
    async def start(self) -> AsyncIterator[None]:
        """One start, at most `at_once` together."""
        async with self._running:
            yield

    @contextlib.asynccontextmanager
    async def awaited_by_a_call(self) -> AsyncIterator[None]:
        """A call waits for its slot's start (or finds its slot started meanwhile): the calls of
        started slots go after it (`turn`)."""
        self.awaited += 1
        self._none_awaited.clear()
        try:
            yield
        finally:
            self.awaited -= 1
            if self.awaited == 0:
                self._none_awaited.set()

    async def turn(self) -> None:
        """A started slot's call: returns once no call waits for a start, or after `hold` seconds."""
        if self.awaited:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._none_awaited.wait(), self.hold)
