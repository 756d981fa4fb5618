"""SlotPool on the Nomad backend: the stand-in always, a real agent when one is present."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from atropos.errors import BackendError
from atropos.slots import SlotPool, SlotPoolConfig
from tests.fs_attacks import attack_through_pool, leaked
from tests.nomad_fixtures import (
    TESTS_BIN,
    NomadTarget,
    free_port_block,
    nomad_backend,
    task_user,
    write_standin_image,
)
from tests.nomad_standin import NomadStandIn
from tests.server_process import wait_until_gone


def pool_config(**kw: object) -> SlotPoolConfig:
    backend = {
        "type": "nomad",
        "static_port_base": free_port_block(4),
        "cpu": 100,
        "memory": 256,
        "job_id": f"atropos-test-{os.getpid()}",
    }
    base: dict[str, object] = {
        "backend": backend,
        "driver": "process",
        "slots_per_container": 2,
        "min_containers": 1,
        "max_containers": 2,
        "scale_cooldown": 0.0,
        "idle_scale_down": 0.5,
        "health_interval": 0.25,
        "start_timeout": 120,
        "run_as": task_user(),
    }
    for key in [k for k in kw if k in ("static_port_base", "job_id", "cpu", "memory", "nomad_address")]:
        backend[key.removeprefix("nomad_")] = kw.pop(key)
    base.update(kw)
    return SlotPoolConfig.model_validate(base)


async def _job_status(target: NomadTarget, job_id: str) -> str | None:
    jobs = await target.client.list_jobs(job_id)
    return next((j.status for j in jobs if j.id == job_id), None)


@pytest.mark.parametrize("driver", ["process", "singularity"])
async def test_pool_runs_scales_and_cleans_up(nomad_target: NomadTarget, driver: str) -> None:
    extra: dict[str, object] = {"driver": driver}
    if driver == "singularity":
        extra["driver"] = {
            "type": "singularity",
            "image": write_standin_image(os.path.join(nomad_target.workdir, "sandbox.sif")),
            "apptainer_binary": os.path.join(TESTS_BIN, "apptainer"),
        }  # whatever the agent's PATH holds
    config = pool_config(**extra)
    backend = nomad_backend(config, nomad_target.client)
    messages: list[str] = []
    t0 = time.monotonic()
    async with SlotPool(config, backend=backend, progress=messages.append) as pool:
        first_ready = time.monotonic() - t0
        print(f"[{nomad_target.kind}/{driver}] job submission to first healthy server: {first_ready:.2f}s")
        assert any("submitting nomad job" in m for m in messages)
        assert pool.stats().servers == 1
        a = await pool.acquire("a")
        res = await pool.execute(a, "bash", {"command": "echo $HOME; pwd"})
        assert res.ok and res.stdout.strip().endswith("/workspace"), res
        b = await pool.acquire("b")
        c = await pool.acquire("c", timeout=120)  # 2 slots taken: the pool scales the job up
        assert pool.stats().servers == 2 and pool.stats().scale_ups == 1
        assert (await pool.execute(c, "bash", {"command": "echo scaled"})).stdout == "scaled\n"
        for s in (a, b, c):
            pool.release(s)
        deadline = time.monotonic() + 60
        while pool.stats().servers > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert pool.stats().servers == 1 and pool.stats().scale_downs == 1
        d = await pool.acquire("d", timeout=30)  # the survivor still serves
        assert (await pool.execute(d, "bash", {"command": "echo alive"})).stdout == "alive\n"
        job_id = backend.job_id
    assert await _job_status(nomad_target, job_id) in (None, "dead")  # purged (or stopped)
    if not nomad_target.real:
        assert wait_until_gone(job_id) == []


async def test_nomad_500_and_hangs_while_scaling(nomad_standin: NomadStandIn) -> None:
    from tests.nomad_fixtures import client_for

    config = pool_config(max_containers=3)
    client = client_for(nomad_standin.address)
    backend = nomad_backend(config, client)
    async with SlotPool(config, backend=backend) as pool:
        held = [await pool.acquire(f"h{i}") for i in range(2)]
        # the first scale-up request fails twice with 500 (retried), then hangs once (retried)
        nomad_standin.faults.fail("POST", r"^/v1/job/[^/]+$", status=500, times=2)
        nomad_standin.faults.hang("POST", r"^/v1/job/[^/]+$", seconds=30, times=1)
        extra = await pool.acquire("extra", timeout=120)
        assert (await pool.execute(extra, "bash", {"command": "echo ok"})).stdout == "ok\n"
        # held slots never noticed
        for s in held:
            assert (await pool.execute(s, "bash", {"command": "echo fine"})).ok
        fill = await pool.acquire("fill", timeout=5)  # the last free slot of the two servers
        # now Nomad answers 500 to everything for good: scale-up fails clearly, the pool goes on
        nomad_standin.faults.fail("POST", r"^/v1/job/[^/]+$", status=500, times=None)
        with pytest.raises(Exception, match="no slot became free"):
            await pool.acquire("never", timeout=3)
        assert any("Nomad" in k or "Backend" in k for k in pool.stats().errors), pool.stats().errors
        nomad_standin.faults.rules.clear()
        assert (await pool.execute(fill, "bash", {"command": "echo still"})).stdout == "still\n"
        for s in [*held, extra, fill]:
            pool.release(s)


async def test_dead_owner_jobs_are_cleaned_up(nomad_standin: NomadStandIn) -> None:
    from tests.nomad_fixtures import client_for

    config = pool_config()
    first = nomad_backend(config, client_for(nomad_standin.address))
    pool = SlotPool(config, backend=first)
    await pool.start()
    orphan = first.job_id
    # simulate the owner dying: rewrite the job's owner to a pid that does not exist on this host
    job = await first.client.read_job(orphan)
    job["Meta"]["atropos_owner_pid"] = "999999999"
    await first.client.register_job(job)
    second = nomad_backend(config, client_for(nomad_standin.address))
    async with SlotPool(config, backend=second, progress=print):
        status = await _job_status_standin(nomad_standin, orphan)
        assert status in (None, "dead")
    await pool.close()


async def _job_status_standin(nomad: NomadStandIn, job_id: str) -> str | None:
    from tests.nomad_fixtures import client_for

    async with client_for(nomad.address) as client:
        jobs = await client.list_jobs(job_id)
    return next((j.status for j in jobs if j.id == job_id), None)


@pytest.mark.parametrize("sig", ["SIGSTOP", "SIGKILL"])
async def test_lost_server_is_replaced_by_nomad(nomad_target: NomadTarget, sig: str) -> None:
    import signal
    from urllib.parse import urlparse

    from atropos.slots import SlotLost
    from tests.server_process import pids_with_arg

    config = pool_config(min_containers=2, max_containers=2)
    backend = nomad_backend(config, nomad_target.client)
    async with SlotPool(config, backend=backend) as pool:
        slots = [await pool.acquire(f"t{i}") for i in range(4)]
        victim = slots[0].server_id
        port = urlparse(pool.server_of(slots[0]).url).port
        pids = pids_with_arg(f"--port {port} ")
        assert pids, f"no server process for port {port}"
        doomed = [s for s in slots if s.server_id == victim]
        calls = [asyncio.ensure_future(pool.execute(s, "bash", {"command": "sleep 30"}, timeout=60)) for s in doomed]
        await asyncio.sleep(0.3)
        for pid in pids:
            os.kill(pid, getattr(signal, sig))
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, SlotLost) for r in results), results
        deadline = time.monotonic() + 90
        while (pool.stats().servers_lost < 1 or pool.stats().servers < 2) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert pool.stats().servers == 2, pool.stats()
        assert victim not in pool.server_ids()
        fresh = await pool.acquire("after", timeout=30)
        assert (await pool.execute(fresh, "bash", {"command": "echo back"})).stdout == "back\n"
        for s in slots:
            pool.release(s)


async def test_a_pool_whose_start_fails_leaves_no_job_behind(nomad_standin: NomadStandIn) -> None:
    """Nothing here can run a docker job, so placement fails: the pool removes what it submitted
    (the job and its token Variable) before it raises, and says so."""
    from tests.nomad_fixtures import client_for

    config = pool_config(driver={"type": "docker", "image": "atropos-sandbox:none"}, start_timeout=30)
    backend = nomad_backend(config, client_for(nomad_standin.address))
    said: list[str] = []
    with pytest.raises(BackendError):
        await SlotPool(config, backend=backend, progress=said.append).start()
    assert await _job_status_standin(nomad_standin, backend.job_id) is None
    assert not [p for p in nomad_standin.cluster.variables if backend.job_id in p]
    assert any("removing what it started" in line for line in said), said


@pytest.mark.nomad
@pytest.mark.parametrize("driver", ["docker", "singularity"])
async def test_a_slot_finds_nothing_of_the_node_on_a_real_nomad(nomad_target: NomadTarget, driver: str) -> None:
    """By hand, against a real agent (as root) with the docker plugin (nomad/nomad-docker.hcl)
    or a real apptainer and ATROPOS_TEST_SIF: the images' root, attacked from a slot."""
    if nomad_target.kind != "real":
        pytest.skip("the images' own root needs a real agent and a real image")
    if driver == "docker":
        image = os.environ.get("ATROPOS_TEST_DOCKER_IMAGE", "atropos-sandbox:latest")
        address = os.environ.get("NOMAD_ADDR", "")
        nodes = httpx.get(address + "/v1/nodes", timeout=5).json() if address else []
        if not any((n.get("Drivers") or {}).get("docker", {}).get("Healthy") for n in nodes):
            pytest.skip("needs NOMAD_ADDR naming an agent with a healthy docker driver (nomad/nomad-docker.hcl)")
        spec: dict[str, object] = {"type": "docker", "image": image}
        seen_as = "/alloc/data"
    else:
        from tests.images_fixtures import real_apptainer

        runtime, sif = real_apptainer(), os.environ.get("ATROPOS_TEST_SIF")
        if runtime is None or not sif:
            pytest.skip("needs a real apptainer on the agent's PATH and ATROPOS_TEST_SIF")
        spec = {"type": "singularity", "image": sif, "apptainer_binary": runtime.binary}
        seen_as = "/data"
    config = pool_config(driver=spec, max_containers=1, run_as="nobody")
    async with SlotPool(config, backend=nomad_backend(config, nomad_target.client)) as pool:
        found, out = await attack_through_pool(pool, [], seen_as=seen_as)
        slot = await pool.acquire("look")
        health = await pool.server_health(slot)
    assert health["root"] == "image" and health["isolation"] == "bwrap", health
    assert leaked(out) == [], out
    assert found.guessed_paths()


