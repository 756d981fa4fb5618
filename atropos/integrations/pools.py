"""The pools adapters share: one started SyncSlotPool per distinct configuration in this process
(a framework's environments come and go, the pool's servers stay), closed at exit."""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from atropos.slots import SlotPoolConfig, SyncSlotPool

__all__ = ["on_pool", "shared_pool"]

T = TypeVar("T")

_pools: dict[str, SyncSlotPool] = {}
_lock = threading.Lock()


def shared_pool(fields: dict[str, Any]) -> SyncSlotPool:
    """The started pool of these SlotPoolConfig fields (made on first use)."""
    config = SlotPoolConfig.model_validate(fields)
    key = config.model_dump_json()
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            pool = SyncSlotPool(config)
            pool.start()
            _pools[key] = pool
        return pool


async def on_pool(pool: SyncSlotPool, coro: Coroutine[Any, Any, T]) -> T:
    """Await, on the caller's event loop (an async framework's), a coroutine of `pool`'s async API
    run on the pool's own loop."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, pool.loop))


def _close_pools() -> None:
    with _lock:
        for pool in _pools.values():
            pool.close()
        _pools.clear()


# at exit, before the interpreter shuts its thread pools down (closing a pool stops its servers from
# worker threads; atropos.slots.sync registered the thread pools' hook first, and hooks run newest
# first): `atexit` callbacks would run only after that
getattr(threading, "_register_atexit", atexit.register)(_close_pools)
