"""`SandboxJobSpec`: everything the job builder needs to know about one pool's sandbox job."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from atropos.host import OwnerMeta
from atropos.images.apptainer import DEFAULT_CONTAINER_PORT, SERVER_COMMAND
from atropos.images.docker_security import NODE_SECCOMP_PROFILE
from atropos.nomad.models import Constraint, ReschedulePolicy, RestartPolicy, UpdateStrategy
from atropos.sandbox.slot_limits import SlotLimits

__all__ = ["DEFAULT_BASE_PORT", "Driver", "SandboxJobSpec"]

Driver = Literal["docker", "singularity", "process"]

DEFAULT_BASE_PORT = 19000
"""Static host port of the first container of a `singularity`/`process` job (see builder.py): below
Nomad's dynamic port range (20000-32000) and the kernel's ephemeral range (32768-60999)."""

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\Z")


def token_variable(job_id: str) -> str:
    """The Nomad Variable holding a job's token (see `SandboxJobSpec.token_variable`)."""
    return f"nomad/jobs/{job_id}"


class SandboxJobSpec(BaseModel):
    """One pool's job. `count` containers, each a sandbox server with `slots_per_container` slots."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = "atropos-sandbox"
    driver: Driver = "process"
    count: int = Field(default=1, ge=0, description="number of containers (allocations)")
    slots_per_container: int = Field(default=8, ge=1, le=4096)
    token: SecretStr = Field(
        description="bearer token every request to the servers must carry; it never goes into the job: the pool "
        "writes it to the Nomad Variable `token_variable` and a template renders it into the task's secrets dir")
    task_user: str | None = Field(
        default="nobody",
        description="raw_exec drivers (singularity, process): a task that starts as root (a root Nomad agent) "
        "becomes this unprivileged user before apptainer or the server starts; None keeps the agent's user")
    docker_seccomp_profile: str = Field(
        default=NODE_SECCOMP_PROFILE,
        description="docker driver: path on the client nodes of the seccomp profile the sandbox container needs "
        "(`atropos-sandbox image seccomp-profile` prints it)")

    # where the server comes from
    image: str = Field(default="atropos-sandbox:latest", description="docker image (driver docker)")
    singularity_image: str | None = Field(
        default=None, description="SIF path on the Nomad nodes (driver singularity)")
    apptainer_binary: str = Field(default="apptainer", description="`apptainer` or `singularity`")
    apptainer_args: list[str] = Field(default_factory=list, description="extra flags, e.g. --nv")
    apptainer_cache_dir: str | None = None
    apptainer_workdir: str | None = Field(
        default=None, description="host dir for the container's private /tmp and $HOME")
    apptainer_tun: bool = Field(
        default=True, description="bind the node's /dev/net/tun (network mode public); False for nodes without one")
    apptainer_containall: bool = Field(
        default=True, description="--containall; False uses --contain --cleanenv (no PID namespace)")
    server_command: list[str] = Field(
        default_factory=lambda: list(SERVER_COMMAND),
        description="the server command: on the node (process) or inside the image (docker, singularity)")
    server_env: dict[str, str] = Field(default_factory=dict, description="extra environment of the server")
    docker_config: dict[str, Any] = Field(
        default_factory=dict,
        description="extra docker driver options, added to (and overriding) what the sandbox needs "
        "(atropos.images.docker_security.nomad_docker_config)")

    # ports
    container_port: int = Field(default=DEFAULT_CONTAINER_PORT, ge=1, le=65535,
                                description="the server's port inside a docker container")
    base_port: int = Field(default=DEFAULT_BASE_PORT, ge=1, le=65535,
                           description="static host port of container 0 (singularity, process)")
    static_ports: bool = Field(
        default=True,
        description="singularity/process: one task group per container with static port base_port+i; "
        "False: one group with a Nomad-chosen (dynamic) host port")

    # server settings
    isolation: Literal["auto", "bwrap", "none"] = "auto"
    network: Literal["auto", "public", "allow", "deny"] = "auto"
    command_timeout: float | None = Field(default=None, gt=0, description="server --timeout")
    max_output: int | None = Field(default=None, ge=1024, description="server --max-output")
    limits: SlotLimits | None = Field(default=None, description="server --limit-* (None: the server's defaults)")

    # placement and resources
    cpu: int = Field(default=1000, ge=1, description="MHz per container")
    memory: int = Field(default=2048, ge=10, description="MB per container")
    memory_max: int | None = Field(default=None, ge=10, description="MB; oversubscription limit")
    disk_mb: int | None = Field(default=None, ge=1, description="ephemeral disk per allocation")
    datacenters: list[str] = Field(default_factory=list)
    namespace: str | None = None
    region: str | None = None
    node_pool: str | None = None
    priority: int | None = Field(default=None, ge=1, le=100)
    constraints: list[Constraint] = Field(default_factory=list)

    # lifecycle
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    reschedule: ReschedulePolicy = Field(default_factory=ReschedulePolicy)
    update: UpdateStrategy = Field(default_factory=UpdateStrategy)
    kill_timeout: timedelta = timedelta(seconds=10)
    service: bool = Field(default=False, description="register in Nomad's service catalog, with a check")
    meta: dict[str, str] = Field(default_factory=dict)
    owner: OwnerMeta | None = Field(
        default_factory=OwnerMeta.current,
        description="the process that owns the job (for cleanup); None for a job run by hand")

    @model_validator(mode="after")
    def _check(self) -> SandboxJobSpec:
        if not _JOB_ID.match(self.job_id):
            raise ValueError(f"job_id {self.job_id!r}: use letters, digits, '_', '.', '-' (max 128)")
        if self.driver == "singularity" and not self.singularity_image:
            raise ValueError("driver singularity needs singularity_image (a SIF path on the nodes)")
        if not self.server_command:
            raise ValueError("server_command must not be empty")
        if self.task_user is not None and not _USER.match(self.task_user):
            raise ValueError(f"task_user {self.task_user!r}: a user name or uid (letters, digits, '_', '.', '-')")
        if self.uses_static_ports and self.base_port + max(self.count, 1) - 1 > 65535:
            raise ValueError(f"base_port {self.base_port} + {self.count} containers exceeds port 65535")
        if not self.token.get_secret_value():
            raise ValueError("token must not be empty: the servers listen on a network port")
        return self

    @property
    def token_variable(self) -> str:
        """The Nomad Variable holding the token: under `nomad/jobs/<job>`, which the job's tasks may
        read by Nomad's default workload-identity policy and nothing else needs to."""
        return token_variable(self.job_id)

    @property
    def uses_static_ports(self) -> bool:
        """True when each container is its own task group with a static port."""
        return self.driver != "docker" and self.static_ports

    def with_count(self, count: int) -> SandboxJobSpec:
        return self.model_validate({**self.model_dump(), "count": count,
                                    "token": self.token.get_secret_value()})
