"""The Nomad client against the stand-in's faults: retries on 5xx and connection trouble, never on
4xx; errors that name the endpoint and carry Nomad's message; fail-fast diagnosis while waiting."""

from __future__ import annotations

import asyncio
import socket

import pytest

from atropos.nomad import (
    NomadAllocationFailed,
    NomadConnectionError,
    NomadNotFound,
    NomadPlacementFailed,
    NomadRequestError,
    NomadServerError,
    NomadWaitTimeout,
    SandboxJobSpec,
    create_sandbox_job,
    deploy_sandbox_job,
    wait_for_allocations,
)
from atropos.nomad.models import RestartPolicy
from tests.nomad_fixtures import TOKEN, agent_env, client_for, free_port_block, put_token, server_command, task_user
from tests.nomad_standin import NomadStandIn


def spec(job_id: str, **values: object) -> SandboxJobSpec:
    base: dict[str, object] = {
        "job_id": job_id,
        "token": TOKEN,
        "server_command": server_command(),
        "slots_per_container": 1,
        "base_port": free_port_block(2),
        "restart": RestartPolicy(attempts=0),
        "task_user": task_user(),
    }
    return SandboxJobSpec(**{**base, **values})  # type: ignore[arg-type]


def calls(nomad: NomadStandIn, method: str, path: str) -> int:
    return sum(1 for m, p in nomad.requests if m == method and p.split("?")[0] == path)


async def test_5xx_is_retried_until_nomad_answers(nomad_standin: NomadStandIn) -> None:
    nomad_standin.faults.fail("POST", r"^/v1/job/retry$", status=500, message="rpc error: no cluster leader", times=2)
    async with client_for(nomad_standin.address) as client:
        response = await client.register_job(create_sandbox_job(spec("retry")))
    assert response.eval_id
    assert calls(nomad_standin, "POST", "/v1/job/retry") == 3


async def test_persistent_5xx_names_the_endpoint_and_nomads_message(nomad_standin: NomadStandIn) -> None:
    nomad_standin.faults.fail(
        "GET", r"^/v1/job/broken$", status=500, message="rpc error: no cluster leader", times=None
    )
    async with client_for(nomad_standin.address, attempts=3) as client:
        with pytest.raises(NomadServerError) as failure:
            await client.read_job("broken")
    assert str(failure.value) == "GET /v1/job/broken: rpc error: no cluster leader (HTTP 500)"
    assert calls(nomad_standin, "GET", "/v1/job/broken") == 3


async def test_4xx_is_never_retried(nomad_standin: NomadStandIn) -> None:
    async with client_for(nomad_standin.address) as client:
        with pytest.raises(NomadNotFound, match="GET /v1/job/absent: job not found"):
            await client.read_job("absent")
        submitted = spec("static", count=0)
        await put_token(client, submitted)
        await client.register_job(create_sandbox_job(submitted))
        with pytest.raises(NomadRequestError, match="does not exist in job"):
            await client.scale_job("static", "no-such-group", 1)
    assert calls(nomad_standin, "GET", "/v1/job/absent") == 1
    assert calls(nomad_standin, "POST", "/v1/job/static/scale") == 1


async def test_a_hanging_nomad_is_retried_then_reported(nomad_standin: NomadStandIn) -> None:
    nomad_standin.faults.hang("GET", r"^/v1/job/slow$", times=1)
    nomad_standin.faults.hang("GET", r"^/v1/job/stuck$", times=None)
    async with client_for(nomad_standin.address, timeout=0.3, attempts=2) as client:
        submitted = spec("slow", count=0)
        await put_token(client, submitted)
        await client.register_job(create_sandbox_job(submitted))
        assert (await client.read_job("slow"))["ID"] == "slow"
        with pytest.raises(NomadConnectionError, match=r"GET /v1/job/stuck: Nomad at http://.* did not answer"):
            await client.read_job("stuck")


