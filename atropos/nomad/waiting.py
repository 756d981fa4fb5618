"""Wait for a job's allocations to run, and say why when they will not.

Two blocking queries run side by side, on the job's allocations and on its evaluations, so a change
to either wakes the waiter at once (no polling interval). After each change:

- an allocation Nomad still wants that has failed since the job was last registered (a fatal task
  event, e.g. `Driver Failure`, or `Terminated` before the server ever ran) ends the wait with
  `NomadAllocationFailed`, quoting the event and the tail of the task's stderr;
- a group Nomad cannot place on any node (every node filtered out: missing driver, constraints, no
  node in the datacenters) ends it with `NomadPlacementFailed`. A group waiting for resources (a port
  held by another allocation, memory) is reported through `on_progress`, and fails the same way once
  the same problem has lasted `placement_grace` seconds: a port still held by an allocation that is
  shutting down (a pool restarting its job) frees up within that time, a port held for good does not;
- when `count` allocations run (and, given a `probe`, their servers answer it), their addresses
  are returned. An allocation "runs" as soon as its process started: a server that dies on start-up
  (apptainer missing, a bad image) is caught by the probe wait, not mistaken for a working one.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from atropos.nomad.allocations import by_index
from atropos.nomad.diagnosis import AllocationFailure, PlacementProblem, allocation_failure, placement_problems
from atropos.nomad.errors import NomadAllocationFailed, NomadError, NomadPlacementFailed, NomadWaitTimeout
from atropos.nomad.responses import AllocationEndpoint, AllocationStub, Evaluation

if TYPE_CHECKING:
    from atropos.nomad.client import NomadClient

__all__ = ["Probe", "ProgressCallback", "WaitProgress", "wait_for_allocations"]

_MAX_BLOCK_S = 10.0
_PROBE_INTERVAL_S = 0.1
_LOG_TAIL_TIMEOUT_S = 5.0
_MAX_LOGGED_FAILURES = 3


class WaitProgress(BaseModel):
    """What `wait_for_allocations` sees, passed to `on_progress` each time it changes."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    wanted: int
    running: int
    ready: int
    starting: int
    problems: tuple[str, ...] = ()

    def describe(self) -> str:
        text = (
            f"job {self.job_id}: {self.running}/{self.wanted} allocations running "
            f"({self.ready} ready), {self.starting} starting"
        )
        return text + "".join(f"; {p}" for p in self.problems)


ProgressCallback = Callable[[WaitProgress], object]
Probe = Callable[[AllocationEndpoint], Awaitable[bool]]
"""Is the server of a running allocation ready? (e.g. it answers GET /health)"""


async def wait_for_allocations(
    client: NomadClient,
    job_id: str,
    count: int,
    *,
    timeout: float,
    on_progress: ProgressCallback | None = None,
    probe: Probe | None = None,
    placement_grace: float = 30.0,
) -> list[AllocationEndpoint]:
    """Wait until `count` allocations of `job_id` run and pass `probe`; return their endpoints,
    sorted by index."""
    endpoint = f"GET /v1/job/{job_id}/allocations"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    job = await client.read_job(job_id)
    baseline = int(job.get("JobModifyIndex", 0))
    watch = _Watch(client, job_id)
    readiness = _Readiness(client, probe)
    lasting = _Lasting(placement_grace)
    last: WaitProgress | None = None
    try:
        while True:
            await _fail_fast(client, job_id, watch, baseline)
            problems = placement_problems(e for e in watch.evaluations if e.create_index >= baseline)
            stuck = [p.describe() for p in problems if p.permanent] or [
                f"{p.describe()} (unchanged for {placement_grace:g}s)" for p in lasting.expired(problems, loop.time())
            ]
            if stuck:
                raise NomadPlacementFailed(f"GET /v1/job/{job_id}/evaluations", "; ".join(stuck))
            running = [a for a in watch.allocations if a.wanted and a.is_running]
            ready = await readiness.check(running)
            progress = WaitProgress(
                job_id=job_id,
                wanted=count,
                running=len(running),
                ready=len(ready),
                starting=sum(1 for a in watch.allocations if a.wanted and not a.is_running),
                problems=tuple(p.describe() for p in problems),
            )
            if progress != last:
                last = progress
                await _notify(on_progress, progress)
            if len(ready) >= count:
                return by_index(ready)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise NomadWaitTimeout(endpoint, f"gave up after {timeout:g}s: {progress.describe()}")
            # servers still starting are probed again soon; otherwise only a change wakes us
            wake = _PROBE_INTERVAL_S if len(ready) < len(running) else _MAX_BLOCK_S
            await watch.next_change(
                min(remaining, _MAX_BLOCK_S), timeout=min(remaining, wake, lasting.time_left(loop.time()))
            )
    finally:
        await watch.close()


