"""Timing primitives of the benchmark: samples, summaries, rows with their baseline and target."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from atropos.slots import percentile


@dataclass
class Summary:
    n: int
    p50: float
    p99: float
    mean: float
    stdev: float

    @classmethod
    def of(cls, samples: list[float]) -> Summary:
        values = sorted(samples)
        return cls(
            len(values),
            percentile(values, 0.5),
            percentile(values, 0.99),
            statistics.fmean(values),
            statistics.pstdev(values) if len(values) > 1 else 0.0,
        )


@dataclass
class Row:
    scenario: str
    metric: str
    value: float
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    target: str = ""
    # ratio = value / baseline_value; `met` compares it with the target (None: no target)
    ratio: float | None = None
    met: bool | None = None
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)


def judged(row: Row, limit: float, *, higher_is_better: bool = False, of_value: bool = False) -> Row:
    """Fill in the ratio to the baseline and whether the target holds: for the ratio where there is
    a baseline, unless the target is the value's own (`of_value`: "<= 2 s" beside a baseline)."""
    if row.baseline_value:
        row.ratio = row.value / row.baseline_value
    measure = row.ratio if row.ratio is not None and not of_value else row.value
    row.met = measure >= limit if higher_is_better else measure <= limit
    return row


async def sample_async(fn: Callable[[], Awaitable[object]], n: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


def subprocess_floor(n: int, command: str = "true", warmup: int = 5) -> list[float]:
    """The floor: a plain `bash -c` run from the benchmark process itself."""
    out = []
    for _ in range(n + warmup):
        t0 = time.perf_counter()
        subprocess.run(["bash", "-c", command], stdin=subprocess.DEVNULL, capture_output=True, check=False)
        out.append(time.perf_counter() - t0)
    return out[warmup:]


async def sample_interleaved(
    ops: dict[str, Callable[[], Awaitable[object]]], n: int, chunk: int = 10
) -> dict[str, list[float]]:
    """`n` timings of each operation, taken in rounds of `chunk` per operation in turn."""
    for fn in ops.values():
        for _ in range(3):
            await fn()
    out: dict[str, list[float]] = {name: [] for name in ops}
    while len(next(iter(out.values()))) < n:
        for name, fn in ops.items():
            for _ in range(chunk):
                t0 = time.perf_counter()
                await fn()
                out[name].append(time.perf_counter() - t0)
    return out


async def subprocess_floor_concurrent(workers: int, per_worker: int, command: str = "true") -> float:
    """Wall seconds of `workers` concurrent loops each running plain `bash -c COMMAND` `per_worker`
    times (asyncio subprocesses from the benchmark process: no HTTP, no sandbox)."""

    async def worker() -> None:
        for _ in range(per_worker):
            proc = await asyncio.create_subprocess_exec(
                "bash", "-c", command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            await proc.communicate()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return time.perf_counter() - t0


def _kb_field(path: str, key: str) -> float:
    """`key: N kB` from a /proc file, in MB; 0 when the process or the line is gone."""
    try:
        with open(path, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def rss_mb(pid: int) -> float:
    return _kb_field(f"/proc/{pid}/status", "VmRSS:")


def pss_mb(pid: int) -> float:
    """Proportional set size: shared pages (Python, libc, bwrap) count once across processes."""
    return _kb_field(f"/proc/{pid}/smaps_rollup", "Pss:")


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants (a server with its slot runners and shells)."""
    from atropos.host import snapshot, tree_members

    members = tree_members(pid, snapshot(), include_root=True)
    return sum(rss_mb(p) for p in members)


def machine() -> dict[str, str]:
    import platform

    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_avg_1m": f"{load[0]:.2f}",
    }
