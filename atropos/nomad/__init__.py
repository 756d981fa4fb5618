"""Nomad: the sandbox job builder (docker | singularity | process), the API client, and the
lifecycle a pool needs (deploy, scale, find servers, stop, clean up after dead owners).

The client and what uses it (python-nomad, requests, httpx, tenacity) load on first use of their
names here, so that building or reading a job spec loads none of them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from atropos.host import OwnerMeta, owner_state
from atropos.nomad.allocations import allocation_address, allocation_endpoint
from atropos.nomad.builder import GROUP_NAME, PORT_LABEL, TASK_NAME, create_sandbox_job, group_names, static_port
from atropos.nomad.errors import (
    NomadAllocationFailed,
    NomadConnectionError,
    NomadError,
    NomadNotFound,
    NomadPlacementFailed,
    NomadRequestError,
    NomadServerError,
    NomadWaitTimeout,
)
from atropos.nomad.models import Constraint, Job
from atropos.nomad.responses import Allocation, AllocationEndpoint, AllocationStub
from atropos.nomad.settings import NomadSettings
from atropos.nomad.spec import DEFAULT_BASE_PORT, SandboxJobSpec

if TYPE_CHECKING:
    from atropos.nomad.client import NomadClient
    from atropos.nomad.lifecycle import (
        cleanup_dead_owner_jobs,
        deploy_sandbox_job,
        find_dead_owner_jobs,
        health_probe,
        running_endpoints,
        scale_sandbox_job,
        stop_sandbox_job,
    )
    from atropos.nomad.waiting import WaitProgress, wait_for_allocations

_LAZY = {
    "NomadClient": "client",
    **dict.fromkeys(
        (
            "cleanup_dead_owner_jobs",
            "deploy_sandbox_job",
            "find_dead_owner_jobs",
            "health_probe",
            "running_endpoints",
            "scale_sandbox_job",
            "stop_sandbox_job",
        ),
        "lifecycle",
    ),
    "WaitProgress": "waiting",
    "wait_for_allocations": "waiting",
}

__all__ = [
    "DEFAULT_BASE_PORT",
    "GROUP_NAME",
    "PORT_LABEL",
    "TASK_NAME",
    "Allocation",
    "AllocationEndpoint",
    "AllocationStub",
    "Constraint",
    "Job",
    "NomadAllocationFailed",
    "NomadClient",
    "NomadConnectionError",
    "NomadError",
    "NomadNotFound",
    "NomadPlacementFailed",
    "NomadRequestError",
    "NomadServerError",
    "NomadSettings",
    "NomadWaitTimeout",
    "OwnerMeta",
    "SandboxJobSpec",
    "WaitProgress",
    "allocation_address",
    "allocation_endpoint",
    "cleanup_dead_owner_jobs",
    "create_sandbox_job",
    "deploy_sandbox_job",
    "find_dead_owner_jobs",
    "group_names",
    "health_probe",
    "owner_state",
    "running_endpoints",
    "scale_sandbox_job",
    "static_port",
    "stop_sandbox_job",
    "wait_for_allocations",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"atropos.nomad.{module}"), name)
