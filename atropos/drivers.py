"""Drivers: what a sandbox server runs in. One model per kind, told apart by `type`.

- `process`: the server itself, a plain process on the node;
- `docker`: a Docker container of `image`, the server on `container_port` inside;
- `singularity`: `apptainer exec <image> atropos-sandbox server ...`; `image` is a SIF path or a
  reference (`docker://...`, `library://...`, `oras://...`) pulled per `pull_policy`.

Every backend (local, Nomad, SLURM) takes a `DriverConfig` (the union); `nest_driver_keys` maps the
flat keys written before drivers had their own models (`driver="singularity", singularity_image=...`)
onto it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from atropos.errors import PoolConfigError
from atropos.images.cache import PullPolicy
from atropos.images.references import is_reference
from atropos.sandbox.settings import DEFAULT_PORT

DriverName = Literal["process", "docker", "singularity"]


class ProcessDriver(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["process"] = "process"

    def check_here(self) -> None:
        """Refuse what cannot work from this machine (nothing for a plain process)."""

    def describe(self) -> str:
        return "process"


class DockerDriver(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["docker"] = "docker"
    image: str = Field(min_length=1, description="Docker image with atropos-sandbox, e.g. atropos-sandbox:latest")
    container_port: int = Field(default=DEFAULT_PORT, ge=1, le=65535, description="the server's port inside")

    def check_here(self) -> None:
        pass

    def describe(self) -> str:
        return f"docker {self.image}"


class SingularityDriver(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["singularity"] = "singularity"
    image: str = Field(min_length=1, description="SIF path, or a reference pulled per `pull_policy`")
    pull_policy: PullPolicy = "missing"
    apptainer_binary: str | None = Field(default=None, description="apptainer/singularity binary; found if unset")

    def check_here(self) -> None:
        """A SIF that is neither a file here nor a reference can never be run."""
        if not is_reference(self.image) and not os.path.exists(os.path.expanduser(self.image)):
            raise PoolConfigError(f"singularity_image {self.image!r} does not exist and is not a pullable reference")

    def describe(self) -> str:
        return f"singularity {self.image}"


DriverConfig = Annotated[ProcessDriver | DockerDriver | SingularityDriver, Field(discriminator="type")]

# flat key -> (driver it belongs to, field of that driver's model)
_FLAT_KEYS: dict[str, tuple[str, str]] = {
    "image": ("docker", "image"),
    "container_port": ("docker", "container_port"),
    "singularity_image": ("singularity", "image"),
    "pull_policy": ("singularity", "pull_policy"),
    "apptainer_binary": ("singularity", "apptainer_binary"),
}
MISSING_IMAGE: dict[str, str] = {
    "docker": "driver 'docker' needs `image` (e.g. driver={'type': 'docker', 'image': 'atropos-sandbox:latest'})",
    "singularity": "driver 'singularity' needs `singularity_image` (--singularity-image): a .sif path or a "
    "reference such as docker://ghcr.io/org/atropos-sandbox:latest",
}


def nest_driver_keys(
    values: dict[str, Any],
    *,
    owner: str,
    docker_image: str | None = None,
    missing_image: Mapping[str, str] = MISSING_IMAGE,
    warn: bool = True,
) -> dict[str, Any]:
    """`driver="x"` plus the flat keys of that driver -> `driver={"type": "x", ...}`, with a
    DeprecationWarning naming the flat keys. Flat keys of another driver than the chosen one are
    dropped (they were ignored before drivers had models). `docker_image`: the image of a docker
    driver that names none (None: one is required); `missing_image`: what to say when a driver
    that needs an image has none; `warn=False` for flat command-line flags, which are not deprecated."""
    flat = {k: values.pop(k) for k in list(values) if k in _FLAT_KEYS}
    driver = values.get("driver", "process")
    if isinstance(driver, str):
        driver = {"type": driver}
    elif isinstance(driver, BaseModel):
        driver = driver.model_dump()
    if not isinstance(driver, dict):
        return {**values, "driver": driver}  # pydantic says what is wrong with it
    kind = driver.get("type")
    moved = {_FLAT_KEYS[k][1]: v for k, v in flat.items() if _FLAT_KEYS[k][0] == kind and v is not None}
    if docker_image is not None and kind == "docker":
        moved.setdefault("image", docker_image)
    if flat and warn:
        warnings.warn(
            f"{owner}: flat driver keys {', '.join(sorted(flat))} are deprecated; write "
            f"driver={{'type': {kind!r}, ...}}",
            DeprecationWarning,
            stacklevel=4,
        )
    driver = {**moved, **driver}
    if isinstance(kind, str) and kind in missing_image and not driver.get("image"):
        raise PoolConfigError(missing_image[kind])
    return {**values, "driver": driver}
