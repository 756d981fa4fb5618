"""Contract: what the builder sends and what the stand-in answers, against Nomad's OpenAPI description."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest

from atropos.nomad import (
    NomadAllocationFailed,
    NomadPlacementFailed,
    SandboxJobSpec,
    create_sandbox_job,
    deploy_sandbox_job,
    scale_sandbox_job,
    stop_sandbox_job,
)
from atropos.nomad.models import RestartPolicy, UpdateStrategy
from tests.nomad_fixtures import TOKEN, client_for, free_port_block, job_shapes, server_command, shape_id, task_user
from tests.nomad_schema import UNDESCRIBED_ROUTES, response_schema, schema, schema_errors, unknown_keys
from tests.nomad_standin import NomadStandIn


@pytest.mark.parametrize("spec", job_shapes(), ids=shape_id)
def test_every_key_the_builder_emits_is_in_the_job_schema(spec: SandboxJobSpec) -> None:
    body = create_sandbox_job(spec).to_api()
    assert unknown_keys(body, schema("JobRegisterRequest")) == []
    assert schema_errors(body, schema("JobRegisterRequest")) == []


def test_the_key_check_catches_a_misspelt_field() -> None:
    body = create_sandbox_job(SandboxJobSpec(token=TOKEN)).to_api()
    task = body["Job"]["TaskGroups"][0]["Tasks"][0]
    task["Resources"]["MemoryMb"] = task["Resources"].pop("MemoryMB")
    body["Job"]["TaskGroups"][0]["Networks"][0]["ReservedPorts"][0]["Static"] = 1
    assert unknown_keys(body, schema("JobRegisterRequest")) == [
        "Job.TaskGroups[0].Networks[0].ReservedPorts[0].Static (not a field of Port)",
        "Job.TaskGroups[0].Tasks[0].Resources.MemoryMb (not a field of Resources)",
    ]


def test_durations_are_nanoseconds_in_the_wire_format() -> None:
    spec = SandboxJobSpec(token=TOKEN, kill_timeout=timedelta(seconds=7))
    job = create_sandbox_job(spec).to_json()
    group = job["TaskGroups"][0]
    assert group["Tasks"][0]["KillTimeout"] == 7_000_000_000
    assert group["RestartPolicy"]["Delay"] == 5_000_000_000
    assert job["Update"]["HealthyDeadline"] == 300_000_000_000


async def test_every_stand_in_answer_matches_the_spec(nomad_standin: NomadStandIn) -> None:
    """Drive the stand-in through everything the client does, then check each JSON answer it gave."""
    async with client_for(nomad_standin.address) as client:
        base = {
            "token": TOKEN,
            "server_command": server_command(),
            "slots_per_container": 1,
            "cpu": 100,
            "memory": 128,
            "task_user": task_user(),
        }
        spec = SandboxJobSpec(job_id="contract-static", count=2, service=True, base_port=free_port_block(4), **base)  # type: ignore[arg-type]
        await deploy_sandbox_job(client, spec, timeout=60)
        await scale_sandbox_job(client, spec, 1)
        dynamic = SandboxJobSpec(
            job_id="contract-dynamic",
            static_ports=False,  # type: ignore[arg-type]
            update=UpdateStrategy(min_healthy_time=timedelta(0)),
            **base,
        )
        endpoints = await deploy_sandbox_job(client, dynamic, timeout=60)
        await client.scale_job(dynamic.job_id, "sandbox", 2)
        await client.read_job(dynamic.job_id)
        await client.list_jobs("contract-")
        node = await client.read_allocation(endpoints[0].alloc_id)
        async with httpx.AsyncClient(base_url=nomad_standin.address) as raw:  # routes only the stand-in serves
            for route in (f"/v1/job/{dynamic.job_id}/evaluations", f"/v1/node/{node.node_id}", "/v1/nodes"):
                assert (await raw.get(route)).status_code == 200, route
        await client.agent_health()
        await client.stop_allocation(endpoints[0].alloc_id)
        with pytest.raises(NomadPlacementFailed):
            await deploy_sandbox_job(
                client, SandboxJobSpec(job_id="contract-docker", driver="docker", token=TOKEN), timeout=60
            )
        nomad_standin.faults.fail_task_start("contract-failing", message="stand-in start failure")
        with pytest.raises(NomadAllocationFailed):
            await deploy_sandbox_job(
                client, SandboxJobSpec(job_id="contract-failing", restart=RestartPolicy(attempts=0), **base), timeout=60
            )  # type: ignore[arg-type]
        for job_id in ("contract-static", "contract-dynamic", "contract-docker", "contract-failing"):
            await stop_sandbox_job(client, job_id, purge=job_id != "contract-dynamic")
        await client.list_jobs("contract-")

    checked = set()
    problems = []
    for answer in nomad_standin.served:
        target = response_schema(answer.method, answer.route, answer.status)
        if target is None:
            assert answer.route.replace("{alloc_id}", "{}") in UNDESCRIBED_ROUTES, answer.route
            continue
        checked.add((answer.method, answer.route))
        where = f"{answer.method} {answer.route}"
        problems += [f"{where}: {p}" for p in schema_errors(answer.body, target)]
        problems += [f"{where}: unknown key {p}" for p in unknown_keys(answer.body, target)]
    assert problems == [], "\n".join(problems)
    assert {
        ("POST", "/v1/job/{job_id}"),
        ("GET", "/v1/job/{job_id}"),
        ("DELETE", "/v1/job/{job_id}"),
        ("POST", "/v1/job/{job_id}/scale"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/job/{job_id}/allocations"),
        ("GET", "/v1/job/{job_id}/evaluations"),
        ("GET", "/v1/allocation/{alloc_id}"),
        ("GET", "/v1/node/{node_id}"),
        ("GET", "/v1/nodes"),
        ("POST", "/v1/allocation/{alloc_id}/stop"),
    } <= checked
