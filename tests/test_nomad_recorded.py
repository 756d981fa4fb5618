"""The stand-in, the client's parsing and the job builder, held to answers recorded from a real
Nomad v2.0.5 agent (tests/fixtures/nomad/, see tests/nomad_recorded.py). Runs on every machine."""

from __future__ import annotations

import copy
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

from atropos.nomad import (
    NomadClient,
    NomadError,
    NomadNotFound,
    NomadRequestError,
    SandboxJobSpec,
    create_sandbox_job,
    scale_sandbox_job,
    stop_sandbox_job,
)
from atropos.nomad.allocations import allocation_address, allocation_endpoint
from atropos.nomad.responses import (
    AgentHealth,
    Allocation,
    AllocationStub,
    Evaluation,
    JobStub,
    NodeInfo,
    RegisterResponse,
)
from tests.nomad_fixtures import agent_env, client_for, job_shapes, shape_id
from tests.nomad_recorded import (
    DOCKER_STEPS,
    DYNAMIC_STEPS,
    NOMAD_VERSION,
    STANDIN_GAPS,
    STANDIN_OMITS,
    STATIC_STEPS,
    STATUS_GAPS,
    Exchange,
    RecordedNomad,
    allowed_omission,
    client_reads,
    covered,
    endpoint_of,
    fixture_names,
    key_paths,
    load,
    recorded,
    recorded_spec,
    shape_problems,
    standin_answers,
)

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ERROR_STEPS = tuple(n for n in fixture_names() if n.startswith("error_") and n not in STATIC_STEPS)
AGENT_STEPS = ("agent_health", "nodes", "node")
COMPARED = (*STATIC_STEPS, *DYNAMIC_STEPS, *DOCKER_STEPS, *ERROR_STEPS, *AGENT_STEPS)
SHAPES = tuple(n for n in fixture_names() if n.startswith("shape_"))
REGISTERED = (*SHAPES, "static_register", "dynamic_register", "docker_register")
ECHO = {"static_register": "static_job", "dynamic_register": "dynamic_job", "docker_register": "docker_job"}

# Keys of the builder's body whose value Nomad's echo does not repeat where it was sent, and why.
NORMALISED_BY_NOMAD = {
    f"Job.Update.{key}": "Nomad moves the job's update block into each group (TaskGroups[].Update, checked "
    "below) and keeps only MaxParallel and Stagger at the job level, the rest zeroed"
    for key in ("HealthCheck", "MinHealthyTime", "HealthyDeadline", "ProgressDeadline")
}
# Maps whose keys are data in the builder's body (owner, version, variables): any key there is kept as
# sent (checked by value in test_nomad_kept_every_key_the_builder_sent). Config keys are driver options
# and named one by one.
BUILDER_DATA_MAPS = frozenset({"Meta", "Env"})
# The docker phase ran on a second agent; a docker allocation's ports come from there.
DOCKER_CONTAINER_PORT = 8080


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def standin_said() -> dict[str, Exchange]:
    """What the stand-in answers to the requests the recorder sent Nomad (one run per module)."""
    return await standin_answers(agent_env())


def _echo(name: str) -> Any:
    return recorded(name, "echo").body if name.startswith("shape_") else recorded(ECHO[name]).body


# --------------------------------------------------------------------------- the recordings


def test_the_recordings_are_nomad_2_0_5_answers() -> None:
    assert load("manifest")["nomad_version"] == NOMAD_VERSION
    assert recorded("node").body["Attributes"]["nomad.version"] == NOMAD_VERSION
    for name in fixture_names():
        exchange = recorded(name)
        assert exchange.method in ("GET", "POST", "PUT", "DELETE"), name
        assert exchange.path.startswith("/v1/"), name
        assert exchange.kind in ("json", "text"), name
    assert {shape_id(spec) for spec in job_shapes()} == {n.removeprefix("shape_") for n in SHAPES}


