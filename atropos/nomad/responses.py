"""Typed views of the Nomad responses the client reads (only the fields it uses; the rest is ignored).

Nomad writes `null` for many empty lists and maps; those read as empty here.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from atropos.nomad.models import wire_name

__all__ = [
    "AgentHealth",
    "AllocatedResources",
    "Allocation",
    "AllocationEndpoint",
    "AllocationMetric",
    "AllocationStub",
    "Evaluation",
    "JobStub",
    "NetworkStatus",
    "NodeInfo",
    "PortMapping",
    "RegisterResponse",
    "TaskEvent",
    "TaskState",
]

T = TypeVar("T")


def _empty_if_null(value: Any) -> Any:
    return {} if value is None else value


def _list_if_null(value: Any) -> Any:
    return [] if value is None else value


Map = Annotated[dict[str, T], BeforeValidator(_empty_if_null)]
List = Annotated[list[T], BeforeValidator(_list_if_null)]


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=wire_name, populate_by_name=True, extra="ignore", frozen=True)


class TaskEvent(ApiModel):
    type: str = ""
    time: int = 0
    display_message: str = ""
    message: str = ""
    driver_error: str = ""
    setup_error: str = ""
    validation_error: str = ""
    download_error: str = ""
    kill_error: str = ""
    exit_code: int = 0
    signal: int = 0
    fails_task: bool = False
    details: Map[str] = Field(default_factory=dict)


class TaskState(ApiModel):
    state: str = ""
    failed: bool = False
    restarts: int = 0
    events: List[TaskEvent] = Field(default_factory=list)


class PortMapping(ApiModel):
    """`AllocatedResources.Shared.Ports[]`: host port `value` on `host_ip`, `to` inside the task."""

    label: str = ""
    value: int = 0
    to: int = 0
    host_ip: str = Field(default="", alias="HostIP")


class PortValue(ApiModel):
    label: str = ""
    value: int = 0
    to: int = 0


class NetworkStatus(ApiModel):
    ip: str = Field(default="", alias="IP")
    mode: str = ""
    dynamic_ports: List[PortValue] = Field(default_factory=list)
    reserved_ports: List[PortValue] = Field(default_factory=list)


class SharedResources(ApiModel):
    ports: List[PortMapping] = Field(default_factory=list)
    networks: List[NetworkStatus] = Field(default_factory=list)


class TaskResources(ApiModel):
    networks: List[NetworkStatus] = Field(default_factory=list)


class AllocatedResources(ApiModel):
    shared: SharedResources | None = None
    tasks: Map[TaskResources] = Field(default_factory=dict)


_ALLOC_INDEX = re.compile(r"\[(\d+)\]\Z")


class AllocationStub(ApiModel):
    """An entry of `GET /v1/job/:id/allocations` (no resources, hence no address)."""

    id: str
    name: str = ""
    job_id: str = ""
    task_group: str = ""
    node_id: str = ""
    node_name: str = ""
    client_status: str = ""
    client_description: str = ""
    desired_status: str = ""
    desired_description: str = ""
    job_version: int = 0
    create_index: int = 0
    modify_index: int = 0
    task_states: Map[TaskState] = Field(default_factory=dict)

    @property
    def alloc_index(self) -> int | None:
        """The allocation index Nomad encodes in the name (`job.group[3]` -> 3)."""
        match = _ALLOC_INDEX.search(self.name)
        return int(match.group(1)) if match else None

    @property
    def wanted(self) -> bool:
        """Nomad still wants this allocation to run (it is not being stopped or replaced)."""
        return self.desired_status == "run"

    @property
    def is_running(self) -> bool:
        return (
            self.client_status == "running"
            and bool(self.task_states)
            and all(s.state == "running" for s in self.task_states.values())
        )


class LegacyResources(ApiModel):
    networks: List[NetworkStatus] = Field(default_factory=list)


class Allocation(AllocationStub):
    """`GET /v1/allocation/:id`: carries the allocated ports."""

    allocated_resources: AllocatedResources | None = None
    resources: LegacyResources | None = None


class AllocationEndpoint(BaseModel):
    """A running sandbox server: where it listens and which allocation it is."""

    model_config = ConfigDict(frozen=True)

    alloc_id: str
    job_id: str
    group: str
    index: int | None
    node_id: str
    node_name: str
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class AllocationMetric(ApiModel):
    nodes_evaluated: int = 0
    nodes_filtered: int = 0
    nodes_exhausted: int = 0
    nodes_available: Map[int] = Field(default_factory=dict)
    class_filtered: Map[int] = Field(default_factory=dict)
    constraint_filtered: Map[int] = Field(default_factory=dict)
    class_exhausted: Map[int] = Field(default_factory=dict)
    dimension_exhausted: Map[int] = Field(default_factory=dict)
    quota_exhausted: List[str] = Field(default_factory=list)
    coalesced_failures: int = 0


class Evaluation(ApiModel):
    id: str
    job_id: str = ""
    status: str = ""
    status_description: str = ""
    triggered_by: str = ""
    blocked_eval: str = ""
    previous_eval: str = ""
    create_index: int = 0
    modify_index: int = 0
    failed_tg_allocs: Map[AllocationMetric] = Field(default_factory=dict, alias="FailedTGAllocs")


class JobStub(ApiModel):
    id: str
    name: str = ""
    type: str = ""
    status: str = ""
    stop: bool = False
    namespace: str = ""
    create_index: int = 0
    job_modify_index: int = 0
    meta: Map[str] | None = None


class RegisterResponse(ApiModel):
    eval_id: str = ""
    eval_create_index: int = 0
    job_modify_index: int = 0
    warnings: str = ""


class DriverInfo(ApiModel):
    detected: bool = False
    healthy: bool = False
    health_description: str = ""


class NodeInfo(ApiModel):
    id: str
    name: str = ""
    status: str = ""
    status_updated_at: int = 0  # Unix seconds of the last status change (ready -> down -> ready)
    datacenter: str = ""
    node_pool: str = ""
    http_addr: str = Field(default="", alias="HTTPAddr")
    scheduling_eligibility: str = ""
    drivers: Map[DriverInfo] = Field(default_factory=dict)
    attributes: Map[str] = Field(default_factory=dict)


class HealthPart(ApiModel):
    ok: bool = Field(default=False, alias="ok")
    message: str = Field(default="", alias="message")


class AgentHealth(ApiModel):
    """`GET /v1/agent/health`: `client` and/or `server` parts, as the agent runs them."""

    client: HealthPart | None = Field(default=None, alias="client")
    server: HealthPart | None = Field(default=None, alias="server")

    @property
    def ok(self) -> bool:
        parts = [p for p in (self.client, self.server) if p is not None]
        return bool(parts) and all(p.ok for p in parts)
