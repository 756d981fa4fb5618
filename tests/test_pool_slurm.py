"""The pool on a real SLURM (marker `slurm`; `.ci/run` starts a one-node cluster): servers are SLURM
jobs found through a shared pool directory; a cancelled job, or one killed at its time limit, is a
lost server that is replaced with no call lost or duplicated; a job near its time limit retires
first; pending reasons are shown, hopeless ones fail at once; scaling submits and cancels jobs;
closing the pool cancels every job, and cleanup those of a dead pool."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from atropos.backends.slurm import SlurmBackendConfig
from atropos.errors import BackendError, InfrastructureError
from atropos.sandbox.settings import READY_PREFIX
from atropos.slots import SlotPool, SlotPoolConfig
from atropos.slurm import queue
from tests.faults import assert_exactly_once, calls_during, wait_for
from tests.fs_attacks import attack_through_pool, leaked


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
    base: dict[str, object] = {"backend": _backend(tmp_path), "slots_per_container": 2, "min_containers": 1,
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
    both = _cleanup("--local", "--slurm", "--slurm-job-name", name, "--dry-run")  # one does not hide the other
    assert "local: " in both and f"slurm: would cancel job {job}" in both, both
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


async def test_a_job_asking_more_than_any_node_has_fails_at_once_with_slurms_reason(tmp_path: Path) -> None:
    assert REASON is None, REASON
    config = slurm_config(tmp_path, backend={**_backend(tmp_path), "cpus_per_server": 64})
    said: list[str] = []
    with pytest.raises(BackendError) as failed:
        async with SlotPool(config, progress=said.append):
            pass
    text = str(failed.value)
    # SLURM's reason, and what it means, instead of waiting out start_timeout=120
    assert "(PartitionConfig)" in text and "it will not start" in text and "cpus_per_server" in text, text
    assert "within start_timeout" not in text
    assert await _jobs_of(_backend(tmp_path)["job_name"]) == []  # the pending job was cancelled


async def test_a_pending_job_shows_slurms_reason_while_the_pool_waits(tmp_path: Path) -> None:
    assert REASON is None, REASON
    backend = {**_backend(tmp_path), "sbatch_args": ["--begin=now+3600"]}
    config = slurm_config(tmp_path, backend=backend, start_timeout=4)
    said: list[str] = []
    with pytest.raises(BackendError) as failed:
        async with SlotPool(config, progress=said.append):
            pass
    assert any(line.endswith(": pending (BeginTime)") for line in said), said
    # the error says what it waited for, not only that it timed out
    assert "start_timeout=4" in str(failed.value) and "pending (BeginTime)" in str(failed.value), failed.value
    assert await _jobs_of(_backend(tmp_path)["job_name"]) == []


async def test_the_pool_scales_up_and_down_by_submitting_and_cancelling_jobs(tmp_path: Path) -> None:
    assert REASON is None, REASON
    config = slurm_config(tmp_path, slots_per_container=1, idle_scale_down=0.5, scale_cooldown=0)
    name = _backend(tmp_path)["job_name"]
    async with SlotPool(config) as pool:
        assert len(await _jobs_of(name)) == 1
        first = await pool.acquire("a")
        second = await pool.acquire("b", timeout=120)  # waits: the pool submits a second job
        assert pool.stats().scale_ups == 1 and len(await _jobs_of(name)) == 2
        for slot in (first, second):
            r = await pool.execute(slot, "bash", {"command": "echo $SLURM_JOB_ID"}, timeout=10)
            assert r.ok, r
        pool.release(first)
        pool.release(second)
        assert await wait_for(lambda: pool.stats().scale_downs == 1 and pool.stats().servers == 1)
        assert await _wait_jobs(name, 1)  # the idle server's job was cancelled
    assert await _jobs_of(name) == []


async def test_sbatch_variables_are_honoured_and_the_pool_learns_the_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert REASON is None, REASON
    monkeypatch.setenv("SBATCH_TIMELIMIT", "7")  # minutes; no time_limit in the config
    async with SlotPool(slurm_config(tmp_path)) as pool:
        (job,) = await _jobs_of(_backend(tmp_path)["job_name"])
        limit = subprocess.run(["squeue", "-h", "-j", job, "-o", "%l"], capture_output=True, text=True, check=True)
        assert limit.stdout.strip() == "7:00", limit.stdout
        async with pool.slot("t") as slot:
            assert await wait_for(lambda: pool.time_left(slot) is not None)
            left = pool.time_left(slot)
            assert left is not None and 300 < left <= 420, left


async def test_a_job_near_its_time_limit_is_retired_and_no_call_is_lost(tmp_path: Path) -> None:
    """A 1-minute job retires at half its time (retire_before=50 is more than that): the replacement
    job starts, the old one is cancelled once its slots came back, before SLURM's limit."""
    assert REASON is None, REASON
    backend = {**_backend(tmp_path), "time_limit": "1"}
    said: list[str] = []
    config = slurm_config(tmp_path, backend=backend, retire_before=50, max_containers=1)
    async with SlotPool(config, progress=said.append) as pool:
        (job,) = await _jobs_of(backend["job_name"])

        async def retirement() -> None:
            assert await wait_for(lambda: pool.server_ids() == ["slurm-2"], attempts=1200)
            await asyncio.sleep(1.0)  # calls on the replacement too

        report, wrong = await calls_during(pool, retirement(), trajectories=2, call_timeout=5.0)
        assert_exactly_once(report, wrong)
        assert "SlotLost" not in report.errors and "SlotFailed" not in report.errors, report
        stats = pool.stats()
        assert stats.servers_retired == 1 and stats.servers_lost == 0, (stats, said[-6:])
        assert (await queue([job])).get(job, None) is None or (await queue([job]))[job].state != "TIMEOUT"


