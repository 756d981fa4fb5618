"""Scenario 10, SLURM: the time from starting a pool to its first ready server with servers as SLURM
jobs, against the local backend in the same run, and the recovery after `scancel` of a server's job
with a call in flight (until the call fails, and until a replacement job serves)."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

from atropos.backends.slurm import SlurmBackend
from atropos.bench.measure import Row, judged
from atropos.bench.scenarios import pool_config
from atropos.errors import InfrastructureError
from atropos.slots import SlotPool, SlotPoolConfig
from atropos.slurm import run

_SCENARIO = "10 slurm"
_STARTS = 3


def unavailable() -> str | None:
    """Why the scenario cannot run here, or None."""
    if shutil.which("sbatch") is None:
        return "no SLURM client commands on PATH"
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return "no SLURM controller answers (sinfo)"
    return None


def _slurm(pool_dir: str, **kw: object) -> SlotPoolConfig:
    backend = {"type": "slurm", "pool_dir": pool_dir, "host": "127.0.0.1", "job_name": "atropos-bench"}
    return pool_config(backend=backend, slots_per_container=2, health_interval=0.25, **kw)


def _seconds(samples: list[float]) -> str:
    return ", ".join(f"{s:.2f}" for s in samples) + " s"


async def _first_ready(config: SlotPoolConfig) -> float:
    t0 = time.perf_counter()
    async with SlotPool(config):
        return time.perf_counter() - t0


async def slurm_rows(say: Callable[[str], None]) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="atropos-bench-slurm-") as pool_dir:
        local: list[float] = []
        slurm: list[float] = []
        for i in range(_STARTS):  # alternated, so that both see the same machine
            say(f"slurm: first ready server, local then slurm ({i + 1}/{_STARTS})")
            local.append(await _first_ready(pool_config(slots_per_container=2)))
            slurm.append(await _first_ready(_slurm(pool_dir)))
        rows.append(
            judged(
                Row(
                    _SCENARIO,
                    f"pool start to first ready server, sbatch job (median of {_STARTS})",
                    statistics.median(slurm),
                    "s",
                    baseline="the same, local backend",
                    baseline_value=statistics.median(local),
                    target="<= 10x",
                    note=f"slurm {_seconds(slurm)}; local {_seconds(local)}",
                ),
                10.0,
            )
        )
        say("slurm: scancel of a server's job with a call in flight")
        async with SlotPool(_slurm(pool_dir)) as pool:
            backend = pool.backend
            assert isinstance(backend, SlurmBackend)
            slot = await pool.acquire("victim")
            call = asyncio.ensure_future(pool.execute(slot, "bash", {"command": "sleep 60"}, timeout=90))
            await asyncio.sleep(0.5)
            job = backend.job_id(slot.server_id)
            assert job is not None
            t0 = time.perf_counter()
            await run("scancel", job)
            outcome = await asyncio.gather(call, return_exceptions=True)
            failed = time.perf_counter() - t0
            pool.release(slot)
            while pool.stats().servers_lost < 1 or not pool.server_ids():
                if time.perf_counter() - t0 > 120:
                    break
                await asyncio.sleep(0.05)
            async with pool.slot("after", timeout=120) as again:
                await pool.execute(again, "bash", {"command": "true"}, timeout=30)
            back = time.perf_counter() - t0
        typed = isinstance(outcome[0], InfrastructureError)
        rows.append(
            judged(
                Row(
                    _SCENARIO,
                    f"scancel: in-flight call fails ({type(outcome[0]).__name__})",
                    failed,
                    "s",
                    target="<= ~2 s",
                    note="" if typed else f"the call ended in {outcome[0]!r}, not a typed error",
                ),
                2.5,
            )
        )
        rows.append(
            judged(
                Row(
                    _SCENARIO,
                    "scancel: a replacement job serves a call",
                    back,
                    "s",
                    baseline="pool start to first ready server, sbatch job",
                    baseline_value=statistics.median(slurm),
                    target="<= 3x",
                ),
                3.0,
            )
        )
    return rows
