"""The pool on a real SLURM (marker `slurm`; `.ci/run` starts a one-node cluster): servers are SLURM
jobs found through a shared pool directory, a cancelled job is a lost server that is replaced, and
closing the pool cancels every job."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from atropos.backends.slurm import SlurmBackendConfig
from atropos.errors import InfrastructureError
from atropos.slots import SlotPool, SlotPoolConfig
from atropos.slurm import queue


def _slurm_reason() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        return "no SLURM client commands (sbatch, squeue) on PATH"
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return f"no SLURM controller answers: {done.stderr.strip()[:200]}"
    return None


REASON = _slurm_reason()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(REASON is not None and not os.environ.get("ATROPOS_REQUIRE_SLURM"), reason=str(REASON)),
]


def slurm_config(tmp_path: Path, **kw: object) -> SlotPoolConfig:
    backend = {"type": "slurm", "pool_dir": str(tmp_path), "host": "127.0.0.1", "job_name": f"atropos-t{os.getpid()}"}
    base: dict[str, object] = {"backend": backend, "slots_per_container": 2, "min_containers": 1,
                               "max_containers": 2, "health_interval": 0.25, "start_timeout": 120}  # fmt: skip
    return SlotPoolConfig.model_validate({**base, **kw})


async def _jobs_of(name: str) -> list[str]:
    done = subprocess.run(
        ["squeue", "-h", "--me", "-t", "pending,running", "-n", name, "-o", "%i"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.split()


async def test_the_pool_runs_on_slurm_replaces_a_cancelled_job_and_cancels_all_at_close(tmp_path: Path) -> None:
    assert REASON is None, REASON
    config = slurm_config(tmp_path)
    said: list[str] = []
    async with SlotPool(config, progress=said.append) as pool:
        assert any("submitted 1 slurm job(s)" in line for line in said), said
        async with pool.slot("t1") as slot:
            r = await pool.execute(slot, "bash", {"command": "echo hi from $SLURM_JOB_ID; id -u"})
            assert r.ok and r.stdout.startswith("hi from"), r
        assert isinstance(config.backend, SlurmBackendConfig)
        name = config.backend.job_name
        (job,) = await _jobs_of(name)
        async with pool.slot("t2") as slot:
            subprocess.run(["scancel", job], check=True)
            # SLURM signals every process of the job: the call ends as a sandbox failure, never a result
            with pytest.raises(InfrastructureError):
                await pool.execute(slot, "bash", {"command": "sleep 30"}, timeout=60)
        for _ in range(600):  # the pool sees the job leave the queue, and a replacement job start
            if pool.stats().servers_lost == 1 and pool.server_ids() == ["slurm-2"]:
                break
            await asyncio.sleep(0.1)
        assert pool.server_ids() == ["slurm-2"], (pool.stats(), said[-5:])
        async with pool.slot("t3", timeout=120) as slot:  # the replacement job
            r = await pool.execute(slot, "bash", {"command": "echo back"})
            assert r.ok and r.stdout == "back\n", r
        jobs = await _jobs_of(name)
        assert len(jobs) == 1 and jobs[0] != job
    assert await _jobs_of(name) == [] and not list(tmp_path.iterdir())  # nothing left: no job, no directory
    assert all(state not in ("RUNNING", "PENDING") for state, *_ in (await queue([job])).values())


def test_the_demo_runs_on_slurm(tmp_path: Path) -> None:
    """The main job, its servers SLURM jobs (reached at the node's NodeAddr)."""
    assert REASON is None, REASON
    env = {**os.environ, "HOME": str(tmp_path)}  # the default pool dir: ~/.cache/atropos-sandbox/slurm
    done = subprocess.run(
        [sys.executable, "-m", "atropos.cli", "demo", "--backend", "slurm", "--tasks", "4", "--containers", "1",
         "--max-containers", "1", "--slots-per-container", "2", "--out", str(tmp_path / "r.jsonl")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "slurm backend" in done.stdout and "reward mean       1.000" in done.stdout, done.stdout
    assert not list((tmp_path / ".cache" / "atropos-sandbox" / "slurm").iterdir())  # closed: nothing left


def test_cleanup_cancels_the_jobs_of_a_dead_pool(tmp_path: Path) -> None:
    assert REASON is None, REASON
    name = f"atropos-dead{os.getpid()}"
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER.format(pool_dir=str(tmp_path), name=name)], stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
    owner.kill()  # dies without closing its pool
    owner.wait()
    (job,) = _running(name)
    dry = _cleanup("--slurm", "--slurm-job-name", name, "--dry-run")
    assert f"would cancel job {job}" in dry and _running(name) == [job], dry
    done = _cleanup("--slurm", "--slurm-job-name", name)
    assert f"cancelled job {job}" in done and "1 job(s) of dead pools cancelled" in done, done
    assert _running(name) == []


OWNER = """
import asyncio
from atropos.slots import SlotPool, SlotPoolConfig
async def main():
    config = SlotPoolConfig.model_validate({{"backend": {{"type": "slurm", "pool_dir": {pool_dir!r},
        "host": "127.0.0.1", "job_name": {name!r}}}, "slots_per_container": 1, "min_containers": 1,
        "max_containers": 1}})
    pool = SlotPool(config)
    await pool.start()
    print("ready", flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def _running(name: str) -> list[str]:
    done = subprocess.run(["squeue", "-h", "--me", "-t", "pending,running", "-n", name, "-o", "%i"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    return done.stdout.split()


def _cleanup(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "atropos.cli", "cleanup", *args], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout
