"""Tasks that run beside their owner (a pool, a backend, the slot runner) and end with it.

`spawn` starts one and keeps it; `cancel` ends them all and `wait` waits for them, at close. Every
task's outcome is retrieved when it ends, so none is ever reported as `Task exception was never
retrieved`: a failure the owner expects at close (`quiet`, e.g. the pool's PoolClosed) is dropped,
any other is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Background:
    def __init__(self, log: logging.Logger, quiet: tuple[type[BaseException], ...] = ()) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log = log
        self._quiet = quiet

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved: asyncio no longer reports it
        if exc is not None and not isinstance(exc, self._quiet):
            self._log.warning("background task %s failed", task.get_coro(), exc_info=exc)

    async def wait(self) -> None:
        """Until every task spawned so far has ended (their failures are logged, never raised)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.wait()
