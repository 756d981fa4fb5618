"""Backends (local, nomad, slurm): how a pool's sandbox servers come to exist and go away. One config model per kind,
told apart by `type`, each building its backend (`config.build(spec)`). A backend's own module is imported when
it is built or named (`atropos.backends.NomadBackend`): a local pool loads no cluster client."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from atropos.backends.base import SandboxBackend, ServerInfo, ServerSpec
from atropos.backends.local import LocalBackend, LocalBackendConfig
from atropos.backends.nomad_config import NomadBackendConfig
from atropos.backends.slurm import SlurmBackend, SlurmBackendConfig

if TYPE_CHECKING:
    from atropos.backends.nomad import NomadBackend

BackendConfig = Annotated[LocalBackendConfig | NomadBackendConfig | SlurmBackendConfig, Field(discriminator="type")]

BACKEND_KINDS: tuple[str, ...] = tuple(
    str(config.model_fields["type"].default) for config in (LocalBackendConfig, NomadBackendConfig, SlurmBackendConfig)
)
"""The backends' names (`type`), as `--backend` and the environment's `backend` take them."""

if TYPE_CHECKING:
    BackendKind = str
else:  # the same names as a Literal, for the models and command lines that offer them as choices
    BackendKind = Literal[BACKEND_KINDS]

__all__ = [
    "BACKEND_KINDS",
    "BackendConfig",
    "BackendKind",
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


def __getattr__(name: str) -> Any:
    if name == "NomadBackend":
        return importlib.import_module("atropos.backends.nomad").NomadBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
