"""What a Nomad backend is configured with, apart from the backend itself: choosing Nomad in a pool's
config imports no Nomad client (python-nomad, requests, httpx, tenacity) until the pool starts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from atropos.backends.base import ServerSpec
from atropos.nomad.settings import NomadSettings
from atropos.nomad.spec import DEFAULT_BASE_PORT

if TYPE_CHECKING:
    from atropos.backends.nomad import NomadBackend

__all__ = ["NomadBackendConfig"]


class NomadBackendConfig(BaseModel):
    """Servers as allocations of one Nomad job. Unset connection values come from NOMAD_ADDR,
    NOMAD_TOKEN, NOMAD_NAMESPACE, NOMAD_REGION (see atropos.nomad.settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["nomad"] = "nomad"
    address: str | None = None
    token: str | None = None
    namespace: str | None = None
    region: str | None = None
    job_id: str = Field(default="atropos-sandbox", description="prefix of the job id (`<job_id>-<8 hex>`)")
    datacenters: list[str] = Field(default_factory=lambda: ["*"])
    node_pool: str | None = None
    cpu: int = Field(default=2000, ge=100, description="MHz per container")
    memory: int = Field(default=4096, ge=128, description="MB per container")
    static_port_base: int = Field(
        default=DEFAULT_BASE_PORT,
        ge=1024,
        le=65000,
        description="static host port of container 0 for singularity/process jobs (container i: base + i); "
        "below Nomad's dynamic range 20000-32000",
    )
    purge_on_exit: bool = True

    def build(self, spec: ServerSpec) -> NomadBackend:
        from atropos.backends.nomad import NomadBackend  # python-nomad and its HTTP stack: only when used

        return NomadBackend(spec, self)

    def settings(self) -> NomadSettings:
        return NomadSettings.from_env(
            address=self.address, token=self.token, namespace=self.namespace, region=self.region
        )