async def _fail_fast(client: NomadClient, job_id: str, watch: _Watch, baseline: int) -> None:
    """Raise `NomadAllocationFailed` for wanted allocations that failed since `baseline`."""
    failures = [
        f
        for a in watch.allocations
        if a.wanted and a.modify_index >= baseline and (f := allocation_failure(a)) is not None
    ]
    if failures:
        described = await _with_stderr(client, failures)
        raise NomadAllocationFailed(f"GET /v1/job/{job_id}/allocations", "\n".join(f.describe() for f in described))


class _Watch:
    """The two blocking queries, each re-armed with its latest index after it answers."""

    def __init__(self, client: NomadClient, job_id: str) -> None:
        self._client = client
        self._job_id = job_id
        self.allocations: list[AllocationStub] = []
        self.evaluations: list[Evaluation] = []
        self._alloc_index = 0
        self._eval_index = 0
        self._alloc_task: asyncio.Task[tuple[int, list[AllocationStub]]] | None = None
        self._eval_task: asyncio.Task[tuple[int, list[Evaluation]]] | None = None

    async def next_change(self, wait: float, *, timeout: float) -> None:
        """Return when either query answers (each blocks up to `wait` in Nomad), or after `timeout`
        (queries still pending carry on into the next call)."""
        if self._alloc_task is None:
            self._alloc_task = _start(
                self._client.watch_job_allocations(self._job_id, index=self._alloc_index, wait=wait)
            )
        if self._eval_task is None:
            self._eval_task = _start(
                self._client.watch_job_evaluations(self._job_id, index=self._eval_index, wait=wait)
            )
        tasks: list[asyncio.Task[Any]] = [self._alloc_task, self._eval_task]
        done, _ = await asyncio.wait(tasks, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
        if self._alloc_task in done:
            self._alloc_index, self.allocations = self._alloc_task.result()
            self._alloc_task = None
        if self._eval_task in done:
            self._eval_index, self.evaluations = self._eval_task.result()
            self._eval_task = None

    async def close(self) -> None:
        tasks = [t for t in (self._alloc_task, self._eval_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _start(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    return asyncio.ensure_future(coro)


async def _notify(callback: ProgressCallback | None, progress: WaitProgress) -> None:
    if callback is None:
        return
    result = callback(progress)
    if inspect.isawaitable(result):
        await result


class _Lasting:
    """Since when each placement problem has been reported, to fail the ones that last too long."""

    def __init__(self, grace: float) -> None:
        self._grace = grace
        self._since: dict[str, float] = {}

    def expired(self, problems: list[PlacementProblem], now: float) -> list[PlacementProblem]:
        current = {p.describe(): p for p in problems}
        self._since = {text: self._since.get(text, now) for text in current}
        return [current[text] for text, since in self._since.items() if now - since >= self._grace]

    def time_left(self, now: float) -> float:
        """Seconds until the oldest problem expires (a long time when there is none)."""
        return min((since + self._grace - now for since in self._since.values()), default=_MAX_BLOCK_S)


class _Readiness:
    """Addresses of running allocations (read once each) and which of them passed the probe."""

    def __init__(self, client: NomadClient, probe: Probe | None) -> None:
        self._client = client
        self._probe = probe
        self._endpoints: dict[str, AllocationEndpoint] = {}
        self._ready: set[str] = set()

    async def check(self, running: list[AllocationStub]) -> list[AllocationEndpoint]:
        new = [a.id for a in running if a.id not in self._endpoints]
        for found in await asyncio.gather(*(self._client.allocation_endpoint(i) for i in new)):
            self._endpoints[found.alloc_id] = found
        waiting = [self._endpoints[a.id] for a in running if a.id not in self._ready]
        if self._probe is None:
            self._ready.update(e.alloc_id for e in waiting)
        else:
            results = await asyncio.gather(*(self._probe(e) for e in waiting), return_exceptions=True)
            self._ready.update(e.alloc_id for e, ok in zip(waiting, results, strict=True) if ok is True)
        return [self._endpoints[a.id] for a in running if a.id in self._ready]


async def _with_stderr(client: NomadClient, failures: list[AllocationFailure]) -> list[AllocationFailure]:
    """Add the tail of each failed task's stderr (best effort: the log may be gone or unreachable)."""

    async def one(failure: AllocationFailure) -> AllocationFailure:
        if not failure.task:
            return failure
        try:
            tail = await asyncio.wait_for(
                client.task_log_tail(failure.alloc_id, failure.task, max_bytes=1024), _LOG_TAIL_TIMEOUT_S
            )
        except (NomadError, asyncio.TimeoutError):
            return failure
        return failure.with_stderr(tail) if tail.strip() else failure

    first = failures[:_MAX_LOGGED_FAILURES]
    return [*await asyncio.gather(*(one(f) for f in first)), *failures[_MAX_LOGGED_FAILURES:]]
