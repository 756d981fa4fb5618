"""Slot starts in one server: how many run at once, and which calls go after them.

A slot's start (its sandbox, runner and network link) costs several milliseconds of CPU. When a
burst of trajectories begins, each fresh slot's first call starts it, and the next calls of the
slots already started compete with those starts for the node's CPU: the last trajectory to begin
waits for most of everyone else's work (256 fresh slots on 8 servers, ten calls each: first-call
p99 3.5 s; with their first calls alone: 1.35 s). So while a start that a call waits for is queued
or under way, the tool calls of this server's slots whose trajectories have begun (a call ran since
the slot's start or reset) wait for it, up to `hold` seconds from the first such start on:
trajectories that have not begun go first, whether their slot is warm or not. The work is the
same, in another order. What comes before a start (a fork's copy, an image's root) holds nothing
back, nor do starts no call waits for (warm slots, atropos.sandbox.server.warm; forks begun ahead).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
from collections.abc import AsyncIterator

# runners starting at once: each costs CPU, and a burst of 64 on a small machine would starve the
# server's own event loop (health checks time out, the pool declares it lost)
AT_ONCE = max(2, os.cpu_count() or 2)

# the longest the calls of begun trajectories wait for other slots' starts, from the first such start
# on: a start that is slow (a large image's root, a loaded node, a slot made to start slowly on
# purpose) delays the others' calls by this much at most, once, until no start is awaited again
HOLD = 2.0


class StartKind(enum.Enum):
    AHEAD = "ahead"  # no call waits for it: a warm slot's, a fork's or an image slot's begun in the background
    FOR_A_CALL = "for a call"  # a call waits for it


class Starts:
    def __init__(self, at_once: int = AT_ONCE, hold: float = HOLD) -> None:
        self._running = asyncio.Semaphore(at_once)
        self.hold = hold
        self.awaited = 0  # starts a call waits for: queued or under way
        self._none_awaited = asyncio.Event()
        self._none_awaited.set()
        self._hold_ends = 0.0  # loop time: the calls of begun trajectories wait no longer than this

    @contextlib.asynccontextmanager
    async def start(self, kind: StartKind) -> AsyncIterator[None]:
        """One start, at most `at_once` together; while one FOR_A_CALL is queued or under way, the
        calls of begun trajectories wait (`turn`)."""
        if kind is StartKind.AHEAD:
            async with self._running:
                yield
            return
        if self.awaited == 0:
            self._none_awaited.clear()
            self._hold_ends = asyncio.get_running_loop().time() + self.hold
        self.awaited += 1
        try:
            async with self._running:
                yield
        finally:
            self.awaited -= 1
            if self.awaited == 0:
                self._none_awaited.set()

    async def turn(self) -> None:
        """A begun trajectory's call: returns once no start is awaited by a call, or when the hold is over."""
        if self.awaited:
            left = self._hold_ends - asyncio.get_running_loop().time()
            if left > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._none_awaited.wait(), left)
