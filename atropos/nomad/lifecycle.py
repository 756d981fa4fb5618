"""What a pool does with its sandbox job: deploy, find the servers, scale, stop, and clean up the
jobs of pools that died without stopping theirs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from atropos.host import owner_state
from atropos.nomad.allocations import by_index
from atropos.nomad.builder import GROUP_NAME, TOKEN_KEY, create_sandbox_job
from atropos.nomad.client import NomadClient
from atropos.nomad.errors import NomadNotFound, NomadRequestError
from atropos.nomad.responses import AllocationEndpoint, JobStub
from atropos.nomad.spec import SandboxJobSpec, token_variable
from atropos.nomad.waiting import Probe, ProgressCallback, wait_for_allocations
from atropos.sandbox.client import ServerClient

__all__ = [
    "cleanup_dead_owner_jobs",
    "deploy_sandbox_job",
    "find_dead_owner_jobs",
    "health_probe",
    "node_answers",
    "running_endpoints",
    "scale_sandbox_job",
    "stop_sandbox_job",
]

log = logging.getLogger("atropos.nomad")

SANDBOX_KIND = "sandbox"


def health_probe(timeout: float = 2.0) -> Probe:
    """A probe for `wait_for_allocations`: the server answers `GET /health` with 200."""

    async def probe(endpoint: AllocationEndpoint) -> bool:
        return await _ask(endpoint, lambda client: client.answers(timeout))

    return probe


async def node_answers(endpoints: Sequence[AllocationEndpoint], timeout: float = 2.0) -> bool:
    """Something answers at one of these servers' addresses (all on one node): a server, or the
    node refusing a connection. False: the node went silent."""
    answers = await asyncio.gather(*(_ask(e, lambda client: client.reachable(timeout)) for e in endpoints))
    return any(answers)


async def _ask(endpoint: AllocationEndpoint, question: Callable[[ServerClient], Awaitable[bool]]) -> bool:
    client = ServerClient(endpoint.alloc_id, endpoint.url, None, max_connections=1)
    try:
        return await question(client)
    finally:
        await client.aclose()


async def deploy_sandbox_job(
    client: NomadClient,
    spec: SandboxJobSpec,
    *,
    timeout: float = 600.0,
    on_progress: ProgressCallback | None = None,
    probe: Probe | None = None,
) -> list[AllocationEndpoint]:
    """Write the token Variable, register the job and wait until its `spec.count` servers answer
    (`probe`, by default `health_probe()`); a server that cannot start fails this with Nomad's
    diagnosis."""
    await client.put_variable(spec.token_variable, {TOKEN_KEY: spec.token.get_secret_value()})
    await client.register_job(create_sandbox_job(spec))
    return await wait_for_allocations(
        client, spec.job_id, spec.count, timeout=timeout, on_progress=on_progress, probe=probe or health_probe()
    )


async def scale_sandbox_job(client: NomadClient, spec: SandboxJobSpec, count: int) -> SandboxJobSpec:
    """Run `count` containers instead of `spec.count`; returns the spec to use from now on.

    Static ports (singularity/process default): the job is re-registered with groups
    `sandbox-0 .. sandbox-<count-1>`; unchanged groups keep running, so nothing already serving
    restarts. Otherwise (docker, or `static_ports=False`): `POST /v1/job/:id/scale` on group
    `sandbox`; Nomad refuses that while the job's deployment is still running ("job scaling blocked
    due to active deployment"), and then the job is re-registered with the new count instead, which
    Nomad always accepts. Follow with `wait_for_allocations(client, spec.job_id, count, ...)`.
    """
    scaled = spec.with_count(count)
    if scaled.uses_static_ports:
        await client.register_job(create_sandbox_job(scaled))
        return scaled
    try:
        await client.scale_job(
            spec.job_id, GROUP_NAME, count, message=f"atropos-sandbox: {spec.count} -> {count} containers"
        )
    except NomadRequestError as exc:
        if "active deployment" not in exc.message:
            raise
        await client.register_job(create_sandbox_job(scaled))
    return scaled


async def running_endpoints(client: NomadClient, job_id: str) -> list[AllocationEndpoint]:
    """The servers of the job's allocations that run now (no waiting)."""
    running = [a for a in await client.job_allocations(job_id) if a.wanted and a.is_running]
    return by_index(await asyncio.gather(*(client.allocation_endpoint(a.id) for a in running)))


async def stop_sandbox_job(client: NomadClient, job_id: str, *, purge: bool = True) -> bool:
    """Stop (and by default purge) the job and delete its token Variable; False if there was no
    such job. The Variable goes last: a task restarting meanwhile still finds its token."""
    # Nomad 2.0.5 answers the deregistration of an unknown job with 200 and an empty EvalID
    # (tests/fixtures/nomad/error_stop_unknown_job.json); older versions and the stand-in say 404
    try:
        found = bool(await client.stop_job(job_id, purge=purge))
    except NomadNotFound:
        found = False
    await client.delete_variable(token_variable(job_id))
    return found


async def find_dead_owner_jobs(client: NomadClient, prefix: str = "") -> list[JobStub]:
    """Sandbox jobs (id starting with `prefix`) whose owner process on this host no longer exists.

    Jobs owned by other hosts, or without an owner (run by hand), are never returned."""
    found = []
    for stub in await client.list_jobs(prefix or None):
        meta = stub.meta
        if meta is None:  # Nomad without `?meta=true` support: read the job itself
            try:
                meta = (await client.read_job(stub.id)).get("Meta") or {}
            except NomadNotFound:
                continue
        if meta.get("atropos_kind") == SANDBOX_KIND and owner_state(meta) == "dead":
            found.append(stub)
    return found


async def cleanup_dead_owner_jobs(client: NomadClient, prefix: str = "", *, purge: bool = True) -> list[str]:
    """Stop the jobs `find_dead_owner_jobs` finds; returns their ids."""
    stopped = []
    for stub in await find_dead_owner_jobs(client, prefix):
        if await stop_sandbox_job(client, stub.id, purge=purge):
            log.info("stopped sandbox job %s: its owner process is gone", stub.id)
            stopped.append(stub.id)
    return stopped
