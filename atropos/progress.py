"""Progress of a long wait (pulling an image, starting servers): one line of text at a time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

Progress = Callable[[str], None]
T = TypeVar("T")

HEARTBEAT_SECONDS = 15.0


def no_progress(_message: str) -> None:
    pass


async def reporting(work: Awaitable[T], progress: Progress, label: str, every: float | None = None) -> T:
    """`await work`, saying `label: still waiting after N s` every `every` seconds (default:
    HEARTBEAT_SECONDS) until it ends."""
    every = every or HEARTBEAT_SECONDS
    task = asyncio.ensure_future(work)
    started = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every)
            if done:
                return task.result()
            progress(f"{label}: still waiting after {time.monotonic() - started:.0f} s")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