@contextmanager
def silenced(port: int) -> Iterator[None]:
    """Everything sent to the stand-in node's `port` is dropped: no answer, no refusal, as from a
    node whose link went down (loopback only: the stand-in node's address)."""
    rule = ["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP"]
    subprocess.run(["iptables", "-I", *rule], check=True)
    try:
        yield
    finally:
        subprocess.run(["iptables", "-D", *rule], check=True)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("iptables") is None, reason="needs root and iptables to silence a port"
)
async def test_a_server_lost_with_its_node_is_replaced_away_from_it(nomad_standin: NomadStandIn) -> None:
    """Nothing the pool had on the node answers any more, not even with a refusal (its one server's
    port silenced; Nomad still calls the node ready). The replacement carries a constraint away from
    that node, so on the stand-in's single node it cannot be placed and the pool says so; once Nomad
    has marked the node down and seen it back, the constraint goes and capacity returns."""
    from urllib.parse import urlparse

    from tests.nomad_fixtures import client_for

    cluster = nomad_standin.cluster
    config = pool_config(min_containers=1, max_containers=1, health_timeout=1.0)
    client = client_for(nomad_standin.address)
    backend = nomad_backend(config, client)
    said: list[str] = []
    async with SlotPool(config, backend=backend, progress=said.append) as pool:
        slot = await pool.acquire("t")
        port = urlparse(pool.server_of(slot).url).port
        assert port is not None
        with silenced(port):
            deadline = time.monotonic() + 30
            while pool.stats().replace_error is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        stats = pool.stats()
        assert stats.servers_lost == 1 and stats.servers == 0, stats
        avoiding = [line for line in said if "was lost with its node standin-node" in line]
        assert avoiding and "replacements avoid standin-node" in avoiding[0], said
        job = await client.read_job(backend.job_id)
        away = {"LTarget": "${node.unique.id}", "Operand": "!=", "RTarget": cluster.node_id}
        assert [{k: c[k] for k in away} for c in job.get("Constraints") or []] == [away], job.get("Constraints")
        # a new group: its allocation replaces nothing, so it does not wait for Nomad to give up the lost one
        assert [g["Name"] for g in job["TaskGroups"]] == ["sandbox-0-r1"]
        assert stats.replace_error is not None and "node.unique.id" in stats.replace_error, stats.replace_error
        assert any("running short" in line for line in said), said

        cluster.set_node_status("down")
        cluster.set_node_status("ready")
        deadline = time.monotonic() + 60
        while pool.stats().servers < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert pool.stats().servers == 1, (pool.stats(), said)
        assert any("node standin-node is ready again: servers may be placed there again" in line for line in said)
        assert not (await client.read_job(backend.job_id)).get("Constraints")
        fresh = await pool.acquire("after", timeout=30)
        assert (await pool.execute(fresh, "bash", {"command": "echo back"})).stdout == "back\n"
    await client.aclose()


async def test_a_hung_server_alone_on_its_node_is_no_lost_node(nomad_standin: NomadStandIn) -> None:
    """A frozen server still has its connections accepted by its node's kernel: the node is alive, so
    the replacement goes anywhere (here: the same node) and no constraint is added."""
    import signal
    from urllib.parse import urlparse

    from tests.nomad_fixtures import client_for
    from tests.server_process import pids_with_arg

    config = pool_config(min_containers=1, max_containers=1, health_timeout=1.0)
    client = client_for(nomad_standin.address)
    backend = nomad_backend(config, client)
    said: list[str] = []
    async with SlotPool(config, backend=backend, progress=said.append) as pool:
        slot = await pool.acquire("t")
        pids = pids_with_arg(f"--port {urlparse(pool.server_of(slot).url).port} ")
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while (pool.stats().servers_lost < 1 or pool.stats().servers < 1) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert pool.stats().servers == 1 and pool.stats().servers_lost == 1, (pool.stats(), said)
        assert not [line for line in said if "lost with its node" in line], said
        assert not (await client.read_job(backend.job_id)).get("Constraints")
    await client.aclose()
