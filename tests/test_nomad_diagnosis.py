"""Reading Nomad's records: allocation addresses, failure events, placement metrics."""

from __future__ import annotations

from typing import Any

import pytest

from atropos.nomad import NomadError, allocation_address, allocation_endpoint
from atropos.nomad.diagnosis import allocation_failure, placement_problems
from atropos.nomad.responses import Allocation, AllocationStub, Evaluation


def alloc(**fields: Any) -> Allocation:
    return Allocation.model_validate({"ID": "a1", "Name": "job.sandbox-2[0]", "TaskGroup": "sandbox-2", **fields})


def test_address_comes_from_shared_ports_first() -> None:
    # A dev agent's node has 127.0.0.1 and ::1: the port is held per address, and only
    # Shared.Ports says which one this allocation got (Networks[].IP says the first).
    found = alloc(
        AllocatedResources={
            "Shared": {
                "Ports": [{"Label": "http", "Value": 19001, "HostIP": "::1"}],
                "Networks": [{"IP": "127.0.0.1", "ReservedPorts": [{"Label": "http", "Value": 19001}]}],
            }
        }
    )
    assert allocation_address(found) == ("::1", 19001)
    endpoint = allocation_endpoint(found)
    assert (endpoint.url, endpoint.index, endpoint.group) == ("http://[::1]:19001", 2, "sandbox-2")


@pytest.mark.parametrize(
    "resources",
    [
        {
            "AllocatedResources": {
                "Shared": {
                    "Networks": [{"IP": "10.0.0.5", "DynamicPorts": [{"Label": "http", "Value": 23456, "To": 8080}]}]
                }
            }
        },
        {
            "AllocatedResources": {
                "Shared": {"Networks": [{"IP": "10.0.0.5", "ReservedPorts": [{"Label": "http", "Value": 23456}]}]}
            }
        },
        {
            "AllocatedResources": {
                "Tasks": {
                    "server": {"Networks": [{"IP": "10.0.0.5", "DynamicPorts": [{"Label": "http", "Value": 23456}]}]}
                }
            }
        },
        {"Resources": {"Networks": [{"IP": "10.0.0.5", "ReservedPorts": [{"Label": "http", "Value": 23456}]}]}},
    ],
)
def test_address_falls_back_to_networks_then_legacy_resources(resources: dict[str, Any]) -> None:
    # `Value` is the host port whatever `To` says (To is the port inside a docker container)
    assert allocation_address(alloc(**resources)) == ("10.0.0.5", 23456)


def test_an_allocation_without_the_port_is_an_error_naming_it() -> None:
    with pytest.raises(NomadError, match=r"GET /v1/allocation/a1: allocation job.sandbox-2\[0\] has no port"):
        allocation_address(
            alloc(
                AllocatedResources={"Shared": {"Ports": [{"Label": "other", "Value": 1}]}}, Resources={"Networks": None}
            )
        )


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"Type": kind, **fields}


def stub(events: list[dict[str, Any]], client_status: str = "running", **fields: Any) -> AllocationStub:
    return AllocationStub.model_validate(
        {
            "ID": "a1",
            "Name": "job.sandbox-0[0]",
            "TaskGroup": "sandbox-0",
            "NodeName": "node-7",
            "ClientStatus": client_status,
            "DesiredStatus": "run",
            "TaskStates": {"server": {"State": "running", "Events": events}},
            **fields,
        }
    )


def test_a_running_task_is_no_failure_even_after_a_restart() -> None:
    events = [event("Started"), event("Terminated", ExitCode=1), event("Restarting"), event("Started")]
    assert allocation_failure(stub(events)) is None


def test_exit_127_means_a_missing_command() -> None:
    failure = allocation_failure(
        stub(
            [
                event("Started"),
                event("Terminated", ExitCode=127),
                event("Not Restarting", DisplayMessage="Exceeded allowed attempts"),
            ],
            client_status="failed",
        )
    )
    assert failure is not None
    assert failure.reason == "Terminated with exit code 127"  # not the less telling "Not Restarting"
    assert failure.hint is not None and "not found on the node" in failure.hint
    text = failure.with_stderr("sh: 1: exec: apptainer: not found\n").describe()
    assert text.startswith("allocation job.sandbox-0[0] (task server) on node node-7: Terminated with exit code 127")
    assert "stderr: sh: 1: exec: apptainer: not found" in text


def test_driver_failure_quotes_the_driver_error() -> None:
    failure = allocation_failure(
        stub(
            [event("Driver Failure", DriverError='exec: "apptainer": executable file not found in $PATH')],
            client_status="pending",
        )
    )
    assert failure is not None
    assert failure.reason == 'Driver Failure: exec: "apptainer": executable file not found in $PATH'
    assert failure.hint is not None and "PATH" in failure.hint


def test_oom_kill_is_named() -> None:
    failure = allocation_failure(
        stub([event("Started"), event("Terminated", ExitCode=137, Details={"oom_killed": "true"})])
    )
    assert failure is not None and "exceeding its memory limit" in failure.reason


def blocked(group: str, metric: dict[str, Any], status: str = "blocked") -> Evaluation:
    return Evaluation.model_validate({"ID": "e1", "Status": status, "FailedTGAllocs": {group: metric}})


def test_missing_driver_is_a_permanent_placement_problem() -> None:
    (problem,) = placement_problems(
        [
            blocked(
                "sandbox",
                {
                    "NodesEvaluated": 3,
                    "NodesFiltered": 3,
                    "NodesAvailable": {"dc1": 3},
                    "ConstraintFiltered": {"missing drivers": 3},
                },
            )
        ]
    )
    assert problem.permanent
    assert problem.describe().startswith("task group sandbox not placed: missing drivers: 3 node(s) filtered out")
    assert "raw_exec" in problem.message


def test_port_collision_is_worth_waiting_for() -> None:
    (problem,) = placement_problems(
        [
            blocked(
                "sandbox-1",
                {
                    "NodesEvaluated": 1,
                    "NodesExhausted": 1,
                    "DimensionExhausted": {"network: reserved port collision http=19001": 1},
                },
            )
        ]
    )
    assert not problem.permanent
    assert "network: reserved port collision http=19001: exhausted on 1 node(s)" in problem.message


def test_no_node_in_the_datacenter_is_permanent() -> None:
    (problem,) = placement_problems([blocked("sandbox", {"NodesEvaluated": 0, "NodesAvailable": {"hpc": 0}})])
    assert problem.permanent and "no node is in the job's datacenters" in problem.message


def test_only_blocked_evaluations_count() -> None:
    metric = {"NodesEvaluated": 1, "NodesFiltered": 1, "ConstraintFiltered": {"missing drivers": 1}}
    assert (
        placement_problems(
            [blocked("sandbox", metric, status="complete"), blocked("sandbox", metric, status="canceled")]
        )
        == []
    )
