"""`SandboxJobSpec`: everything the job builder needs to know about one pool's sandbox job."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from atropos.drivers import DockerDriver, DriverConfig, ProcessDriver, nest_driver_keys
from atropos.host import OwnerMeta
from atropos.images.apptainer import SERVER_COMMAND
from atropos.images.docker_security import NODE_SECCOMP_PROFILE
from atropos.nomad.models import Constraint, ReschedulePolicy, RestartPolicy, UpdateStrategy
from atropos.sandbox.settings import ServerSettings

__all__ = ["DEFAULT_BASE_PORT", "DEFAULT_DOCKER_IMAGE", "SandboxJobSpec"]

DEFAULT_DOCKER_IMAGE = "atropos-sandbox:latest"
# what a job's servers are told even where it is their default (jobs have always said so)
_SERVER_DEFAULTS: dict[str, Any] = {"slots": 8, "isolation": "auto", "network": "auto"}
# the flat shorthand of `server`: key -> ServerSettings field
_MISSING_IMAGE = {
    "singularity": "driver singularity needs singularity_image (--singularity-image: a SIF path on the nodes)"
}
_FLAT_SERVER_KEYS = {
    "slots_per_container": "slots",
    "isolation": "isolation",
    "network": "network",
    "command_timeout": "timeout",
    "max_output": "max_output",
    "limits": "limits",
    "root": "root",
    "bind_ro": "bind_ro",
    "bind": "bind",
}

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
    driver: DriverConfig = Field(
        default_factory=ProcessDriver,
        description="what each server runs in; a singularity image is a SIF path on the nodes",
    )
    count: int = Field(default=1, ge=0, description="number of containers (allocations)")
    server: ServerSettings = Field(
        default_factory=lambda: ServerSettings(**_SERVER_DEFAULTS),
        description="each server's settings (slots, isolation, network, timeouts, limits); where it listens "
        "and keeps its data is the job's",
    )
    token: SecretStr = Field(
        description="bearer token every request to the servers must carry; it never goes into the job: the pool "
        "writes it to the Nomad Variable `token_variable` and a template renders it into the task's secrets dir"
    )
    task_user: str | None = Field(
        default="nobody",
        description="raw_exec drivers (singularity, process): a task that starts as root (a root Nomad agent) "
        "becomes this unprivileged user before apptainer or the server starts; None keeps the agent's user",
    )
    docker_seccomp_profile: str = Field(
        default=NODE_SECCOMP_PROFILE,
        description="docker driver: path on the client nodes of the seccomp profile the sandbox container needs "
        "(`atropos-sandbox image seccomp-profile` prints it)",
    )

    # where the server comes from (see also `driver`)
    apptainer_args: list[str] = Field(default_factory=list, description="extra flags, e.g. --nv")
    apptainer_cache_dir: str | None = None
    apptainer_workdir: str | None = Field(
        default=None, description="host dir for the container's private /tmp and $HOME"
    )
    apptainer_tun: bool = Field(
        default=True, description="bind the node's /dev/net/tun (network mode public); False for nodes without one"
    )
    apptainer_containall: bool = Field(
        default=True, description="--containall; False uses --contain --cleanenv (no PID namespace)"
    )
    server_command: list[str] = Field(
        default_factory=lambda: list(SERVER_COMMAND),
        description="the server command: on the node (process) or inside the image (docker, singularity)",
    )
    server_env: dict[str, str] = Field(default_factory=dict, description="extra environment of the server")
    docker_config: dict[str, Any] = Field(
        default_factory=dict,
        description="extra docker driver options, added to (and overriding) what the sandbox needs "
        "(atropos.images.docker_security.nomad_docker_config)",
    )

    # ports (a docker server's port inside its container: `driver.container_port`)
    base_port: int = Field(
        default=DEFAULT_BASE_PORT, ge=1, le=65535, description="static host port of container 0 (singularity, process)"
    )
    static_ports: bool = Field(
        default=True,
        description="singularity/process: one task group per container with static port base_port+i; "
        "False: one group with a Nomad-chosen (dynamic) host port",
    )
    moved: dict[int, int] = Field(
        default_factory=dict,
        description="static ports: container index -> times it moved off a lost node (its group is then "
        "sandbox-<i>-r<n>, see atropos.nomad.builder)",
    )

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
        description="the process that owns the job (for cleanup); None for a job run by hand",
    )

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, values: Any) -> Any:
        """Flat driver and server keys (`driver="singularity", singularity_image=..., slots_per_container=...`)
        are a shorthand of the nested `driver` and `server` (what `job render`'s flags and most hand-written
        specs use), so they map without a warning."""
        if not isinstance(values, dict):
            return values
        values = nest_driver_keys(
            dict(values),
            owner="SandboxJobSpec",
            docker_image=DEFAULT_DOCKER_IMAGE,
            missing_image=_MISSING_IMAGE,
            warn=False,
        )
        flat = {_FLAT_SERVER_KEYS[k]: values.pop(k) for k in list(values) if k in _FLAT_SERVER_KEYS}
        flat = {k: v for k, v in flat.items() if v is not None}
        if flat:
            server = values.get("server")
            current = (
                server.model_dump(exclude_unset=True) if isinstance(server, ServerSettings) else dict(server or {})
            )
            values["server"] = {**_SERVER_DEFAULTS, **current, **flat}
        return values

    @model_validator(mode="after")
    def _check(self) -> SandboxJobSpec:
        if not _JOB_ID.match(self.job_id):
            raise ValueError(f"job_id {self.job_id!r}: use letters, digits, '_', '.', '-' (max 128)")
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
        return not isinstance(self.driver, DockerDriver) and self.static_ports

    def with_count(self, count: int) -> SandboxJobSpec:
        # the fields as they are (not dumped): the server settings keep which options were set
        return self.model_validate({**dict(self), "count": count})