# ---------------------------------------------------------------------- the stand-in vs Nomad


@pytest.mark.parametrize("name", COMPARED)
def test_the_stand_in_answers_as_nomad_did(name: str, standin_said: dict[str, Exchange]) -> None:
    """Same status, same kind of body, and (JSON) the same keys and types, recursively: except the
    keys Nomad sends that the client never reads (STANDIN_OMITS) and the listed gaps (STANDIN_GAPS)."""
    nomad, standin = recorded(name), standin_said[name]
    if name in STATUS_GAPS:
        assert standin.status != nomad.status, f"{name}: fixed? drop it from STATUS_GAPS"
        return
    assert (standin.status, standin.kind) == (nomad.status, nomad.kind), (name, standin.body)
    if nomad.kind != "json":
        return
    endpoint = endpoint_of(nomad)
    gaps = STANDIN_GAPS.get(endpoint, {})
    unexplained = [
        p for p in shape_problems(nomad.body, standin.body) if not allowed_omission(endpoint, p) and p not in gaps
    ]
    assert unexplained == [], f"{name} ({endpoint}):\n" + "\n".join(unexplained)


def test_known_stand_in_gaps_are_still_there(standin_said: dict[str, Exchange]) -> None:
    """Every listed gap shows in some recording of its endpoint (a closed gap leaves the list)."""
    seen: dict[str, set[str]] = {}
    for name in COMPARED:
        nomad, standin = recorded(name), standin_said[name]
        if nomad.kind == "json" and standin.kind == "json" and nomad.status == standin.status:
            seen.setdefault(endpoint_of(nomad), set()).update(shape_problems(nomad.body, standin.body))
    stale = [
        f"{endpoint}: {gap}"
        for endpoint, gaps in STANDIN_GAPS.items()
        for gap in gaps
        if gap not in seen.get(endpoint, set())
    ]
    assert stale == []


def test_the_allow_list_holds_no_key_the_client_reads() -> None:
    reads = client_reads()
    sent: dict[str, set[str]] = {}
    for name in COMPARED:
        exchange = recorded(name)
        sent.setdefault(endpoint_of(exchange), set()).update(key_paths(exchange.body))
    for endpoint, omits in STANDIN_OMITS.items():
        assert endpoint in reads, endpoint
        # an omitted key the client reads, or one holding keys it reads
        read = sorted(p for p in omits if any(covered(r, {p}) for r in reads[endpoint]))
        assert read == [], f"{endpoint}: the client reads {read}"
        unsent = sorted(p for p in omits if p not in sent.get(endpoint, set()))
        assert unsent == [], f"{endpoint}: Nomad sent none of {unsent} in the recordings"


def test_the_shape_check_catches_a_key_the_stand_in_drops() -> None:
    """The comparison itself: a dropped client key, an invented one and a changed type all show."""
    nomad = recorded("static_allocation").body
    standin = copy.deepcopy(nomad)
    del standin["AllocatedResources"]["Shared"]["Ports"][0]["HostIP"]
    standin["Invented"] = "x"
    standin["ClientStatus"] = 1
    standin["DesiredDescription"] = ""  # empty extra keys are no problem: Nomad leaves them out
    assert shape_problems(nomad, standin) == [
        "AllocatedResources.Shared.Ports[].HostIP: missing",
        "ClientStatus: type number where Nomad sends string",
        "Invented: extra",
    ]


# ------------------------------------------------------------------------ the client's parsing


@pytest.mark.parametrize(
    "name",
    [
        "static_register",
        "dynamic_register",
        "docker_register",
        "static_scale",
        "dynamic_scale",
        "docker_scale",
        *SHAPES,
    ],
)
def test_register_and_scale_answers_parse(name: str) -> None:
    body = recorded(name).body
    response = RegisterResponse.model_validate(body)
    assert response.eval_id == body["EvalID"] != ""
    assert response.job_modify_index == body["JobModifyIndex"] > 0
    assert response.eval_create_index == body["EvalCreateIndex"] > 0
    # a memory_max (full shapes) draws Nomad's warning: oversubscription is off by default
    oversubscribed = name.endswith("-full")
    assert response.warnings == body["Warnings"]
    assert ("Memory oversubscription is not enabled" in response.warnings) is oversubscribed
    assert (response.warnings == "") is not oversubscribed


