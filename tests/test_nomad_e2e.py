"""End to end through Nomad: job -> raw_exec -> (shell -> apptainer ->) sandbox server -> slot.

Each test runs against the Nomad stand-in and, when one is present, a real Nomad agent
(`nomad_target`, marker `nomad`). The singularity tests use the apptainer stand-in (tests/bin), which
runs the command under bubblewrap with the job's binds; `test_real_apptainer_*` uses a real
apptainer and a real SIF (marker `apptainer`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest

from atropos.nomad import (
    NomadAllocationFailed,
    NomadPlacementFailed,
    NomadRequestError,
    OwnerMeta,
    SandboxJobSpec,
    WaitProgress,
    cleanup_dead_owner_jobs,
    create_sandbox_job,
    deploy_sandbox_job,
    running_endpoints,
    scale_sandbox_job,
    stop_sandbox_job,
    wait_for_allocations,
)
from atropos.nomad.models import RestartPolicy
from tests.nomad_fixtures import (
    TESTS_BIN,
    TOKEN,
    NomadTarget,
    execute,
    free_port_block,
    put_token,
    server_command,
    task_user,
    wait_healthy,
    write_standin_image,
)

PREFIX = "atropos-test-"
NO_RESTART = RestartPolicy(attempts=0)


@pytest.fixture
async def target(nomad_target: NomadTarget) -> AsyncIterator[NomadTarget]:
    """The Nomad under test; every job a test left behind is purged afterwards."""
    yield nomad_target
    for stub in await nomad_target.client.list_jobs(PREFIX):
        await stop_sandbox_job(nomad_target.client, stub.id, purge=True)


def job_spec(driver: str = "process", **values: object) -> SandboxJobSpec:
    defaults: dict[str, object] = {
        "job_id": PREFIX + uuid.uuid4().hex[:8],
        "driver": driver,
        "token": TOKEN,
        "slots_per_container": 2,
        "server_command": server_command(),
        "cpu": 100,
        "memory": 256,
        "kill_timeout": 5,
        "task_user": task_user(),
    }
    if "count" not in values:
        values["count"] = 1
    if driver != "docker" and "base_port" not in values:
        values["base_port"] = free_port_block(max(int(values["count"]), 1) + 2)  # type: ignore[call-overload]
    return SandboxJobSpec(**{**defaults, **values})  # type: ignore[arg-type]


async def read_alloc_file(target: NomadTarget, alloc_id: str, path: str) -> str:
    url = f"{target.client.settings.base_url}/v1/client/fs/cat/{alloc_id}"
    async with httpx.AsyncClient() as http:
        response = await http.get(url, params={"path": path})
        response.raise_for_status()
        return response.text


async def until(predicate_coro, attempts: int = 400) -> None:  # type: ignore[no-untyped-def]
    """Re-check a condition on Nomad's state until it holds (bounded; never a timing assertion)."""
    for _ in range(attempts):
        if await predicate_coro():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition never held")


# ---------------------------------------------------------------------------------------- process


async def test_process_job_serves_commands_on_static_ports(target: NomadTarget) -> None:
    spec = job_spec(count=2)
    submitted = time.monotonic()
    endpoints = await deploy_sandbox_job(target.client, spec, timeout=120)
    first = await wait_healthy(endpoints[0].url)
    print(f"[{target.kind}] submission -> first healthy server: {time.monotonic() - submitted:.2f}s")

    assert [(e.group, e.index, e.port) for e in endpoints] == [
        ("sandbox-0", 0, spec.base_port),
        ("sandbox-1", 1, spec.base_port + 1),
    ]
    assert first["slots"] == 2
    for endpoint in endpoints:
        await wait_healthy(endpoint.url)
        result = await execute(endpoint.url, "echo $((6 * 7)) > answer && cat answer")
        assert result["exit_code"] == 0 and result["output"] == "42\n"
    # the slot's workspace lives in the allocation's data dir
    assert await read_alloc_file(target, endpoints[0].alloc_id, "alloc/data/slots/0/answer") == "42\n"