async def test_an_unreachable_nomad_is_reported() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with client_for(f"http://127.0.0.1:{port}", attempts=2) as client:
        with pytest.raises(
            NomadConnectionError, match=f"GET /v1/agent/health: cannot reach Nomad at http://127.0.0.1:{port}"
        ):
            await client.agent_health()
        with pytest.raises(NomadConnectionError, match="GET /v1/jobs: cannot reach Nomad"):
            await client.list_jobs()


async def test_an_allocation_failing_on_start_fails_the_wait_at_once(nomad_standin: NomadStandIn) -> None:
    nomad_standin.faults.fail_task_start(
        "failing", kind="Setup Failure", message="failed to build task directory: disk full"
    )
    async with client_for(nomad_standin.address) as client:
        with pytest.raises(NomadAllocationFailed) as failure:
            await deploy_sandbox_job(client, spec("failing"), timeout=600)
    message = str(failure.value)
    assert message.startswith("GET /v1/job/failing/allocations: allocation failing.sandbox-0[0] (task server)")
    assert "Setup Failure: failed to build task directory: disk full" in message


async def test_a_docker_image_that_cannot_be_pulled_is_diagnosed() -> None:
    async with NomadStandIn(agent_env=agent_env(), docker="broken") as nomad, client_for(nomad.address) as client:
        with pytest.raises(NomadAllocationFailed) as failure:
            await deploy_sandbox_job(client, spec("pull", driver="docker", image="nosuch/image:1"), timeout=600)
    message = str(failure.value)
    assert "Failed to pull `nosuch/image:1`" in message
    assert "the docker image could not be pulled" in message


async def test_a_server_that_never_answers_times_out_with_what_was_seen(nomad_standin: NomadStandIn) -> None:
    async def never(_endpoint: object) -> bool:
        return False

    async with client_for(nomad_standin.address) as client:
        submitted = spec("mute")
        await put_token(client, submitted)
        await client.register_job(create_sandbox_job(submitted))
        with pytest.raises(NomadWaitTimeout) as failure:
            await wait_for_allocations(client, "mute", 1, timeout=0.5, probe=never)
    assert "job mute: 1/1 allocations running (0 ready)" in str(failure.value)


async def test_blocking_queries_wake_on_change_without_polling(nomad_standin: NomadStandIn) -> None:
    async with client_for(nomad_standin.address) as client:
        submitted = spec("watched", count=0)
        await put_token(client, submitted)
        await client.register_job(create_sandbox_job(submitted))
        index, allocations = await client.watch_job_allocations("watched", index=0, wait=1)
        assert allocations == []
        watcher = asyncio.ensure_future(client.watch_job_allocations("watched", index=index, wait=60))
        await asyncio.sleep(0)
        assert not watcher.done()
        submitted = spec("watched", count=1)
        await put_token(client, submitted)
        await client.register_job(create_sandbox_job(submitted))
        new_index, allocations = await watcher
    assert new_index > index and len(allocations) == 1
    assert any("index=" in path and "wait=60000ms" in path for _, path in nomad_standin.requests)


async def test_a_port_held_for_good_fails_the_wait_after_the_grace_period(nomad_standin: NomadStandIn) -> None:
    async with client_for(nomad_standin.address) as client:
        holder = spec("holder")
        await deploy_sandbox_job(client, holder)
        submitted = spec("late", base_port=holder.base_port)
        await put_token(client, submitted)
        await client.register_job(create_sandbox_job(submitted))
        with pytest.raises(NomadPlacementFailed) as failure:
            await wait_for_allocations(client, "late", 1, timeout=600, placement_grace=0.2)
    assert str(failure.value) == (
        f"GET /v1/job/late/evaluations: task group sandbox-0 not placed: network: reserved port collision "
        f"http={holder.base_port}: exhausted on 1 node(s) -- another allocation holds that port on every "
        f"eligible node: free it or change base_port (unchanged for 0.2s)"
    )
