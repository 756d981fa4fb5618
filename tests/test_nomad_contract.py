"""Contract: what the builder sends and what the stand-in answers, against Nomad's OpenAPI description."""

from __future__ import annotations

import re
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
from tests.nomad_recorded import endpoint_of, recorded
from tests.nomad_recorded import fixture_names as recorded_names
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


# ------------------------------------------- recorded Nomad v2.0.5 answers (tests/fixtures/nomad)

# Keys of Nomad 2.0.5's small answers that the spec (Nomad 1.7) does not describe.
_NEWER_THAN_SPEC = {
    "Index": "register, scale and deregister answers carry the raft index in the body too",
    "VolumeEvalID": "deregister: the evaluation of the job's volume claims (Nomad 1.8+)",
    "VolumeEvalIndex": "deregister: the evaluation of the job's volume claims (Nomad 1.8+)",
}
_SMALL_ANSWERS = (
    "static_register",
    "dynamic_register",
    "docker_register",
    "static_scale",
    "dynamic_scale",
    "docker_scale",
    "allocation_stop",
    "job_stop",
    "job_purge",
    "error_stop_unknown_job",
    "variable_put",
    "error_job_allocations_unknown_job",
)


@pytest.mark.parametrize("name", [n for n in recorded_names() if n.startswith("shape_") or n.endswith("_register")])
def test_the_bodies_nomad_accepted_pass_the_spec_check(name: str) -> None:
    """The request bodies a real Nomad registered (and echoed key for key) are ones the OpenAPI check passes."""
    register = recorded(name)
    assert register.status == 200
    assert unknown_keys(register.request, schema("JobRegisterRequest")) == []
    assert schema_errors(register.request, schema("JobRegisterRequest")) == []


@pytest.mark.parametrize("name", _SMALL_ANSWERS)
def test_nomads_small_answers_match_the_spec(name: str) -> None:
    """Nomad's own answers to the calls whose result the client acts on, against the spec's schema.
    (Its job and allocation answers are not: Nomad writes null for empty lists the spec types as
    arrays, and has fields newer than the spec; tests/test_nomad_recorded.py holds those.)"""
    answer = recorded(name)
    route = re.sub(r":(\w+)", r"{\1}", endpoint_of(answer).split(" ", 1)[1])
    target = response_schema(answer.method, route, answer.status)
    assert target is not None, route
    assert schema_errors(answer.body, target) == []
    assert [k for k in unknown_keys(answer.body, target) if k.split(" ", 1)[0] not in _NEWER_THAN_SPEC] == []
