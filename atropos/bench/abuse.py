"""Scenario 9: a hostile command in one slot; how the server's /health and another slot's calls
fare meanwhile, against the same measurements on the same server while it is quiet."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from atropos.bench.measure import Row, Summary
from atropos.sandbox.limits import SlotLimits
from atropos.sandbox.models import ExecuteResult
from atropos.slots import Slot, SlotPool, SlotPoolConfig

# each runs in slot 0 until its limit (or its timeout) stops it
ABUSES: dict[str, tuple[str, float]] = {
    "fork bomb": (":(){ :|:& };:; sleep 4", 8.0),
    "2 GB allocation": ("python3 -c 'b = bytearray(2 * 1024**3)'", 20.0),
    "output flood (yes)": ("yes", 4.0),
    "disk fill": ("for i in $(seq 1 40); do head -c 32M /dev/zero > f$i || break; done; sleep 3", 20.0),
    "CPU loop, TERM ignored": ("trap '' TERM; while :; do :; done", 4.0),
}
LIMITS = SlotLimits(
    memory=1 << 30, processes=128, cpu_seconds=30, file_size=256 << 20, workspace=512 << 20, tmp=256 << 20
)
_PING_GAP = 0.01


@dataclass
class Watched:
    """Latencies of the calls that succeeded, and how many did not."""

    seconds: list[float] = field(default_factory=list)
    failures: int = 0

    def add(self, started: float, ok: bool) -> None:
        if ok:
            self.seconds.append(time.perf_counter() - started)
        else:
            self.failures += 1

    def summary(self) -> Summary:
        return Summary.of(self.seconds or [float("nan")])


async def _pings(client: aiohttp.ClientSession, stop: asyncio.Event) -> Watched:
    seen = Watched()
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            async with client.get("/health", timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                await r.read()
                seen.add(t0, r.status == 200)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            seen.add(t0, False)
        await asyncio.sleep(_PING_GAP)
    return seen


async def _neighbour(pool: SlotPool, slot: Slot, stop: asyncio.Event) -> Watched:
    seen = Watched()
    while not stop.is_set():
        t0 = time.perf_counter()
        r = await pool.execute(slot, "bash", {"command": "echo hi"})
        seen.add(t0, r.ok and r.stdout == "hi\n")
        await asyncio.sleep(_PING_GAP)
    return seen


async def _observe(
    pool: SlotPool,
    client: aiohttp.ClientSession,
    other: Slot,
    during: Awaitable[ExecuteResult] | None,
    quiet_seconds: float = 0.0,
) -> tuple[ExecuteResult | None, Watched, Watched]:
    stop = asyncio.Event()
    pings = asyncio.ensure_future(_pings(client, stop))
    calls = asyncio.ensure_future(_neighbour(pool, other, stop))
    outcome = None
    if during is not None:
        outcome = await during
    else:
        await asyncio.sleep(quiet_seconds)
    stop.set()
    return outcome, await pings, await calls


async def abuse_rows(say: Callable[[str], None]) -> list[Row]:
    rows: list[Row] = []
    config = SlotPoolConfig(
        slots_per_container=2, min_containers=1, max_containers=1, lease_ttl=None, limits=LIMITS, isolation="auto"
    )
    async with SlotPool(config) as pool:
        bad, other = await pool.acquire("abuser"), await pool.acquire("neighbour")
        async with aiohttp.ClientSession(base_url=pool.server_of(bad).url) as client:
            say("abuse: quiet baseline")
            _, quiet_h, quiet_c = await _observe(pool, client, other, None, quiet_seconds=4.0)
            base_h, base_c = quiet_h.summary(), quiet_c.summary()
            rows.append(
                Row(
                    "9 abuse",
                    "quiet: /health p99",
                    base_h.p99 * 1000,
                    "ms",
                    extra={"p50_ms": base_h.p50 * 1000, "neighbour_call_p99_ms": base_c.p99 * 1000},
                )
            )
            for name, (command, timeout) in ABUSES.items():
                say(f"abuse: {name}")
                hostile = pool.execute(bad, "bash", {"command": command}, timeout=timeout)
                result, pings, calls = await _observe(pool, client, other, hostile)
                await pool.execute(bad, "bash", {"command": "rm -rf -- ./*"}, timeout=60)
                rows.append(_abuse_row(name, result, pings, calls, base_h, base_c))
        pool.release(bad)
        pool.release(other)
    return rows


def _abuse_row(
    name: str, result: ExecuteResult | None, pings: Watched, calls: Watched, base_h: Summary, base_c: Summary
) -> Row:
    h, c = pings.summary(), calls.summary()
    stopped_by = (
        "?" if result is None else (result.limit or ("timeout" if result.timed_out else f"exit {result.exit_code}"))
    )
    return Row(
        "9 abuse",
        f"{name}: /health p99",
        h.p99 * 1000,
        "ms",
        "quiet /health p99",
        base_h.p99 * 1000,
        "<= 100 ms, none failed",
        ratio=h.p99 / base_h.p99,
        met=h.p99 <= 0.1 and pings.failures == 0 and calls.failures == 0,
        note=(
            f"stopped by {stopped_by}; {len(pings.seconds)} pings, {pings.failures} failed; neighbour "
            f"calls {len(calls.seconds)} ok, {calls.failures} failed, p99 {c.p99 * 1000:.1f} ms "
            f"(quiet {base_c.p99 * 1000:.1f} ms)"
        ),
        extra={
            "p50_ms": h.p50 * 1000,
            "health_failures": pings.failures,
            "neighbour_failures": calls.failures,
            "neighbour_p99_ms": c.p99 * 1000,
        },
    )