@pytest.mark.parametrize(("name", "index"), [("static_allocation", 0), ("static_allocation_1", 1)])
def test_a_static_port_allocation_yields_its_reserved_port(name: str, index: int) -> None:
    spec = recorded_spec("static_register")
    endpoint = allocation_endpoint(Allocation.model_validate(recorded(name).body))
    assert (endpoint.host, endpoint.port) == ("127.0.0.1", spec.base_port + index)
    assert (endpoint.group, endpoint.index, endpoint.job_id) == (f"sandbox-{index}", index, spec.job_id)
    assert endpoint.node_name == "recorded-host" and endpoint.node_id
    assert endpoint.url == f"http://127.0.0.1:{spec.base_port + index}"


@pytest.mark.parametrize("name", ["dynamic_allocation", "docker_allocation"])
def test_a_dynamic_port_allocation_yields_the_host_port_nomad_chose(name: str) -> None:
    body = recorded(name).body
    [port] = body["AllocatedResources"]["Shared"]["Ports"]
    assert 20000 <= port["Value"] <= 32000  # Nomad's dynamic range
    endpoint = allocation_endpoint(Allocation.model_validate(body))
    assert (endpoint.host, endpoint.port) == ("127.0.0.1", port["Value"])
    assert (endpoint.group, endpoint.index) == ("sandbox", 0)
    if name == "docker_allocation":  # the host port, never the container's
        assert port["To"] == DOCKER_CONTAINER_PORT != endpoint.port


@pytest.mark.parametrize("name", ["static_allocation", "dynamic_allocation", "docker_allocation"])
def test_the_address_fallbacks_work_on_nomads_answers(name: str) -> None:
    """Without Shared.Ports the address comes from Shared.Networks; without AllocatedResources from
    the legacy Resources.Networks, which Nomad 2.0.5 still sends."""
    body = recorded(name).body
    expected = allocation_address(Allocation.model_validate(body))
    no_ports = copy.deepcopy(body)
    del no_ports["AllocatedResources"]["Shared"]["Ports"]
    assert allocation_address(Allocation.model_validate(no_ports)) == expected
    legacy = copy.deepcopy(body)
    del legacy["AllocatedResources"]
    assert allocation_address(Allocation.model_validate(legacy)) == expected
    del legacy["Resources"]
    with pytest.raises(NomadError, match="no port labelled 'http'"):
        allocation_address(Allocation.model_validate(legacy))


def test_allocation_lists_parse_before_and_after_scaling() -> None:
    before = [AllocationStub.model_validate(a) for a in recorded("static_allocations").body]
    assert sorted((a.task_group, a.wanted, a.is_running, a.alloc_index) for a in before) == [
        ("sandbox-0", True, True, 0),
        ("sandbox-1", True, True, 0),
    ]
    after = {
        a.task_group: a for a in map(AllocationStub.model_validate, recorded("static_allocations_after_scale").body)
    }
    assert after["sandbox-0"].is_running and after["sandbox-0"].wanted
    assert not after["sandbox-1"].wanted and not after["sandbox-1"].is_running
    for name in ("dynamic_allocations_after_scale", "docker_allocations_after_scale"):
        stubs = [AllocationStub.model_validate(a) for a in recorded(name).body]
        assert sorted(a.alloc_index for a in stubs if a.wanted and a.is_running) == [0, 1], name
    [event_types] = [[e.type for e in s.events] for s in before[0].task_states.values()]
    assert event_types[-1] == "Started"