async def test_server_rejects_requests_without_the_token(target: NomadTarget) -> None:
    spec = job_spec()
    (endpoint,) = await deploy_sandbox_job(target.client, spec, timeout=120)
    await wait_healthy(endpoint.url)
    async with httpx.AsyncClient() as http:
        response = await http.post(
            endpoint.url + "/execute", json={"slot": 0, "tool": "bash", "args": {"command": "id"}}
        )
    assert response.status_code == 401
    assert_token_in_no_command_line()


async def test_scaling_static_groups_keeps_running_servers(target: NomadTarget) -> None:
    client = target.client
    spec = job_spec(count=1)
    (first,) = await deploy_sandbox_job(client, spec, timeout=120)

    spec = await scale_sandbox_job(client, spec, 3)
    endpoints = await wait_for_allocations(client, spec.job_id, 3, timeout=120)
    assert [e.port for e in endpoints] == [spec.base_port, spec.base_port + 1, spec.base_port + 2]
    assert endpoints[0].alloc_id == first.alloc_id  # sandbox-0 was not restarted
    for endpoint in endpoints:
        await wait_healthy(endpoint.url)

    # one group's count is bounded by its scaling policy: never two servers on one static port
    with pytest.raises(NomadRequestError, match="maximum"):
        await client.scale_job(spec.job_id, "sandbox-1", 2)

    spec = await scale_sandbox_job(client, spec, 1)

    async def only_first_left() -> bool:
        return [e.alloc_id for e in await running_endpoints(client, spec.job_id)] == [first.alloc_id]

    await until(only_first_left)
    await until(lambda: _refuses(endpoints[2].url))
    assert (await execute(first.url, "echo still here"))["output"] == "still here\n"


async def _refuses(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2.0) as http:
            await http.get(url + "/health")
    except httpx.ConnectError:
        return True
    return False


async def test_dynamic_ports_scale_with_the_scale_endpoint(target: NomadTarget) -> None:
    client = target.client
    spec = job_spec(count=1, static_ports=False)
    await deploy_sandbox_job(client, spec, timeout=120)
    spec = await scale_sandbox_job(client, spec, 2)
    endpoints = await wait_for_allocations(client, spec.job_id, 2, timeout=120)
    assert {e.group for e in endpoints} == {"sandbox"}
    assert len({e.port for e in endpoints}) == 2
    for endpoint in endpoints:
        await wait_healthy(endpoint.url)


async def test_raw_exec_tasks_see_nomads_environment(target: NomadTarget) -> None:
    """What the stand-in gives a raw_exec task is what Nomad gives it (the same test runs on both)."""
    script = (
        'env > "$NOMAD_ALLOC_DIR/data/env.txt"; cat "$NOMAD_SECRETS_DIR/atropos-token" > '
        '"$NOMAD_ALLOC_DIR/data/token.txt"; echo "${NOMAD_PORT_http}" > "$NOMAD_ALLOC_DIR/data/args.txt"; '
        "exec sleep 600"
    )
    spec = job_spec(count=2, server_command=["/bin/sh", "-c", script, "sh"], kill_timeout=1)
    await put_token(target.client, spec)
    await target.client.register_job(create_sandbox_job(spec))
    endpoints = await wait_for_allocations(target.client, spec.job_id, 2, timeout=120)
    second = endpoints[1]

    async def written() -> bool:
        try:
            return bool(await read_alloc_file(target, second.alloc_id, "alloc/data/args.txt"))
        except httpx.HTTPStatusError:
            return False

    await until(written)
    env = dict(
        line.split("=", 1)
        for line in (await read_alloc_file(target, second.alloc_id, "alloc/data/env.txt")).splitlines()
        if "=" in line
    )
    port = str(spec.base_port + 1)
    assert env["NOMAD_PORT_http"] == env["NOMAD_HOST_PORT_http"] == port
    assert env["NOMAD_ADDR_http"] == f"{env['NOMAD_IP_http']}:{port}"
    assert env["NOMAD_IP_http"] == second.host
    assert env["NOMAD_ALLOC_DIR"].endswith(f"{second.alloc_id}/alloc")
    assert env["NOMAD_TASK_DIR"].endswith(f"{second.alloc_id}/server/local")
    assert (env["NOMAD_ALLOC_ID"], env["NOMAD_ALLOC_INDEX"]) == (second.alloc_id, "0")
    assert env["NOMAD_ALLOC_NAME"] == f"{spec.job_id}.sandbox-1[0]"
    assert (env["NOMAD_JOB_NAME"], env["NOMAD_GROUP_NAME"], env["NOMAD_TASK_NAME"]) == (
        spec.job_id,
        "sandbox-1",
        "server",
    )
    assert env["NOMAD_META_atropos_kind"] == "sandbox"
    # the token is in no variable of the task: a template rendered it from the Nomad Variable
    assert not any(TOKEN in value for value in env.values())
    assert await read_alloc_file(target, second.alloc_id, "alloc/data/token.txt") == TOKEN
    assert env.get("PATH")  # raw_exec inherits the agent's environment (whatever it holds)
    assert await read_alloc_file(target, second.alloc_id, "alloc/data/args.txt") == port + "\n"


