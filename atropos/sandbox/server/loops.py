"""A server's background work over its slots (warm starts, hibernation): one task, started with the
HTTP app and cancelled when it shuts down, only where its setting turns it on."""

from __future__ import annotations

import asyncio
import contextlib


class SlotLoop:
    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        raise NotImplementedError
