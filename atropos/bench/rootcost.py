"""Scenario 14, the slot's root: what the allow-list root (`--root system`, the default: the node's
system dirs, a curated /etc written for the slot, the runner's private copy, the server's files
hidden) costs on a slot's start and on a one-shot call, against the layout before it (`--root host`:
the node's whole root read-only), both servers up at once in the same run, default settings
otherwise (no warm slots, so each slot's first call starts its sandbox as a user's first call does)."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable

from atropos.bench.measure import Row, judged, sample_interleaved
from atropos.bench.scenarios import pool_config
from atropos.slots import Slot, SlotPool

_SCENARIO = "14 slot root"
_POLICIES = ("system", "host")


async def _first_call_s(pool: SlotPool, name: str) -> tuple[Slot, float]:
    slot = await pool.acquire(name)
    t0 = time.perf_counter()
    result = await pool.execute(slot, "bash", {"command": "true"})
    if not result.ok:
        raise RuntimeError(f"a slot's first call failed: {result.output[-500:]}")
    return slot, time.perf_counter() - t0


async def root_rows(quick: bool, say: Callable[[str], None]) -> list[Row]:
    slots, calls = (4, 60) if quick else (12, 300)
    say(f"slot root: {slots} cold slots' first call and {calls} one-shot calls, root system against root host")
    starts: dict[str, list[float]] = {p: [] for p in _POLICIES}
    async with contextlib.AsyncExitStack() as stack:
        pools = {
            p: await stack.enter_async_context(SlotPool(pool_config(slots_per_container=slots, warm_slots=0, root=p)))
            for p in _POLICIES
        }
        held: dict[str, list[Slot]] = {p: [] for p in _POLICIES}
        for i in range(slots):  # alternating, so both meet the same machine
            for policy, pool in pools.items():
                slot, seconds = await _first_call_s(pool, f"bench-root-{policy}-{i}")
                held[policy].append(slot)
                starts[policy].append(seconds)

        def one_shot(policy: str) -> Callable[[], Awaitable[object]]:
            return lambda: pools[policy].execute(held[policy][0], "bash", {"command": "true"})

        samples = await sample_interleaved({p: one_shot(p) for p in _POLICIES}, calls)
    start = {p: statistics.median(v) * 1000 for p, v in starts.items()}
    shot = {p: statistics.median(v) * 1000 for p, v in samples.items()}
    return [
        judged(Row(_SCENARIO, "slot start: a cold slot's first `bash true` (root system)", start["system"], "ms",
                   baseline="the same with root host (the node's whole root)", baseline_value=start["host"],
                   target="<= 1.25x", note=f"p50 of {slots} slots each"), 1.25),
        judged(Row(_SCENARIO, "one-shot `true` (root system)", shot["system"], "ms",
                   baseline="the same with root host", baseline_value=shot["host"], target="<= 1.1x",
                   note=f"p50 of {calls} each, interleaved"), 1.1),
    ]  # fmt: skip
