"""Scenario 11, many slots per node: a burst of fresh slots' first calls with and without warm slots
(sandboxes started ahead of demand), a slot's start cost broken down, memory per slot against its
floor (bubblewrap and a shell), warm throughput against plain subprocesses at the same concurrency,
the pool's own CPU per call in this (the trainer's) process, and how these grow with the slots."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from atropos.backends.local import LocalBackend
from atropos.bench.measure import Row, judged, pss_mb, subprocess_floor_concurrent
from atropos.bench.scenarios import pool_config
from atropos.host import snapshot, tree_members
from atropos.sandbox.rootfs import build_layout
from atropos.sandbox.server.isolation import SandboxSpec, find_bwrap
from atropos.slots import Slot, SlotPool, SlotPoolConfig, percentile

_SCENARIO = "11 scale"
_CALLS = 10  # per trajectory, alternating bash and bash_session


@dataclass
class Wave:
    wall: float
    latencies: list[float]
    cpu: float  # this process's CPU seconds during the wave
    first: list[float] = field(default_factory=list)  # each trajectory's first call

    def first_p(self, q: float) -> float:
        return percentile(sorted(self.first), q)

    @property
    def calls(self) -> int:
        return len(self.latencies)

    def p(self, q: float) -> float:
        return percentile(sorted(self.latencies), q)


async def _wave(pool: SlotPool, trajectories: int, tag: str) -> Wave:
    """Every trajectory leases a slot and makes _CALLS calls, all at once."""
    latencies: list[float] = []
    first: list[float] = []

    async def trajectory(n: int) -> None:
        async with pool.slot(f"{tag}{n}", timeout=600) as slot:
            for i in range(_CALLS):
                tool = "bash" if i % 2 == 0 else "bash_session"
                t0 = time.perf_counter()
                result = await pool.execute(slot, tool, {"command": f"echo {n}-{i}"}, timeout=120)
                latencies.append(time.perf_counter() - t0)
                if i == 0:
                    first.append(latencies[-1])
                if result.stdout.strip() != f"{n}-{i}":
                    raise RuntimeError(f"wrong output {result.stdout!r}")

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(trajectory(n) for n in range(trajectories)))
    return Wave(time.perf_counter() - t0, latencies, time.process_time() - cpu0, first)


async def _calls(pool: SlotPool, slots: list[Slot]) -> Wave:
    """_CALLS calls in each of these leased slots, all slots at once."""
    latencies: list[float] = []

    async def one(slot: Slot) -> None:
        for i in range(_CALLS):
            t0 = time.perf_counter()
            await pool.execute(slot, "bash" if i % 2 == 0 else "bash_session", {"command": "true"}, timeout=120)
            latencies.append(time.perf_counter() - t0)

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(slot) for slot in slots))
    return Wave(time.perf_counter() - t0, latencies, time.process_time() - cpu0)


def _config(servers: int, slots: int, **kw: object) -> SlotPoolConfig:
    return pool_config(slots_per_container=slots, min_containers=servers, max_containers=servers, **kw)


async def _warm_ready(pool: SlotPool, timeout: float = 600.0) -> float:
    """Seconds until every server says its warm slots are started."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        healths = (await pool.servers_health()).values()
        warm = [h.get("warm") or {} for h in healths if isinstance(h, dict)]
        if len(warm) == len(healths) and all(w.get("ready", 0) >= w.get("target", 0) for w in warm):
            return time.perf_counter() - t0
        await asyncio.sleep(0.1)
    raise RuntimeError("warm slots not ready in time")


def _tree_pss(pid: int) -> tuple[float, int]:
    members = tree_members(pid, snapshot(), include_root=True)
    return sum(pss_mb(p) for p in members), len(members)


def _floor_spec(bwrap: str, scratch: str) -> SandboxSpec:
    """A slot's sandbox with the default root and nothing else (no runner, no network of its own)."""
    layout = build_layout("system", state_dir=os.path.join(scratch, "rootfs"), private=[scratch])
    return SandboxSpec(bwrap=bwrap, layout=layout)