def test_evaluations_jobs_nodes_and_health_parse() -> None:
    [evaluation] = [Evaluation.model_validate(e) for e in recorded("static_evaluations").body]
    assert (evaluation.triggered_by, evaluation.status, evaluation.failed_tg_allocs) == ("job-register", "complete", {})
    [stub] = [JobStub.model_validate(j) for j in recorded("jobs_list").body]
    assert stub.id == "rec-static" and stub.meta is not None and stub.meta["atropos_kind"] == "sandbox"
    node = NodeInfo.model_validate(recorded("node").body)
    assert (node.status, node.node_pool, node.http_addr) == ("ready", "default", "127.0.0.1:4646")
    assert node.drivers["raw_exec"].healthy and node.attributes["driver.raw_exec"] == "1"
    [listed] = [NodeInfo.model_validate(n) for n in recorded("nodes").body]
    assert listed.id == node.id and listed.drivers["raw_exec"].healthy
    assert AgentHealth.model_validate(recorded("agent_health").body).ok
    job = recorded("static_job").body
    assert job["JobModifyIndex"] > 0 and job["Meta"]["atropos_kind"] == "sandbox"


# --------------------------------------------- the client over HTTP, against recorded answers


def _serve(*names: str, path: str | None = None) -> RecordedNomad:
    """A loopback server answering each recording's request (or `path`) with its recorded answer."""
    routes = {}
    for name in names:
        exchange = recorded(name)
        routes[(exchange.method, path or exchange.path)] = exchange
    return RecordedNomad(routes)


def _alloc_id(name: str) -> str:
    """The (scrubbed) allocation or node id in a recording's path."""
    found = UUID.search(recorded(name).path)
    assert found is not None, name
    return found.group(0)


ErrorCall = Callable[[NomadClient], Awaitable[object]]
ERROR_CASES: list[tuple[str, ErrorCall, type[NomadError], int]] = [
    ("error_job_not_found", lambda c: c.read_job("no-such-job"), NomadNotFound, 404),
    (
        "error_allocation_not_found",
        lambda c: c.read_allocation(_alloc_id("error_allocation_not_found")),
        NomadNotFound,
        404,
    ),
    (
        "error_allocation_stop_not_found",
        lambda c: c.stop_allocation(_alloc_id("error_allocation_stop_not_found")),
        NomadNotFound,
        404,
    ),
    (
        "error_logs_unknown_allocation",
        lambda c: c.task_log_tail(_alloc_id("error_logs_unknown_allocation"), "server"),
        NomadNotFound,
        404,
    ),
    ("error_scale_unknown_job", lambda c: c.scale_job("no-such-job", "sandbox", 1), NomadNotFound, 404),
    ("error_scale_unknown_group", lambda c: c.scale_job("rec-static", "no-such-group", 1), NomadRequestError, 400),
    ("error_scale_over_max", lambda c: c.scale_job("rec-static", "sandbox-1", 2), NomadRequestError, 400),
    ("error_scale_during_deployment", lambda c: c.scale_job("rec-static", "sandbox-1", 0), NomadRequestError, 400),
    ("error_register_id_mismatch", lambda c: c.register_job({"ID": "bad"}), NomadRequestError, 400),
    ("error_register_not_json", lambda c: c.register_job({"ID": "bad"}), NomadRequestError, 400),
    # Nomad answers a job that fails validation with 500: final all the same, said once, never retried
    ("error_register_no_groups", lambda c: c.register_job({"ID": "bad"}), NomadRequestError, 500),
    ("error_register_invalid_job", lambda c: c.register_job({"ID": "bad"}), NomadRequestError, 500),
]


