"""Nomad backend: the pool's servers are allocations of one Nomad job built by `atropos.nomad`.

A server lost with its node is replaced on another node (atropos.nomad.avoidance). The job id is
`<job_id>-<8 hex>` so pools never share a job; its Meta names this process, and
jobs whose owner died on this host are stopped before a new one is submitted. A `singularity`
image reference is pulled (per `pull_policy`) before anything is scheduled, so a missing image
fails here and not on a node.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid

from pydantic import SecretStr

from atropos.backends.base import SandboxBackend, ServerInfo, ServerSpec
from atropos.backends.nomad_config import NomadBackendConfig
from atropos.drivers import DriverConfig, SingularityDriver
from atropos.errors import BackendError
from atropos.nomad.avoidance import NodeAvoidance
from atropos.nomad.builder import create_sandbox_job
from atropos.nomad.client import NomadClient
from atropos.nomad.errors import NomadError, NomadNotFound
from atropos.nomad.lifecycle import (
    cleanup_dead_owner_jobs,
    deploy_sandbox_job,
    health_probe,
    node_answers,
    scale_sandbox_job,
    stop_sandbox_job,
)
from atropos.nomad.responses import AllocationEndpoint
from atropos.nomad.spec import SandboxJobSpec
from atropos.nomad.waiting import ProgressCallback, WaitProgress, wait_for_allocations
from atropos.progress import Progress, no_progress

__all__ = ["NomadBackend", "NomadBackendConfig"]

log = logging.getLogger("atropos.backends.nomad")


class NomadBackend(SandboxBackend):
    name = "nomad"

    def __init__(
        self, spec: ServerSpec, config: NomadBackendConfig | None = None, client: NomadClient | None = None
    ) -> None:
        self.spec = spec
        self.config = config or NomadBackendConfig()
        self.client = client or NomadClient(self.config.settings())
        self.job_id = f"{self.config.job_id}-{uuid.uuid4().hex[:8]}"
        self._token = secrets.token_urlsafe(32)
        self._spec: SandboxJobSpec | None = None
        self._known: dict[str, AllocationEndpoint] = {}
        self._avoided = NodeAvoidance()  # nodes lost servers went with: replacements go elsewhere
        self._lock = asyncio.Lock()

    async def _driver_on_nodes(self, progress: Progress) -> DriverConfig:
        """The driver as the nodes see it: a singularity reference is pulled here first (per its
        pull policy), so a missing image fails now and not on a node."""
        driver = self.spec.driver
        if not isinstance(driver, SingularityDriver):
            return driver
        from atropos.images.cache import resolve_singularity_image
        from atropos.images.errors import ImageError

        progress(f"image: resolving {driver.image} (pull policy {driver.pull_policy}) before submitting the job")
        try:
            sif = await asyncio.to_thread(
                resolve_singularity_image,
                driver.image,
                driver.pull_policy,
                runtime=driver.apptainer_binary,
                progress=progress,
            )
        except ImageError as exc:
            raise BackendError(str(exc)) from None
        # absolute: the nodes run it from their own working directory (a shared file system holds it)
        return driver.model_copy(update={"image": str(sif.absolute())})

    async def _base_spec(self, progress: Progress) -> SandboxJobSpec:
        c = self.config
        return SandboxJobSpec(
            job_id=self.job_id,
            driver=await self._driver_on_nodes(progress),
            count=0,
            server=self.spec.settings,
            token=SecretStr(self._token),
            task_user=self.spec.run_as,
            base_port=c.static_port_base,
            cpu=c.cpu,
            memory=c.memory,
            datacenters=[d for d in c.datacenters if d != "*"],
            namespace=c.namespace,
            region=c.region,
            node_pool=c.node_pool,
        )

    def _reporter(self, progress: Progress) -> ProgressCallback:
        def report(p: WaitProgress) -> None:
            progress(f"nomad job {p.job_id}: {p.describe()}")

        return report

    def _infos(self, endpoints: list[AllocationEndpoint]) -> list[ServerInfo]:
        fresh = [e for e in endpoints if e.alloc_id not in self._known]
        for e in fresh:
            self._known[e.alloc_id] = e
        return [ServerInfo(e.alloc_id, e.url, self._token, self.spec.settings.slots) for e in fresh]

    async def add_servers(self, count: int, progress: Progress = no_progress) -> list[ServerInfo]:
        async with self._lock:
            try:
                if self._spec is None:
                    stale = await cleanup_dead_owner_jobs(self.client, self.config.job_id)
                    if stale:
                        progress(f"stopped {len(stale)} job(s) left by dead pools: {', '.join(stale)}")
                    spec = (await self._base_spec(progress)).with_count(count)
                    progress(
                        f"submitting nomad job {self.job_id} ({self.spec.driver.describe()}, {count} container(s))"
                    )
                    # the job is ours from here, placed or not: close() removes it (and its token)
                    self._spec = spec
                    endpoints = await deploy_sandbox_job(
                        self.client, spec, timeout=self.spec.start_timeout, on_progress=self._reporter(progress)
                    )
                else:
                    await self._steer(progress)
                    target = self._spec.count + count
                    progress(f"scaling nomad job {self.job_id}: {self._spec.count} -> {target} containers")
                    self._spec = await scale_sandbox_job(self.client, self._spec, target)
                    endpoints = await wait_for_allocations(
                        self.client,
                        self.job_id,
                        target,
                        timeout=self.spec.start_timeout,
                        on_progress=self._reporter(progress),
                        probe=health_probe(),
                    )
            except NomadError as exc:
                raise BackendError(f"nomad: {exc}") from None
            return self._infos(endpoints)

    def pick_removable(self, idle: list[str]) -> str | None:
        """Scaling down by one stops the highest-numbered container (group `sandbox-<n>` with
        static ports, the highest allocation index otherwise): only that one may be drained."""
        if not self._known:
            return None
        top = max(self._known.values(), key=lambda e: e.index if e.index is not None else -1)
        return top.alloc_id if top.alloc_id in idle else None

    async def remove_server(self, server_id: str) -> None:
        """Scale the job down by one; the pool drained `server_id`, the one `pick_removable` chose."""
        async with self._lock:
            self._known.pop(server_id, None)
            if self._spec is None or self._spec.count == 0:
                return
            try:
                self._spec = await scale_sandbox_job(self.client, self._spec, self._spec.count - 1)
            except NomadError as exc:
                log.error("event=nomad_scale_down_failed job=%s error=%s", self.job_id, exc)

    async def replace_server(self, server_id: str, progress: Progress = no_progress) -> list[ServerInfo]:
        """Stop the lost allocation (a hung server still counts as running to Nomad), let Nomad
        place its replacement, and return the new servers once they answer."""
        async with self._lock:
            lost = self._known.pop(server_id, None)
            if self._spec is None:
                return []
            try:
                await self._steer(progress, lost)
            except NomadError as exc:
                raise BackendError(f"nomad: {exc}") from None
            progress(f"stopping lost allocation {server_id[:8]}; waiting for nomad to replace it")
            try:
                await self.client.stop_allocation(server_id)
            except NomadError as exc:
                if exc.transient:  # Nomad unreachable: nothing was stopped, the pool tries again
                    raise BackendError(f"nomad: cannot stop lost allocation {server_id[:8]}: {exc}") from None
                # already gone (died): Nomad reschedules it by itself
                log.info("event=nomad_alloc_stop alloc=%s result=%s", server_id, exc)
            try:
                endpoints = await wait_for_allocations(
                    self.client,
                    self.job_id,
                    self._spec.count,
                    timeout=self.spec.start_timeout,
                    on_progress=self._reporter(progress),
                    probe=health_probe(),
                )
            except NomadError as exc:
                raise BackendError(f"nomad: {exc}") from None
            # the lost allocation may still count as running (hung, not dead): only new ones are news
            return self._infos([e for e in endpoints if e.alloc_id != server_id])

    async def _steer(self, progress: Progress, lost: AllocationEndpoint | None = None) -> None:
        """Before a placement: nodes Nomad says are back take servers again, and the node `lost`
        went with (if it did) takes none; the job is registered again when that changes. With
        static ports the containers of a lost node also move to new groups, so that their
        replacements start at once (atropos.nomad.builder)."""
        assert self._spec is not None
        changed = False
        moved = dict(self._spec.moved)
        for lifted in await self._avoided.lift_recovered(self.client):
            progress(f"{lifted}: servers may be placed there again")
            changed = True
        on_node = [] if lost is None else [lost, *(e for e in self._known.values() if e.node_id == lost.node_id)]
        if lost is not None and lost.node_id not in self._avoided and not await node_answers(on_node):
            try:
                node = await self.client.read_node(lost.node_id)
            except NomadNotFound:
                node = None
            self._avoided.avoid(lost.node_id, lost.node_name, node)
            name = lost.node_name or lost.node_id[:8]
            seen = node.status if node else "gone"
            progress(
                f"server {lost.alloc_id[:8]} was lost with its node {name} (Nomad says {seen}): "
                f"replacements avoid {name} until Nomad sees it back"
            )
            log.warning("event=nomad_node_avoided node=%s alloc=%s", name, lost.alloc_id)
            if self._spec.uses_static_ports:
                for index in {e.index for e in on_node if e.index is not None}:
                    moved[index] = moved.get(index, 0) + 1
            changed = True
        if changed:
            if (await self.client.read_job(self.job_id)).get("Stop"):  # registering would start it again
                raise BackendError(f"nomad job {self.job_id} was stopped outside this pool")
            # the base job has no constraints of its own: the avoided nodes' are all there are
            self._spec = self._spec.model_copy(update={"constraints": self._avoided.constraints(), "moved": moved})
            await self.client.register_job(create_sandbox_job(self._spec))

    async def close(self) -> None:
        try:
            if self._spec is not None:
                stopped = await stop_sandbox_job(self.client, self.job_id, purge=self.config.purge_on_exit)
                log.info(
                    "event=nomad_job_stopped job=%s found=%s purge=%s", self.job_id, stopped, self.config.purge_on_exit
                )
        except NomadError as exc:
            log.error("event=nomad_stop_failed job=%s error=%s", self.job_id, exc)
        finally:
            await self.client.aclose()