def _sandbox_floor_pss(count: int) -> float:
    """PSS per sandbox of `count` bubblewrap sandboxes each holding an idle shell: a slot's floor."""
    bwrap = find_bwrap()
    if bwrap is None:
        return 0.0
    with tempfile.TemporaryDirectory(prefix="atropos-floor-") as scratch:
        spec = _floor_spec(bwrap, scratch)
        procs = []
        for i in range(count):
            workspace = os.path.join(scratch, str(i))
            os.makedirs(workspace)
            procs.append(
                subprocess.Popen(
                    spec.argv(workspace, ["bash", "--noprofile", "--norc", "-i"]),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(1.0)
        total = sum(sum(pss_mb(p) for p in tree_members(proc.pid, snapshot(), include_root=True)) for proc in procs)
        for proc in procs:
            proc.kill()
            proc.wait()
    return total / count


def _bwrap_true_ms(runs: int = 20) -> float:
    bwrap = find_bwrap()
    if bwrap is None:
        return 0.0
    with tempfile.TemporaryDirectory(prefix="atropos-floor-") as scratch:
        argv = _floor_spec(bwrap, scratch).argv(scratch, ["true"])
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run(argv, check=False, capture_output=True)
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


async def _start_breakdown(say: Callable[[str], None]) -> list[Row]:
    """One slot's start: the sandbox alone (bwrap running `true`), the rest of a fresh slot's first
    `bash` call over a started slot's (the server's spawn, the slot's network link, the runner's
    start), the shell (first `bash_session` call less the next)."""
    say("scale: a slot's start cost, broken down")
    bwrap_ms = _bwrap_true_ms()
    firsts: list[float] = []
    seconds: list[float] = []
    session_firsts: list[float] = []
    session_seconds: list[float] = []
    async with SlotPool(_config(1, 8, warm_slots=0)) as pool:
        runner = _runner_of(pool)
        for i in range(8):
            slot = await pool.acquire(f"b{i}")
            for bucket in (firsts, seconds):
                t0 = time.perf_counter()
                await pool.execute(slot, "bash", {"command": "true"})
                bucket.append(time.perf_counter() - t0)
            for bucket in (session_firsts, session_seconds):
                t0 = time.perf_counter()
                await pool.execute(slot, "bash_session", {"command": "true"})
                bucket.append(time.perf_counter() - t0)
    runner_ms = (statistics.median(firsts) - statistics.median(seconds)) * 1000 - bwrap_ms
    shell_ms = (statistics.median(session_firsts) - statistics.median(session_seconds)) * 1000
    total = bwrap_ms + runner_ms + shell_ms
    return [
        Row(_SCENARIO, "slot start: total (sandbox + runner + shell)", total, "ms",
            note=f"bwrap {bwrap_ms:.1f} ms, network link + {runner} runner {runner_ms:.1f} ms, shell {shell_ms:.1f} ms "
                 "(medians of 8)",
            extra={"bwrap_ms": bwrap_ms, "runner_ms": runner_ms, "shell_ms": shell_ms}),
    ]  # fmt: skip


async def _burst(
    servers: int, slots: int, warm: bool, say: Callable[[str], None], *, wait: bool = True
) -> tuple[Wave, Wave, float]:
    """A pool's first wave (fresh slots) and second wave (the same slots again); seconds to warm.
    Warm slots (the default) are waited for, unless not `wait`: the trajectories start with the pool,
    as a trainer's do, and race the warm-up."""
    kw: dict[str, object] = {} if warm else {"warm_slots": 0}
    async with SlotPool(_config(servers, slots, **kw)) as pool:
        warmed = await _warm_ready(pool) if warm and wait else 0.0
        start = "cold" if not warm else "warm" if wait else "default settings, from pool start"
        say(f"scale: burst of {servers * slots} fresh slots ({start})")
        first = await _wave(pool, servers * slots, "c")
        await asyncio.sleep(1.0)  # the releases' resets
        second = await _wave(pool, servers * slots, "w")
    return first, second, warmed


_SLEEP_AFTER = 3.0  # the memory scenario's hibernation delay (the server's default is 30 s)


async def _asleep(pool: SlotPool) -> int:
    healths = (await pool.servers_health()).values()
    return sum(int((h.get("hibernation") or {}).get("asleep", 0)) for h in healths if isinstance(h, dict))


async def _memory(slots: int, say: Callable[[str], None]) -> list[Row]:
    """PSS per slot with an open session, awake and once its idle slots hibernated (the runner a
    holder process), against the floor; and what waking costs a call."""
    say(f"scale: memory of {slots} slots with an open session, awake and asleep")
    async with SlotPool(_config(1, slots, warm_slots=0, hibernate_after=_SLEEP_AFTER)) as pool:
        assert isinstance(pool.backend, LocalBackend)
        runner = _runner_of(pool)
        pid = pool.backend.pid(pool.server_ids()[0])
        before, _ = _tree_pss(pid)
        leased: list[Slot] = [await pool.acquire(f"m{i}") for i in range(slots)]

        async def everyone() -> None:
            await asyncio.gather(*(pool.execute(s, "bash_session", {"command": "true"}) for s in leased))

        await everyone()  # sandboxes, runners and shells start
        await everyone()  # every slot has just been used: none asleep
        awake, awake_procs = _tree_pss(pid)
        warm_ms = [await _call_ms(pool, s) for s in leased[:16]]
        for _ in range(600):
            if await _asleep(pool) >= slots:
                break
            await asyncio.sleep(0.1)
        asleep_count = await _asleep(pool)
        asleep, asleep_procs = _tree_pss(pid)
        wake_ms = [await _call_ms(pool, s) for s in leased[:16]]
        for s in leased:
            pool.release(s)
    floor = await asyncio.to_thread(_sandbox_floor_pss, min(slots, 32))
    wake, warm = statistics.median(wake_ms), statistics.median(warm_ms)
    return [
        Row(_SCENARIO, f"PSS per slot, open session, awake ({slots} slots)", (awake - before) / slots, "MB",
            baseline="bwrap + idle bash (the floor)", baseline_value=floor or None,
            note=f"server tree {awake:.0f} MB in {awake_procs} processes; server alone {before:.0f} MB; {runner} "
                 "runner (network public: one pasta per server, in the tree)"),
        judged(Row(_SCENARIO, f"PSS per slot, open session, asleep ({slots} slots)", (asleep - before) / slots, "MB",
                   baseline="bwrap + idle bash (the floor)", baseline_value=floor or None, target="<= 4 MB",
                   note=f"{asleep_count} of {slots} asleep after {_SLEEP_AFTER:.0f} s idle; server tree "
                        f"{asleep:.0f} MB in {asleep_procs} processes"), 4.0),
        Row(_SCENARIO, "first call on a sleeping slot (wakes its runner)", wake, "ms",
            baseline="the same call on an awake slot", baseline_value=warm,
            note=f"medians of {len(wake_ms)} slots, one at a time; p90 {percentile(sorted(wake_ms), 0.9):.0f} ms"),
    ]  # fmt: skip


def _runner_of(pool: SlotPool) -> str:
    """Which runner the pool's servers run (compiled or python), as their /health said."""
    return ", ".join(sorted({str(e.get("runner")) for e in pool.enforcement().values()}))


async def _call_ms(pool: SlotPool, slot: Slot) -> float:
    t0 = time.perf_counter()
    result = await pool.execute(slot, "bash_session", {"command": "echo awake"})
    if result.stdout != "awake\n":
        raise RuntimeError(f"wrong output {result.stdout!r}")
    return (time.perf_counter() - t0) * 1000


async def _shape(sizes: tuple[int, ...], say: Callable[[str], None]) -> list[Row]:
    """The same load (64 held slots' calls, then acquire+release with nothing else running) on
    pools of growing size, the other slots idle (they never start a sandbox): what the pool's own
    costs do as its slots grow."""
    rows: list[Row] = []
    base: tuple[float, float, float] | None = None
    for size in sizes:
        servers = max(1, size // 128)
        say(f"scale: shape, {size} slots on {servers} server(s)")
        t0 = time.perf_counter()
        async with SlotPool(_config(servers, size // servers, warm_slots=0)) as pool:
            start = time.perf_counter() - t0
            held = [await pool.acquire(f"s{i}") for i in range(64)]
            await _calls(pool, held)  # their sandboxes start
            wave = await _calls(pool, held)
            for slot in held:
                pool.release(slot)
            cpu0, n = time.process_time(), 20_000
            for i in range(n):
                pool.release(await pool.acquire(f"a{i}"))
            lease_us = (time.process_time() - cpu0) / n * 1e6
        figures = (start, wave.cpu / wave.calls * 1e6, lease_us)
        base = base or figures
        rows.append(
            Row(
                _SCENARIO,
                f"shape: {size} slots, 64 trajectories: pool CPU per call",
                figures[1],
                "us",
                baseline="the smallest pool",
                baseline_value=base[1],
                note=f"start {start:.2f} s ({start / base[0]:.1f}x); acquire+release {lease_us:.1f} us "
                f"({lease_us / base[2]:.1f}x); slots {size / sizes[0]:.0f}x",
                extra={"start_s": start, "lease_us": lease_us},
            )
        )
        rows[-1].ratio = figures[1] / base[1]
    return rows


def _judged_if(judge: bool, row: Row, limit: float, target: str) -> Row:
    """`row` judged by `limit` and showing `target` where the target applies (`judge`); else as measured."""
    if not judge:
        return row
    row.target = target
    return judged(row, limit)


async def scale_rows(quick: bool, say: Callable[[str], None]) -> list[Row]:
    rows = await _start_breakdown(say)
    servers, slots = (4, 16) if quick else (8, 32)
    n = servers * slots
    cold, cold_again, _ = await _burst(servers, slots, warm=False, say=say)
    started, _, _ = await _burst(servers, slots, warm=True, say=say, wait=False)
    warm, warm_again, warmed = await _burst(servers, slots, warm=True, say=say)
    say(f"scale: floor, {n} concurrent plain subprocesses")
    floor_wall = await subprocess_floor_concurrent(n, _CALLS, "echo x")
    floor_rate = n * _CALLS / floor_wall
    rows += [
        Row(_SCENARIO, f"cold burst, {n} fresh slots: call p50", cold.p(0.5) * 1000, "ms",
            note=f"p99 {cold.p(0.99) * 1000:.0f} ms, wall {cold.wall:.1f} s ({cold.calls / cold.wall:.0f} calls/s)"),
        _judged_if(n == 64, Row(_SCENARIO, f"no warm slots, {n} fresh slots: slowest first call", max(cold.first),
                                "s", note=f"first-call p99 {cold.first_p(0.99):.2f} s"), 1.5, "<= 1.5 s"),
        judged(Row(_SCENARIO, f"from pool start, {n} fresh slots: first-call p99", started.first_p(0.99), "s",
                   baseline="the same burst, no warm slots", baseline_value=cold.first_p(0.99), target="<= 2 s",
                   note=f"default settings (warm slots on, not waited for); p50 {started.first_p(0.5) * 1000:.0f} ms, "
                        f"wall {started.wall:.1f} s"), 2.0, of_value=True),
        judged(Row(_SCENARIO, f"burst on warm slots, {n} fresh slots: first-call p99", warm.first_p(0.99), "s",
                   baseline="the same burst, no warm slots", baseline_value=cold.first_p(0.99), target="<= 2 s",
                   note=f"p50 {warm.first_p(0.5) * 1000:.0f} ms, wall {warm.wall:.1f} s; warm slots ready "
                        f"{warmed:.1f} s after the pool, waited for"), 2.0, of_value=True),
        judged(Row(_SCENARIO, f"warm throughput, {n} trajectories", warm_again.calls / warm_again.wall, "calls/s",
                   baseline=f"plain bash -c, {n} concurrent", baseline_value=floor_rate, target=">= 0.7x",
                   note=f"p50 {warm_again.p(0.5) * 1000:.0f} ms, p99 {warm_again.p(0.99) * 1000:.0f} ms "
                        f"(p99/p50 {warm_again.p(0.99) / warm_again.p(0.5):.1f}, target < 4)"), 0.7,
               higher_is_better=True),
        judged(Row(_SCENARIO, f"pool CPU per call in this process, {n} trajectories",
                   warm_again.cpu / warm_again.calls * 1e6, "us",
                   note=f"the same pool's first wave {warm.cpu / warm.calls * 1e6:.0f} us; without warm slots "
                        f"{cold.cpu / cold.calls * 1e6:.0f} us first, {cold_again.cpu / cold_again.calls * 1e6:.0f} us "
                        "second", target="<= 100 us"), 100.0),
    ]  # fmt: skip
    rows += await _memory(32 if quick else 64, say)
    rows += await _shape((64, 256) if quick else (64, 256, 1024), say)
    return rows