# ------------------------------------------------------------------------------------ singularity


async def test_singularity_job_runs_the_server_in_the_container(target: NomadTarget) -> None:
    sif = write_standin_image(os.path.join(target.workdir, "sandbox.sif"))
    # the stand-in apptainer by its path, whatever the agent's PATH holds
    spec = job_spec(
        "singularity", singularity_image=sif, count=2, apptainer_binary=os.path.join(TESTS_BIN, "apptainer")
    )
    submitted = time.monotonic()
    endpoints = await deploy_sandbox_job(target.client, spec, timeout=120)
    health = await wait_healthy(endpoints[0].url)
    print(f"[{target.kind}] singularity: submission -> first healthy server: {time.monotonic() - submitted:.2f}s")
    assert health["slots"] == 2
    for endpoint in endpoints:
        await wait_healthy(endpoint.url)
        result = await execute(endpoint.url, "echo from-$((1+1)) > note && cat note")
        assert result["output"] == "from-2\n"
    # /data inside the container is the allocation's data dir on the host
    assert await read_alloc_file(target, endpoints[1].alloc_id, "alloc/data/slots/0/note") == "from-2\n"
    assert_token_in_no_command_line()


def docker_driver_healthy(target: NomadTarget) -> bool:
    nodes = httpx.get(target.client.settings.base_url + "/v1/nodes", timeout=10).json()
    return any((n.get("Drivers") or {}).get("docker", {}).get("Healthy") for n in nodes)


def assert_token_in_no_command_line() -> None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert TOKEN.encode() not in f.read(), f"the token is in the command line of pid {pid}"
        except OSError:
            continue


async def test_missing_apptainer_is_diagnosed(target: NomadTarget) -> None:
    sif = write_standin_image(os.path.join(target.workdir, "sandbox.sif"))
    spec = job_spec(
        "singularity", singularity_image=sif, apptainer_binary="apptainer-not-installed", restart=NO_RESTART
    )
    with pytest.raises(NomadAllocationFailed) as failure:
        await deploy_sandbox_job(target.client, spec, timeout=120)
    message = str(failure.value)
    assert "exit code 127" in message
    assert "command was not found on the node" in message
    assert "apptainer-not-installed" in message  # the shell's own complaint, from the task's stderr


async def test_missing_sif_is_diagnosed(target: NomadTarget) -> None:
    spec = job_spec("singularity", singularity_image=os.path.join(target.workdir, "absent.sif"), restart=NO_RESTART)
    with pytest.raises(NomadAllocationFailed) as failure:
        await deploy_sandbox_job(target.client, spec, timeout=120)
    assert "absent.sif" in str(failure.value)


