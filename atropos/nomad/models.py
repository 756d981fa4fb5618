"""Typed models of the part of a Nomad job this product submits.

Field names are snake_case in Python and PascalCase on the wire (`Job.to_api()`), exactly as
Nomad's JSON job API spells them (`ID`, `CPU`, `MemoryMB`, `LTarget`...). Durations are
`timedelta` in Python and integer nanoseconds on the wire. Models forbid unknown fields, so a
misspelt field fails here instead of being silently dropped by Nomad's decoder.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

__all__ = [
    "Constraint",
    "Duration",
    "EphemeralDisk",
    "Job",
    "NetworkResource",
    "Port",
    "ReschedulePolicy",
    "Resources",
    "RestartPolicy",
    "ScalingPolicy",
    "Service",
    "ServiceCheck",
    "Task",
    "TaskGroup",
    "Template",
    "UpdateStrategy",
    "nanoseconds",
    "wire_name",
]

# Parts of a snake_case name that Nomad writes in capitals (`memory_mb` -> `MemoryMB`).
_ACRONYMS = {"id": "ID", "cpu": "CPU", "mb": "MB", "ip": "IP", "dns": "DNS", "cidr": "CIDR"}


def wire_name(field: str) -> str:
    """Nomad's JSON key for a snake_case field name."""
    return "".join(_ACRONYMS.get(part, part[:1].upper() + part[1:]) for part in field.split("_"))


def nanoseconds(value: timedelta) -> int:
    """A duration as Nomad's JSON carries it: integer nanoseconds."""
    return (value // timedelta(microseconds=1)) * 1000


def _duration_in(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return timedelta(microseconds=value // 1000)
    return value


Duration = Annotated[timedelta, BeforeValidator(_duration_in), PlainSerializer(nanoseconds, return_type=int)]
"""A duration: `timedelta` in Python, nanoseconds (int) in JSON; ints are read as nanoseconds."""


class NomadModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=wire_name,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


class Constraint(NomadModel):
    """`constraint { attribute, operator, value }`; e.g. `Constraint(l_target="${attr.kernel.name}",
    r_target="linux")`."""

    l_target: str = ""
    operand: str = "="
    r_target: str = ""


class Port(NomadModel):
    """A port of a group network: in `ReservedPorts` `value` is the static host port; in
    `DynamicPorts` Nomad picks the host port and `to` is the port inside a container network."""

    label: str
    value: int | None = None
    to: int | None = None
    host_network: str | None = None


class NetworkResource(NomadModel):
    mode: str | None = None
    dynamic_ports: list[Port] | None = None
    reserved_ports: list[Port] | None = None


class Resources(NomadModel):
    cpu: int = Field(default=1000, ge=1, description="MHz")
    memory_mb: int = Field(default=2048, ge=10)
    memory_max_mb: int | None = None


class RestartPolicy(NomadModel):
    """Restarts in place on the same node, before the allocation is declared failed."""

    attempts: int = 2
    interval: Duration = timedelta(minutes=5)
    delay: Duration = timedelta(seconds=5)
    mode: Literal["fail", "delay"] = "fail"


class ReschedulePolicy(NomadModel):
    """Replacement of a failed allocation, possibly on another node."""

    attempts: int = 3
    interval: Duration = timedelta(hours=1)
    delay: Duration = timedelta(seconds=10)
    delay_function: Literal["constant", "exponential", "fibonacci"] = "exponential"
    max_delay: Duration = timedelta(minutes=2)
    unlimited: bool = False


class UpdateStrategy(NomadModel):
    """Rolling updates judged by task states, so nothing waits on Consul health checks."""

    max_parallel: int = 1
    health_check: Literal["task_states", "checks", "manual"] = "task_states"
    min_healthy_time: Duration = timedelta(seconds=5)
    healthy_deadline: Duration = timedelta(minutes=5)
    progress_deadline: Duration = timedelta(minutes=10)
    auto_revert: bool = False


class ServiceCheck(NomadModel):
    name: str
    type: Literal["http", "tcp"] = "http"
    path: str | None = None
    interval: Duration = timedelta(seconds=10)
    timeout: Duration = timedelta(seconds=2)


class Service(NomadModel):
    """A service in Nomad's own catalog (`Provider: "nomad"`): no hidden Consul constraint."""

    name: str
    provider: Literal["nomad"] = "nomad"
    port_label: str
    tags: list[str] | None = None
    checks: list[ServiceCheck] | None = None


class ScalingPolicy(NomadModel):
    """Bounds `POST /v1/job/:id/scale` enforces; `enabled=False` keeps autoscalers away."""

    enabled: bool = False
    min: int = 0
    max: int


class EphemeralDisk(NomadModel):
    size_mb: int


class Template(NomadModel):
    """A file Nomad renders into the task's directory before the task starts (`template` block)."""

    embedded_tmpl: str
    dest_path: str
    change_mode: Literal["noop", "restart", "signal", "script"] | None = None
    perms: str | None = None


class Task(NomadModel):
    name: str
    driver: Literal["docker", "raw_exec"]
    config: dict[str, Any]
    env: dict[str, str] | None = None
    templates: list[Template] | None = None
    resources: Resources
    kill_signal: str | None = None
    kill_timeout: Duration | None = None
    meta: dict[str, str] | None = None


class TaskGroup(NomadModel):
    name: str
    count: int = Field(ge=0)
    constraints: list[Constraint] | None = None
    networks: list[NetworkResource] | None = None
    services: list[Service] | None = None
    restart_policy: RestartPolicy | None = None
    reschedule_policy: ReschedulePolicy | None = None
    update: UpdateStrategy | None = None
    scaling: ScalingPolicy | None = None
    ephemeral_disk: EphemeralDisk | None = None
    shutdown_delay: Duration | None = None
    meta: dict[str, str] | None = None
    tasks: list[Task]


class Job(NomadModel):
    id: str
    name: str
    type: Literal["service"] = "service"
    priority: int | None = None
    region: str | None = None
    namespace: str | None = None
    node_pool: str | None = None
    datacenters: list[str] | None = None
    constraints: list[Constraint] | None = None
    update: UpdateStrategy | None = None
    meta: dict[str, str] | None = None
    task_groups: list[TaskGroup]

    def to_json(self) -> dict[str, Any]:
        """The job as Nomad's JSON API spells it (PascalCase keys, durations in nanoseconds)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_api(self) -> dict[str, Any]:
        """The body of `POST /v1/jobs`: `{"Job": {...}}`."""
        return {"Job": self.to_json()}

    def group(self, name: str) -> TaskGroup:
        for group in self.task_groups:
            if group.name == name:
                return group
        raise KeyError(f"job {self.id} has no task group {name!r}")
