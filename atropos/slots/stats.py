"""Counters and latency samples of a pool, and the snapshot `SlotPool.stats()` returns."""

from __future__ import annotations

from collections import Counter, defaultdict, deque

from pydantic import BaseModel

_SAMPLES = 10_000


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


class LatencySummary(BaseModel):
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def summarize(samples: deque[float], count: int) -> LatencySummary:
    values = sorted(samples)
    return LatencySummary(
        count=count,
        p50_ms=percentile(values, 0.5) * 1000,
        p99_ms=percentile(values, 0.99) * 1000,
        max_ms=(values[-1] if values else 0.0) * 1000,
    )


class PoolStats(BaseModel):
    servers: int
    slots: int
    slots_by_status: dict[str, int]
    waiting: int
    leases: int
    releases: int
    reclaimed: int
    acquire_waits: int
    acquire_timeouts: int
    acquire_wait: LatencySummary
    calls: dict[str, LatencySummary]
    errors: dict[str, int]
    servers_lost: int
    servers_retired: int = 0
    """servers taken out ahead of their backend's stop (a SLURM time limit), replaced first"""
    scale_ups: int
    scale_downs: int
    replacements_pending: int = 0
    """servers lost (or retiring) whose replacement has not joined yet: capacity the pool is short of"""
    replace_error: str | None = None
    """why the newest try to replace a server failed, while one is still pending (e.g. no node has
    room for it: `cpu exhausted`); the pool keeps trying"""


class StatsRecorder:
    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.waits: deque[float] = deque(maxlen=_SAMPLES)
        self.calls: defaultdict[str, deque[float]] = defaultdict(lambda: deque(maxlen=_SAMPLES))
        self.call_counts: Counter[str] = Counter()

    def call(self, tool: str, seconds: float) -> None:
        self.calls[tool].append(seconds)
        self.call_counts[tool] += 1

    def wait(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.counters["acquire_waits"] += 1

    def error(self, exc: BaseException) -> None:
        self.errors[type(exc).__name__] += 1