# ----------------------------------------------------------------------------- placement problems


async def test_docker_job_without_docker_is_not_placed(target: NomadTarget) -> None:
    if target.real and docker_driver_healthy(target):
        pytest.skip("this agent's node has a healthy docker driver: nothing to show here")
    spec = job_spec("docker")
    with pytest.raises(NomadPlacementFailed) as failure:
        await deploy_sandbox_job(target.client, spec, timeout=120)
    message = str(failure.value)
    assert "task group sandbox not placed" in message
    assert "missing drivers" in message


async def test_port_collision_waits_for_the_port_then_places(target: NomadTarget) -> None:
    """Jobs on one static port: once every address of the node holds it, the next job waits
    (reported, not failed) and is placed as soon as a holder stops. (A node with several addresses,
    like a dev agent's 127.0.0.1 and ::1, holds one such port per address.)"""
    client = target.client
    port = free_port_block(1)
    holders: list[SandboxJobSpec] = []
    collisions: list[str] = []
    stopping: list[asyncio.Future[bool]] = []

    def on_progress(progress: WaitProgress) -> None:
        found = [p for p in progress.problems if "port collision" in p]
        if found and not collisions:
            collisions.extend(found)
            for holder in holders:
                stopping.append(asyncio.ensure_future(stop_sandbox_job(client, holder.job_id)))

    for _ in range(4):
        spec = job_spec(count=1, base_port=port)
        (endpoint,) = await deploy_sandbox_job(client, spec, timeout=120, on_progress=on_progress)
        assert endpoint.port == port
        await wait_healthy(endpoint.url)
        if collisions:
            break
        holders.append(spec)
    await asyncio.gather(*stopping)
    assert collisions, "no collision within 4 jobs on one port"
    assert f"reserved port collision http={port}" in collisions[0]


# ---------------------------------------------------------------------------------------- cleanup


async def test_cleanup_stops_only_jobs_of_dead_owners(target: NomadTarget) -> None:
    client = target.client
    finished = subprocess.Popen(["true"])
    finished.wait()
    me = OwnerMeta.current()
    dead = replace(me, pid=finished.pid)
    elsewhere = replace(me, host=me.host + "-elsewhere", pid=finished.pid)
    specs = {
        name: job_spec(count=0, owner=owner)
        for name, owner in (("dead", dead), ("alive", me), ("elsewhere", elsewhere), ("manual", None))
    }
    for spec in specs.values():
        await put_token(client, spec)
        await client.register_job(create_sandbox_job(spec))

    stopped = await cleanup_dead_owner_jobs(client, PREFIX)

    assert stopped == [specs["dead"].job_id]
    remaining = {stub.id for stub in await client.list_jobs(PREFIX)}
    assert remaining == {specs[n].job_id for n in ("alive", "elsewhere", "manual")}


# --------------------------------------------------------------------------------- real apptainer


@pytest.mark.apptainer
async def test_real_apptainer_singularity_job(target: NomadTarget) -> None:
    """With a real apptainer on the agent's PATH and a real image (ATROPOS_TEST_SIF)."""
    sif = os.environ.get("ATROPOS_TEST_SIF")
    real = shutil.which(
        "apptainer", path=os.environ.get("PATH", "").replace(os.path.join(os.path.dirname(__file__), "bin"), "")
    )
    if not real or not sif:
        pytest.skip("no real apptainer on PATH or no ATROPOS_TEST_SIF image to run")
    spec = job_spec(
        "singularity",
        singularity_image=sif,
        apptainer_binary=real,
        server_command=["atropos-sandbox", "server"],
        task_user="nobody",
    )
    endpoints = await deploy_sandbox_job(target.client, spec, timeout=300)
    await wait_healthy(endpoints[0].url)
    assert (await execute(endpoints[0].url, "echo ok"))["output"] == "ok\n"
