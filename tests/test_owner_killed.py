"""The pool's owner process SIGKILLed: its local servers die with it, and what is left (records,
data dirs; a Nomad job) is removed by `atropos-sandbox cleanup` (or by the next pool). Records
naming a reused pid never make us kill an unrelated process."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from atropos.backends.reaping import ServerRecord, load_records, reap_dead_owners
from tests.nomad_fixtures import REPO, NomadTarget, client_for
from tests.server_process import run_server, wait_until_gone

OWNER = """
import asyncio, sys
from atropos.slots import SlotPool, SlotPoolConfig

async def main():
    config = SlotPoolConfig.model_validate({extra})
    pool = SlotPool(config)
    await pool.start()
    slot = await pool.acquire("doomed")
    await pool.execute(slot, "bash", {{"command": "(trap '' TERM; exec sleep {tag}) >/dev/null 2>&1 &"}})
    print("READY", getattr(pool.backend, "workdir", ""), getattr(pool.backend, "job_id", ""), flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest.fixture
def state_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="atropos-state-")
    monkeypatch.setenv("ATROPOS_SANDBOX_STATE_DIR", path)
    yield path
    reap_dead_owners()
    shutil.rmtree(path, ignore_errors=True)


def _kill_owner(extra: dict[str, object], tag: str) -> tuple[str, str]:
    """Start an owner process with a pool, wait until it runs a call, SIGKILL it: (workdir, job id)."""
    code = OWNER.format(extra=repr(extra), tag=tag)
    owner = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert owner.stdout is not None
    line = owner.stdout.readline()
    assert line.startswith("READY"), line
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    owner.stdout.close()
    _, workdir, job_id = [*line.rstrip("\n").split(" "), "", ""][:3]
    return workdir, job_id


def _cleanup(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "atropos.cli", "cleanup", *args],
        cwd=REPO,
        text=True,
        capture_output=True,
        check=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    return done.stdout


def test_local_servers_die_with_their_owner_and_cleanup_removes_the_rest(state_dir: str) -> None:
    tag = f"8{os.getpid() % 100000:05d}"
    workdir, _ = _kill_owner({"slots_per_container": 2, "min_containers": 2, "max_containers": 2}, tag)
    assert os.path.isdir(workdir)
    assert wait_until_gone(workdir, timeout=30) == []  # servers and runners: PDEATHSIG
    assert wait_until_gone(f"sleep {tag}", timeout=30) == []  # the TERM-ignoring command too
    assert len(load_records()) == 2
    dry = _cleanup("--local", "--dry-run")
    assert "would remove" in dry and workdir in dry and os.path.isdir(workdir)
    assert "2 server(s) of dead pools would be removed" in dry, dry
    out = _cleanup("--local")
    assert "2 server(s) of dead pools removed" in out, out
    assert not os.path.exists(workdir) and load_records() == []


def test_reaping_kills_an_escaped_server_but_never_a_reused_pid(state_dir: str, tmp_path: object) -> None:
    data_dir = tempfile.mkdtemp(prefix="atropos-escaped-")
    unrelated = subprocess.Popen(["sleep", "300"])
    try:
        with run_server(data_dir, "--slots", "1") as server:
            # a server whose owner is dead (a pid that does not exist) and that is still running
            escaped = ServerRecord.for_process(
                "local-0", server.proc.pid, data_dir=data_dir, workdir=data_dir, own_workdir=False, container=None
            )
            escaped.owner = {**escaped.owner, "atropos_owner_pid": "999999999"}
            escaped.save()
            # a record whose server pid now belongs to an unrelated process (other start time)
            reused = ServerRecord(
                "local-1", unrelated.pid, 1.0, tempfile.mkdtemp(prefix="atropos-gone-"), "/nonexistent", False, None
            )
            reused.owner = {**reused.owner, "atropos_owner_pid": "999999999"}
            reused.save()
            reaped = {r.server_id: r for r in reap_dead_owners()}
            assert server.proc.pid in reaped["local-0"].pids
            assert server.proc.wait(timeout=30) == -signal.SIGKILL
            assert reaped["local-1"].pids == []
            assert unrelated.poll() is None  # untouched
    finally:
        unrelated.kill()
        unrelated.wait()
    assert load_records() == []


async def test_dead_owner_nomad_job_is_removed_by_cleanup(
    nomad_target: NomadTarget, request: pytest.FixtureRequest
) -> None:
    from tests.test_pool_nomad import pool_config

    address = (
        nomad_target.standin.address
        if nomad_target.standin is not None
        else request.getfixturevalue("real_agent").address
    )
    config = pool_config(nomad_address=address, min_containers=1, max_containers=1).model_dump()
    tag = f"9{os.getpid() % 100000:05d}"
    _, job_id = await asyncio.to_thread(_kill_owner, config, tag)  # the stand-in answers meanwhile
    assert job_id
    env_address = ["--nomad-address", address]
    dry = await asyncio.to_thread(_cleanup, "--nomad", "--dry-run", *env_address)
    assert f"would remove job {job_id}" in dry, dry
    out = await asyncio.to_thread(_cleanup, "--nomad", *env_address)
    assert f"removed job {job_id}" in out, out
    async with client_for(address) as client:
        assert [j.id for j in await client.list_jobs(job_id) if j.status != "dead"] == []
    assert wait_until_gone(job_id, timeout=30) == []  # the allocation's server processes
    assert wait_until_gone(f"sleep {tag}", timeout=30) == []
