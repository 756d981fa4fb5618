"""Task setups run once and forked many times: `SlotPool.prepare` and `acquire(from_snapshot=...)`.

A GRPO group runs 8-64 rollouts of one task; each used to repeat the task's setup (clone, install)
in its own slot. Here the setup runs once per server: in one slot, whose workspace then becomes a
snapshot on its server (atropos.sandbox.server.snapshots), and every slot acquired for that task
on that server is forked from it (an overlay: no copy). A server that lacks the snapshot (a new one
after a scale-up, a replacement after a loss) has the setup run there once, in the first slot
acquired for the task on it, which then starts from the snapshot like the others. Concurrent
acquires on one server wait for that one setup instead of running their own.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from atropos.errors import InvalidToolCall, SetupFailed
from atropos.host.background import Background
from atropos.sandbox.client import ServerClient
from atropos.sandbox.models import ExecuteResult
from atropos.slots.leasing import Slot

SetupCall = tuple[str, dict[str, Any]]  # (tool, args)
Execute = Callable[[Slot, str, dict[str, Any], float | None], Awaitable[ExecuteResult]]

_SNAPSHOT_TIMEOUT = 600.0


@dataclass(frozen=True)
class _Setup:
    calls: list[SetupCall]
    timeout: float | None  # per call
    image: str | None  # the task image the setup runs in (its forks too)


def snapshot_name(task_key: str) -> str:
    """The snapshot's name on every server: fixed by the task key, safe whatever the key holds."""
    return "task-" + hashlib.sha256(task_key.encode()).hexdigest()[:24]


class PreparedTasks:
    def __init__(
        self,
        execute: Execute,
        client_of: Callable[[Slot], ServerClient],
        background: Background,
        use_image: Callable[[Slot, str], Awaitable[None]],
    ) -> None:
        self._execute = execute
        self._client_of = client_of
        self._background = background  # the first preparation of a key runs there: the pool's close ends it
        self._use_image = use_image  # a task in its own image: the setup runs there, its snapshot holds it
        self._setups: dict[str, _Setup] = {}
        self._on: set[tuple[str, str]] = set()  # (task key, server id) with the snapshot
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._first: dict[str, asyncio.Task[None]] = {}  # the first preparation of each key

    def known(self, task_key: str) -> bool:
        return task_key in self._setups

    def image_of(self, task_key: str) -> str | None:
        return self._setups[task_key].image

    def register(
        self, task_key: str, setup: Sequence[SetupCall], call_timeout: float | None, image: str | None = None
    ) -> None:
        calls = [(tool, dict(args)) for tool, args in setup]
        known = self._setups.get(task_key)
        if known is not None and (known.calls, known.image) != (calls, image):
            raise ValueError(f"task {task_key!r} is already prepared with another setup or image; use a new key")
        self._setups[task_key] = _Setup(calls, call_timeout, image)

    async def once(self, task_key: str, prepare: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `prepare` for the key unless it ran (or runs now: then wait for it); after a failure
        the next caller tries again."""
        first = self._first.get(task_key)
        if first is None or (first.done() and (first.cancelled() or first.exception() is not None)):
            first = self._first[task_key] = self._background.spawn(prepare())
        await asyncio.shield(first)

    async def prepare_in(self, slot: Slot, task_key: str) -> None:
        """Run the task's setup in `slot`, snapshot it on the slot's server, and fork the slot from
        the snapshot (so that it too starts with nothing of the setup's processes)."""
        setup = self._setups[task_key]
        if setup.image is not None:
            await self._use_image(slot, setup.image)
        for tool, args in setup.calls:
            result = await self._execute(slot, tool, args, setup.timeout)
            if not result.ok:
                raise SetupFailed(
                    f"task {task_key!r}: setup call {tool} {args!r} failed (exit {result.exit_code}): "
                    f"{(result.error or '')} {result.output[-2000:]}".strip()
                )
        client = self._client_of(slot)
        await client.snapshot(slot.index, snapshot_name(task_key), _SNAPSHOT_TIMEOUT)
        self._on.add((task_key, slot.server_id))
        await client.fork(snapshot_name(task_key), [slot.index], _SNAPSHOT_TIMEOUT)

    async def fork_into(self, slot: Slot, task_key: str) -> None:
        """Give the (just leased) slot the task's prepared workspace."""
        if task_key not in self._setups:
            raise ValueError(f"no setup for task {task_key!r}: call `await pool.prepare(task_key, setup)` first")
        where = (task_key, slot.server_id)
        async with self._locks.setdefault(where, asyncio.Lock()):
            if where not in self._on:
                await self.prepare_in(slot, task_key)
                return
        try:
            await self._client_of(slot).fork(snapshot_name(task_key), [slot.index], _SNAPSHOT_TIMEOUT)
        except InvalidToolCall as exc:
            if "no snapshot" not in str(exc):
                raise
            self._on.discard(where)  # the server lost it (restarted): prepare there again
            await self.fork_into(slot, task_key)