@pytest.mark.parametrize(("name", "call", "error", "status"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
async def test_the_client_maps_nomads_error_answers_to_typed_errors(
    name: str, call: ErrorCall, error: type[NomadError], status: int
) -> None:
    nomad = recorded(name)
    attempts = 3
    with _serve(name).serving() as server:
        async with client_for(server.address, attempts=attempts, backoff=0.01, max_backoff=0.01) as client:
            with pytest.raises(error) as failure:
                await call(client)
    assert type(failure.value) is error
    assert failure.value.status == nomad.status == status
    assert failure.value.message.split()[:4] == nomad.text.split()[:4]
    assert nomad.path in failure.value.endpoint
    assert len(server.requests) == (attempts if failure.value.transient else 1)


async def test_the_client_reads_nomads_answers_over_http() -> None:
    spec = recorded_spec("static_register")
    static, dynamic, docker = (recorded(n) for n in ("static_allocation", "dynamic_allocation", "docker_allocation"))
    names = (
        "static_register",
        "static_job",
        "static_allocations",
        "static_allocation",
        "dynamic_allocation",
        "docker_allocation",
        "static_evaluations",
        "jobs_list",
        "agent_health",
        "static_scale",
        "allocation_stop",
        "job_stop",
        "variable_put",
        "variable_delete",
        "task_log_tail",
    )
    with _serve(*names).serving() as server:
        async with client_for(server.address, attempts=1) as client:
            registered = await client.register_job(create_sandbox_job(spec))
            assert registered.eval_id == recorded("static_register").body["EvalID"]
            assert (await client.read_job(spec.job_id))["Meta"]["atropos_kind"] == "sandbox"
            assert len(await client.job_allocations(spec.job_id)) == 2
            ports = [
                (await client.allocation_endpoint(a.path.rsplit("/", 1)[-1])).port for a in (static, dynamic, docker)
            ]
            assert ports == [spec.base_port] + [
                a.body["AllocatedResources"]["Shared"]["Ports"][0]["Value"] for a in (dynamic, docker)
            ]
            index, evaluations = await client.watch_job_evaluations(spec.job_id, index=1, wait=0.1)
            assert (index, evaluations[0].status) == (1, "complete")  # the index from X-Nomad-Index
            assert [j.id for j in await client.list_jobs("rec-")] == [spec.job_id]
            assert (await client.agent_health()).ok
            scaled = await client.scale_job(spec.job_id, "sandbox-1", 0)
            assert scaled.eval_id == recorded("static_scale").body["EvalID"]
            assert await client.stop_allocation(static.body["ID"]) == recorded("allocation_stop").body["EvalID"]
            assert await client.stop_job(spec.job_id) == recorded("job_stop").body["EvalID"]
            await client.put_variable(spec.token_variable, {"token": "x"})
            assert await client.delete_variable(spec.token_variable) is True  # Nomad: 204, no body
            assert await client.task_log_tail(static.body["ID"], "server") == ""


async def test_stopping_an_unknown_job_is_no_error_on_nomad_2_0_5() -> None:
    """Nomad 2.0.5 answers DELETE of a job it does not know 200, with an empty EvalID."""
    with _serve("error_stop_unknown_job").serving() as server:
        async with client_for(server.address, attempts=1) as client:
            assert await client.stop_job("no-such-job") == ""


async def test_stop_sandbox_job_says_when_there_was_no_job() -> None:
    # Nomad 2.0.5 answers 200 with an empty EvalID here (error_stop_unknown_job.json), not 404
    with _serve("error_stop_unknown_job", "variable_delete_missing").serving() as server:
        server.routes[("DELETE", "/v1/var/nomad/jobs/no-such-job")] = recorded("variable_delete_missing")
        async with client_for(server.address, attempts=1) as client:
            assert await stop_sandbox_job(client, "no-such-job") is False


async def test_scaling_falls_back_to_registering_while_nomad_blocks_it() -> None:
    """Nomad's own `scaling blocked due to active deployment` answer makes scale_sandbox_job
    re-register the job with the new count instead."""
    spec = recorded_spec("dynamic_register")
    blocked = recorded("error_scale_during_deployment")
    server = RecordedNomad(
        {
            ("POST", f"/v1/job/{spec.job_id}/scale"): blocked,
            ("POST", f"/v1/job/{spec.job_id}"): recorded("dynamic_register"),
        }
    )
    with server.serving():
        async with client_for(server.address, attempts=1) as client:
            scaled = await scale_sandbox_job(client, spec, 2)
    assert scaled.count == 2
    assert server.requests == [("POST", f"/v1/job/{spec.job_id}/scale"), ("POST", f"/v1/job/{spec.job_id}")]


# ---------------------------------------------------------------- the builder vs Nomad's echo


def _leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Every scalar (and empty list or map) in `value` by path, list items by index."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out |= _leaves(item, f"{path}.{key}" if path else key)
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, item in enumerate(value):
            out |= _leaves(item, f"{path}[{i}]")
        return out
    return {path: value}


def _at(value: Any, path: str) -> Any:
    """The value at `path` (as `_leaves` writes it), or KeyError."""
    for part in path.replace("[", ".[").split("."):
        if part.startswith("["):
            index = int(part[1:-1])
            if not isinstance(value, list) or index >= len(value):
                raise KeyError(path)
            value = value[index]
        else:
            if not isinstance(value, dict) or part not in value:
                raise KeyError(path)
            value = value[part]
    return value


def dropped_or_changed(request: dict[str, Any], echo: dict[str, Any]) -> list[str]:
    """Keys of the body sent that Nomad's stored job lacks, or holds with another value."""
    problems = []
    for path, sent in _leaves(request).items():
        if path in NORMALISED_BY_NOMAD:
            continue
        try:
            kept = _at({"Job": echo}, path)
        except KeyError:
            problems.append(f"{path}: dropped")
            continue
        if kept != sent:
            problems.append(f"{path}: sent {sent!r}, Nomad keeps {kept!r}")
    return problems


@pytest.mark.parametrize("name", REGISTERED)
def test_nomad_kept_every_key_the_builder_sent(name: str) -> None:
    register = recorded(name)
    assert register.status == 200, register.body
    assert dropped_or_changed(register.request, _echo(name)) == []


@pytest.mark.parametrize("name", REGISTERED)
def test_nomad_moved_the_update_block_into_each_group(name: str) -> None:
    sent = recorded(name).request["Job"]["Update"]
    for group in _echo(name)["TaskGroups"]:
        for path in NORMALISED_BY_NOMAD:
            key = path.rsplit(".", 1)[-1]
            assert group["Update"][key] == sent[key], (group["Name"], key)


@pytest.mark.parametrize("spec", job_shapes(), ids=shape_id)
def test_the_builder_sends_only_keys_nomad_kept(spec: SandboxJobSpec) -> None:
    """Today's builder against the recorded echo of the same shape: a key it sends that Nomad did not
    keep (or a new one nobody checked against Nomad) fails here; re-record to accept a new key."""
    echo = {"Job": recorded(f"shape_{shape_id(spec)}", "echo").body}
    sent = key_paths(create_sandbox_job(spec).to_api(), data_maps=BUILDER_DATA_MAPS)
    missing = sorted(p for p in sent - key_paths(echo, data_maps=BUILDER_DATA_MAPS) if p not in NORMALISED_BY_NOMAD)
    assert missing == [], "keys Nomad did not keep (or not yet recorded): " + ", ".join(missing)


def test_the_echo_check_catches_a_dropped_key() -> None:
    register = recorded("static_register")
    request = copy.deepcopy(register.request)
    request["Job"]["TaskGroups"][0]["Tasks"][0]["Resources"]["MemoryMb"] = 64
    request["Job"]["TaskGroups"][0]["Count"] = 3
    assert dropped_or_changed(request, _echo("static_register")) == [
        "Job.TaskGroups[0].Count: sent 3, Nomad keeps 1",
        "Job.TaskGroups[0].Tasks[0].Resources.MemoryMb: dropped",
    ]
