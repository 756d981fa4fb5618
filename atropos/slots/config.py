"""SlotPoolConfig: everything that decides how sandbox servers come to exist and how slots are leased."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from atropos.images.references import is_reference
from atropos.sandbox.slot_limits import SlotLimits
from atropos.slots.errors import PoolConfigError

Driver = Literal["process", "docker", "singularity"]
Backend = Literal["local", "nomad"]


class SlotPoolConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backend: Backend = "local"
    driver: Driver = "process"
    image: str | None = Field(default=None, description="Docker image (driver docker)")
    singularity_image: str | None = Field(
        default=None, description="SIF path, or a reference pulled per `pull_policy` (driver singularity)"
    )
    pull_policy: Literal["never", "always", "missing"] = "missing"
    apptainer_binary: str | None = Field(default=None, description="apptainer/singularity binary; found if unset")

    slots_per_container: int = Field(default=8, ge=1, le=4096)
    min_containers: int = Field(default=1, ge=0, le=1000)
    max_containers: int = Field(default=4, ge=1, le=1000)

    isolation: Literal["auto", "bwrap", "none"] = "auto"
    # auto: each slot its own network namespace reaching public addresses only (public) where pasta
    # works on the node, else no network (deny); allow: the node's network, loopback services included
    network: Literal["auto", "public", "allow", "deny"] = "auto"

    tool_timeout: float = Field(default=120.0, gt=0, description="default timeout of one tool call, seconds")
    acquire_timeout: float = Field(default=600.0, gt=0, description="default wait for a free slot, seconds")
    start_timeout: float = Field(default=300.0, gt=0, description="wait for servers to become healthy, seconds")
    lease_ttl: float | None = Field(
        default=900.0, gt=0, description="reclaim a lease with no call or heartbeat for this long; None: never"
    )
    health_interval: float = Field(default=0.5, gt=0, description="server liveness probe period, seconds")
    health_timeout: float = Field(
        default=2.0, gt=0, description="a server unanswering for this long is lost (a refused connection: at once)"
    )
    scale_cooldown: float = Field(default=30.0, ge=0, description="min seconds between scaling actions")
    idle_scale_down: float = Field(default=120.0, ge=0, description="scale down after slots idle this long")
    max_output: int = Field(default=1 << 20, ge=1024, description="bytes kept per stream per call")
    run_as: str | None = Field(
        default="nobody",
        description="what starts as root (this pool's apptainer or server processes, a root Nomad agent's tasks) "
        "becomes this unprivileged user first; None: the launcher keeps root and the server gives it up itself")
    limits: SlotLimits = Field(default_factory=SlotLimits, description="resource limits of every slot")

    # Nomad settings; unset values come from NOMAD_ADDR, NOMAD_NAMESPACE, ... (see atropos.nomad)
    nomad_address: str | None = None
    nomad_token: str | None = None
    nomad_namespace: str | None = None
    nomad_region: str | None = None
    job_id: str = "atropos-sandbox"
    datacenters: list[str] = Field(default_factory=lambda: ["*"])
    node_pool: str | None = None
    cpu: int = Field(default=2000, ge=100, description="MHz per container")
    memory: int = Field(default=4096, ge=128, description="MB per container")
    container_port: int = Field(default=8080, ge=1, le=65535, description="server port inside a docker container")
    static_port_base: int = Field(
        default=19000, ge=1024, le=65000,
        description="static host port of container 0 for singularity/process jobs (container i: base + i); "
        "below Nomad's dynamic range 20000-32000",
    )
    purge_on_exit: bool = True

    @field_validator("run_as", mode="before")
    @classmethod
    def _no_user(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @model_validator(mode="after")
    def _check(self) -> SlotPoolConfig:
        if self.min_containers > self.max_containers:
            raise PoolConfigError(
                f"min_containers ({self.min_containers}) is above max_containers ({self.max_containers})"
            )
        if self.driver == "docker" and not self.image:
            raise PoolConfigError("driver 'docker' needs `image` (e.g. image='atropos-sandbox:latest')")
        if self.driver == "singularity":
            sif = self.singularity_image
            if not sif:
                raise PoolConfigError(
                    "driver 'singularity' needs `singularity_image`: a .sif path or a reference such as "
                    "docker://ghcr.io/org/atropos-sandbox:latest"
                )
            if not is_reference(sif) and not os.path.exists(os.path.expanduser(sif)):
                raise PoolConfigError(f"singularity_image {sif!r} does not exist and is not a pullable reference")
        return self

    @property
    def initial_containers(self) -> int:
        return max(self.min_containers, 1)
