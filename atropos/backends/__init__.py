"""Backends (local, nomad, slurm): how a pool's sandbox servers come to exist and go away. One config model per kind,
told apart by `type`, each building its backend (`config.build(spec)`)."""

from typing import Annotated

from pydantic import Field

from atropos.backends.base import SandboxBackend, ServerInfo, ServerSpec
from atropos.backends.local import LocalBackend, LocalBackendConfig
from atropos.backends.nomad import NomadBackend, NomadBackendConfig
from atropos.backends.slurm import SlurmBackend, SlurmBackendConfig

BackendConfig = Annotated[LocalBackendConfig | NomadBackendConfig | SlurmBackendConfig, Field(discriminator="type")]

__all__ = [
    "BackendConfig",
    "LocalBackend",
    "LocalBackendConfig",
    "NomadBackend",
    "NomadBackendConfig",
    "SandboxBackend",
    "ServerInfo",
    "ServerSpec",
    "SlurmBackend",
    "SlurmBackendConfig",
]
