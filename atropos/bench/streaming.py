"""Scenario 13, streamed output: how soon the first line of a command that prints a line every
100 ms reaches the caller through `pool.execute_stream` (a warm slot), against reading it from a
plain `bash -c` child's pipe in this process, in the same run."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Callable

from atropos.bench.measure import Row, judged
from atropos.bench.scenarios import pool_config
from atropos.sandbox.models import ExecuteResult, OutputChunk
from atropos.slots import SlotPool

_SCENARIO = "13 streaming"
_TICKS = "for i in 1 2 3 4 5; do echo line $i; sleep 0.1; done"


async def _floor_first_line() -> tuple[float, float]:
    """(first line, whole command) seconds of a plain child."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec("bash", "-c", _TICKS, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    await proc.stdout.readline()
    first = time.perf_counter() - t0
    await proc.stdout.read()
    await proc.wait()
    return first, time.perf_counter() - t0


async def streaming_rows(quick: bool, say: Callable[[str], None]) -> list[Row]:
    runs = 5 if quick else 20
    say(f"streaming: first line of a command printing one every 100 ms, {runs} runs, against a plain child")
    floors: list[float] = []
    firsts: list[float] = []
    gaps: list[float] = []
    async with SlotPool(pool_config()) as pool:
        slot = await pool.acquire("bench-stream")
        await pool.execute(slot, "bash", {"command": "true"})  # the sandbox is up
        for i in range(runs):
            floors.append((await _floor_first_line())[0])
            tool = "bash" if i % 2 == 0 else "bash_session"
            t0 = time.perf_counter()
            arrivals: list[float] = []
            result: ExecuteResult | None = None
            async for event in pool.execute_stream(slot, tool, {"command": _TICKS}, timeout=30):
                if isinstance(event, OutputChunk):
                    arrivals.append(time.perf_counter() - t0)
                else:
                    result = event
            if result is None or not result.ok or len(arrivals) < 5:
                raise RuntimeError(f"streamed {len(arrivals)} pieces, result {result}")
            firsts.append(arrivals[0])
            gaps += [b - a for a, b in itertools.pairwise(arrivals)]
        pool.release(slot)
    first_ms, floor_ms = statistics.median(firsts) * 1000, statistics.median(floors) * 1000
    return [
        judged(Row(_SCENARIO, "first streamed line (bash, bash_session)", first_ms, "ms",
                   baseline="first line from a plain child's pipe", baseline_value=floor_ms, target="<= 3x",
                   note=f"p50 of {runs}; p90 {statistics.quantiles(firsts, n=10)[-1] * 1000:.1f} ms; gaps between "
                        f"lines p50 {statistics.median(gaps) * 1000:.0f} ms (the command sleeps 100 ms)"), 3.0),
    ]  # fmt: skip
