"""SlotPoolConfig: everything that decides how sandbox servers come to exist and how slots are leased.

`backend` and `driver` are models of their own, one per kind (`type` tells them apart):
`SlotPoolConfig(backend={"type": "nomad", "address": ...}, driver={"type": "singularity",
"image": "x.sif"})`. The flat keys written before that (`backend="nomad", nomad_address=...,
driver="singularity", singularity_image=...`) still work, with a DeprecationWarning.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from atropos.backends import BackendConfig, LocalBackendConfig, ServerSpec
from atropos.drivers import DriverConfig, ProcessDriver, nest_driver_keys
from atropos.errors import PoolConfigError
from atropos.pulls import PullPolicy
from atropos.sandbox.limits import SlotLimits
from atropos.sandbox.runner_choice import RunnerOption
from atropos.sandbox.settings import ServerSettings, problem_of

# flat key -> field of NomadBackendConfig
_FLAT_NOMAD_KEYS = {
    "nomad_address": "address",
    "nomad_token": "token",
    "nomad_namespace": "namespace",
    "nomad_region": "region",
    "job_id": "job_id",
    "datacenters": "datacenters",
    "node_pool": "node_pool",
    "cpu": "cpu",
    "memory": "memory",
    "static_port_base": "static_port_base",
    "purge_on_exit": "purge_on_exit",
}


def parse_backend_options(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` settings of a backend (`partition=cpu`, `time_limit=10`, `cpus_per_server=4`,
    `sbatch_args=["--exclusive"]`): a value that starts with `[` or `{` is JSON, any other is text
    (which the setting's own type reads: `4` for a number, `10` for a SLURM time)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise PoolConfigError(f"backend option {pair!r}: write KEY=VALUE, e.g. partition=cpu")
        if text.lstrip()[:1] in ("[", "{"):
            try:
                options[key.strip()] = json.loads(text)
            except ValueError as exc:
                raise PoolConfigError(f"backend option {key.strip()}: not JSON ({exc})") from None
        else:
            options[key.strip()] = text
    return options


class SlotPoolConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backend: BackendConfig = Field(default_factory=LocalBackendConfig, description="where servers run")
    driver: DriverConfig = Field(default_factory=ProcessDriver, description="what each server runs in")

    slots_per_container: int = Field(default=8, ge=1, le=4096)
    min_containers: int = Field(default=1, ge=0, le=1000)
    max_containers: int = Field(default=4, ge=1, le=1000)

    isolation: Literal["auto", "bwrap", "none"] = "auto"
    # auto: each slot its own network namespace reaching public addresses only (public) where pasta and
    # nftables work on the node, else no network (deny); allow: the node's network, loopback services included
    network: Literal["auto", "public", "allow", "deny"] = "auto"

    # what a slot's root holds (see `atropos-sandbox server --help`); None: the server's default, `system` on
    # a node, `image` in the project's Docker image and SIF
    root: Literal["system", "image", "host"] | None = None
    bind_ro: list[str] = Field(default_factory=list, description="SRC[:DST] every slot sees read-only")
    bind: list[str] = Field(default_factory=list, description="SRC[:DST] every slot sees writable (all share it)")

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
    retire_before: float = Field(
        default=120.0,
        ge=0,
        description="seconds before its backend stops a server (a SLURM time limit) at which it takes no new "
        "leases and a replacement starts; 0: off",
    )
    warm_slots: int | None = Field(
        default=None,
        ge=0,
        description="per server: slots whose sandbox starts before their first call, refilled as they are used; "
        "None: the server's default (up to 32); 0: each slot starts on its first call",
    )
    hibernate_after: float | None = Field(
        default=None,
        ge=0,
        description="per server: seconds after its last call before an idle slot's runner sleeps until "
        "its next call (see `atropos-sandbox server --help`); None: the server's default (30); 0: never",
    )
    runner: RunnerOption | None = Field(
        default=None,
        description="per server: the slots' runner (compiled, python, or auto: compiled where it was built; see "
        "`atropos-sandbox server --help`); None: the server's default (auto)",
    )
    image_cache: str | None = Field(
        default=None,
        description="per server: where task images (`acquire(image=...)`) are unpacked; servers of a node that name "
        "the same dir unpack each image once; None: the server's data dir",
    )
    image_cache_gb: float | None = Field(
        default=None,
        gt=0,
        description="per server: past this size the least recently used images no slot uses are removed; "
        "None: the server's default (20)",
    )
    image_pull: PullPolicy | None = Field(
        default=None,
        description="per server: when a registry's task image (docker://) is pulled: missing, always, never; "
        "None: the server's default (missing)",
    )
    max_output: int = Field(default=1 << 20, ge=1024, description="bytes kept per stream per call")
    run_as: str | None = Field(
        default="nobody",
        description="what starts as root (this pool's apptainer or server processes, a root Nomad agent's tasks) "
        "becomes this unprivileged user first; None: the launcher keeps root and the server gives it up itself",
    )
    limits: SlotLimits = Field(default_factory=SlotLimits, description="resource limits of every slot")

    @classmethod
    def from_flags(cls, *, backend_options: dict[str, Any] | None = None, **values: Any) -> SlotPoolConfig:
        """From flat command-line settings (`demo`, the Atropos environment's `--env.*`): the flat
        keys are those flags' names, so they map without a deprecation warning. `backend_options`
        are settings of the backend named by `backend` (e.g. a SLURM partition)."""
        if backend_options:
            kind = values.get("backend") or "local"
            values["backend"] = {**backend_options, "type": kind}
        return cls.model_validate(values, context={"flags": True})

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, values: Any, info: ValidationInfo) -> Any:
        if not isinstance(values, dict):
            return values
        warn = not (info.context or {}).get("flags")
        values = nest_driver_keys(dict(values), owner="SlotPoolConfig", warn=warn)
        flat = {_FLAT_NOMAD_KEYS[k]: values.pop(k) for k in list(values) if k in _FLAT_NOMAD_KEYS}
        backend = values.get("backend", "local")
        if isinstance(backend, str):
            backend = {"type": backend}
        elif isinstance(backend, BaseModel):
            backend = backend.model_dump()
        flat = {k: v for k, v in flat.items() if v is not None}
        if flat and isinstance(backend, dict):
            if backend.get("type") != "nomad":
                raise PoolConfigError(
                    f"{', '.join(sorted(flat))}: settings of backend 'nomad', not of {backend.get('type')!r}"
                )
        if flat and isinstance(backend, dict) and warn:
            warnings.warn(
                f"SlotPoolConfig: flat nomad keys are deprecated; write backend={{'type': 'nomad', "
                f"{', '.join(repr(k) + ': ...' for k in sorted(flat))}}}",
                DeprecationWarning,
                stacklevel=3,
            )
        if flat and isinstance(backend, dict):
            backend = {**flat, **backend}
        return {**values, "backend": backend}

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
        self.driver.check_here()
        self.server_spec()  # a bad bind or root says so now, not when the first server starts
        return self

    @property
    def initial_containers(self) -> int:
        return max(self.min_containers, 1)

    def server_spec(self) -> ServerSpec:
        """What every server of this pool is, for its backend."""
        values: dict[str, Any] = {
            "slots": self.slots_per_container,
            "isolation": self.isolation,
            "network": self.network,
            "timeout": self.tool_timeout,
            "max_output": self.max_output,
            "limits": self.limits,
        }
        if self.warm_slots is not None:  # only where set: a server image from before the option still starts
            values["warm_slots"] = self.warm_slots
        if self.hibernate_after is not None:
            values["hibernate_after"] = self.hibernate_after
        if self.runner is not None:
            values["runner"] = self.runner
        if self.root is not None:
            values["root"] = self.root
        if self.bind_ro:
            values["bind_ro"] = tuple(self.bind_ro)
        if self.bind:
            values["bind"] = tuple(self.bind)
        if self.image_cache is not None:
            values["image_cache"] = self.image_cache
        if self.image_cache_gb is not None:
            values["image_cache_gb"] = self.image_cache_gb
        if self.image_pull is not None:
            values["image_pull"] = self.image_pull
        try:
            settings = ServerSettings.model_validate(values)
        except ValidationError as exc:
            raise PoolConfigError("; ".join(problem_of(e) for e in exc.errors())) from None
        return ServerSpec(driver=self.driver, settings=settings, run_as=self.run_as, start_timeout=self.start_timeout)