@pytest.mark.timeout(300)  # SLURM's own pace: the limit (60 s) + up to 30 s before slurmctld looks + a new job
async def test_a_job_killed_by_its_time_limit_is_replaced_and_its_calls_end_typed(tmp_path: Path) -> None:
    """Retirement off: SLURM ends the job at its limit (between 60 and ~90 s: slurmctld looks every
    30 s); the calls in flight end in the pool's typed errors, none lost or twice, and it is replaced."""
    assert REASON is None, REASON
    backend = {**_backend(tmp_path), "time_limit": "1"}
    config = slurm_config(tmp_path, backend=backend, retire_before=0, max_containers=1)
    async with SlotPool(config) as pool:

        async def time_limit() -> None:
            assert await wait_for(lambda: pool.stats().servers_lost == 1, attempts=1500)
            assert await wait_for(lambda: pool.server_ids() == ["slurm-2"], attempts=1200)
            await asyncio.sleep(1.0)

        report, wrong = await calls_during(pool, time_limit(), trajectories=2, deadline=200)
        assert_exactly_once(report, wrong)
        assert report.errors, report  # the calls in flight at the limit ended in typed errors
        assert pool.stats().servers_retired == 0


async def test_a_cancelled_job_loses_no_call_and_duplicates_none(tmp_path: Path) -> None:
    assert REASON is None, REASON
    config = slurm_config(tmp_path, max_containers=1)
    async with SlotPool(config) as pool:
        (job,) = await _jobs_of(_backend(tmp_path)["job_name"])

        async def cancel() -> None:
            await asyncio.sleep(2.0)
            subprocess.run(["scancel", job], check=True)
            assert await wait_for(lambda: pool.server_ids() == ["slurm-2"], attempts=1200)
            await asyncio.sleep(1.0)

        report, wrong = await calls_during(pool, cancel(), trajectories=2)
        assert_exactly_once(report, wrong)
        assert pool.stats().servers_lost == 1


async def test_a_slot_finds_nothing_of_the_node_on_slurm(tmp_path: Path) -> None:
    async with SlotPool(slurm_config(tmp_path, max_containers=1)) as pool:
        found, out = await attack_through_pool(pool, [str(tmp_path)])
    assert found.sentinels and leaked(out) == [], out


@pytest.mark.apptainer
async def test_a_slot_finds_nothing_of_the_node_on_slurm_in_apptainer(tmp_path: Path) -> None:
    """By hand, as a normal user (the HPC deployment): a real apptainer and ATROPOS_TEST_SIF."""
    from tests.images_fixtures import real_apptainer

    runtime, sif = real_apptainer(), os.environ.get("ATROPOS_TEST_SIF")
    if runtime is None or not sif or not os.path.exists(sif):
        pytest.skip("needs a real apptainer on PATH and ATROPOS_TEST_SIF naming a SIF of the project's image")
    driver = {"type": "singularity", "image": sif, "apptainer_binary": runtime.binary}
    async with SlotPool(slurm_config(tmp_path, max_containers=1, driver=driver)) as pool:
        _found, out = await attack_through_pool(pool, [str(tmp_path)], seen_as="/data")
        slot = await pool.acquire("look")
        health = await pool.server_health(slot)
    assert health["root"] == "image" and health["isolation"] == "bwrap", health
    assert leaked(out) == [], out


def test_a_rendered_batch_script_runs_by_hand(tmp_path: Path) -> None:
    """What `job render --backend slurm` prints is a job that runs: submitted as its comments say."""
    assert REASON is None, REASON
    name = f"atropos-render{os.getpid()}"
    done = subprocess.run(
        [sys.executable, "-m", "atropos.cli", "job", "render", "--backend", "slurm", "--driver", "process",
         "--pool-dir", str(tmp_path), "--host", "127.0.0.1", "--slurm-job-name", name, "--slots", "1"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    job_dir = tmp_path / "slurm-1"
    (job_dir / "data").mkdir(parents=True)
    (job_dir / "token").write_text("render-test-token\n")
    (job_dir / "token").chmod(0o600)
    (job_dir / "job.sh").write_text(done.stdout)
    (sbatch,) = [line.removeprefix("#   ") for line in done.stdout.splitlines() if line.startswith("#   sbatch ")]
    job = subprocess.run(shlex.split(sbatch), capture_output=True, text=True, check=True).stdout.strip()
    try:
        url = ""
        for _ in range(600):
            out = (job_dir / "server.out").read_text() if (job_dir / "server.out").exists() else ""
            url = next((line.split()[1] for line in out.splitlines() if line.startswith(READY_PREFIX)), "")
            if url:
                break
            time.sleep(0.1)
        assert url, out
        request = urllib.request.Request(f"{url}/status", headers={"Authorization": "Bearer render-test-token"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
    finally:
        subprocess.run(["scancel", job], check=False)


def _backend(tmp_path: Path) -> dict[str, str]:
    return {"type": "slurm", "pool_dir": str(tmp_path), "host": "127.0.0.1", "job_name": f"atropos-t{os.getpid()}"}


async def _wait_jobs(name: str, count: int) -> bool:
    for _ in range(300):
        if len(await _jobs_of(name)) == count:
            return True
        await asyncio.sleep(0.1)
    return False
