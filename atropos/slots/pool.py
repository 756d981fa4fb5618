"""SlotPool: leases isolated slots of sandbox servers to trajectories, runs their tool calls,
scales the servers, and survives servers that die.

    async with SlotPool(SlotPoolConfig()) as pool:
        async with pool.slot(trajectory_id="t1") as slot:
            result = await pool.execute(slot, "bash", {"command": "echo hi"})
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from atropos.backends.base import SandboxBackend, ServerInfo
from atropos.errors import (
    AcquireTimeout,
    BackendError,
    InfrastructureError,
    InvalidToolCall,
    PoolClosed,
    SlotFailed,
    SlotLost,
    SlotPoolError,
)
from atropos.host.background import Background
from atropos.images.errors import InvalidReference
from atropos.images.layers import TaskImageRef
from atropos.progress import Progress, no_progress, reporting
from atropos.sandbox.models import (
    BridgeResponse,
    ExecuteResult,
    OutputChunk,
    SnapshotInfo,
    StatusResponse,
    UploadResult,
)
from atropos.sandbox.tarsafe import Unpacked
from atropos.slots.config import SlotPoolConfig
from atropos.slots.fleet import Fleet, Member
from atropos.slots.health import HealthWatch
from atropos.slots.leasing import LeaseBook, Slot, SlotState, SlotStatus
from atropos.slots.prepared import PreparedTasks, SetupCall
from atropos.slots.retirement import Retirement
from atropos.slots.sandbox import Sandbox
from atropos.slots.scaling import Scaler
from atropos.slots.stats import PoolStats, StatsRecorder, summarize

log = logging.getLogger("atropos.slots")

_RESET_TIMEOUT = 60.0
_IMAGE_TIMEOUT = 1800.0  # a task image unpacked on its node first: a large one takes minutes

BatchCall = tuple[Slot, str, dict[str, Any], float | None]


def make_backend(config: SlotPoolConfig) -> SandboxBackend:
    return config.backend.build(config.server_spec())


class SlotPool:
    def __init__(
        self,
        config: SlotPoolConfig | None = None,
        *,
        backend: SandboxBackend | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.config = config or SlotPoolConfig()
        self.backend = backend or make_backend(self.config)
        self._progress = progress or no_progress
        self._book = LeaseBook()
        self._stats = StatsRecorder()
        # closing ends what runs in the background with PoolClosed or SlotLost: expected, not an error
        self._background = Background(log, quiet=(PoolClosed, SlotLost))
        # the pool is the facade: its servers, their health and their number live in these three
        self._fleet = Fleet(self.config, self.backend, self._book, self._stats, self._background, self.progress)
        self._images_on: dict[str, set[str]] = {}  # server id -> task images its node holds (POST /image)
        self._health = HealthWatch(self._fleet)
        self._scaler = Scaler(self._fleet)
        self._retirement = Retirement(self._fleet)
        self._prepared = PreparedTasks(
            self.execute, lambda slot: self._member(self._book.check(slot)).client, self._background, self._use_image
        )
        self._started = False
        self._closed = False
        self._said = ""  # the last progress line: what a start that timed out was waiting for

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> SlotPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def progress(self, message: str) -> None:
        log.info("event=progress %s", message)
        self._said = message
        self._progress(message)

    async def start(self) -> None:
        """Start the first servers and the pool's loops (again: nothing); PoolClosed after close()."""
        if self._closed:  # a server started now would outlive the pool: close() has run
            raise PoolClosed("the pool is closed: make a new SlotPool to start again")
        if self._started:
            return
        self._started = True
        count = self.config.initial_containers
        self.progress(
            f"starting {count} {self.config.driver.type} server(s) on the {self.backend.name} backend "
            f"({self.config.slots_per_container} slots each)"
        )
        started = time.monotonic()
        try:
            infos = await asyncio.wait_for(self.backend.add_servers(count, self.progress), self.config.start_timeout)
            if not infos:
                raise BackendError("no sandbox server started")
            await self._fleet.admit(infos)
        except BaseException as exc:
            waited_for = self._said
            self.progress(f"the pool could not start ({type(exc).__name__}): removing what it started")
            await self.close()
            if isinstance(exc, asyncio.TimeoutError):
                raise BackendError(
                    f"servers not ready within start_timeout={self.config.start_timeout:g}s (last: {waited_for})"
                ) from None
            raise
        self.progress(
            f"pool ready: {len(self._book.slots)} slots on {len(self._fleet.members)} server(s) "
            f"in {time.monotonic() - started:.2f}s"
        )
        self._background.spawn(self._health.run())
        self._background.spawn(self._scaler.run())
        self._background.spawn(self._retirement.run())
        if self.config.lease_ttl is not None:
            self._background.spawn(self._lease_reaper())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._book.fail_waiters(PoolClosed("the pool was closed while waiting for a slot"))
        self._fleet.closed = True
        await self._background.cancel()
        await self._fleet.close()
        self.progress("pool closed")

    # -- leasing -------------------------------------------------------------------------------

    async def prepare(
        self,
        task_key: str,
        setup: Sequence[SetupCall],
        timeout: float | None = None,
        call_timeout: float | None = None,
        *,
        image: str | None = None,
    ) -> None:
        """Run a task's setup (tool calls, e.g. `("bash", {"command": "git clone ... && pip install
        ..."})`, each within `call_timeout`) once, in one slot, and keep its workspace as the task's
        snapshot on that server: `acquire(..., from_snapshot=task_key)` then hands out slots that
        start from it. With `image`, the setup runs in that task image, and the snapshot keeps what
        it wrote over the image too (packages installed, /etc edited): the forks run in the image.
        Other servers run the setup once when a slot of theirs is first acquired for the task.
        Preparing a key again does nothing (concurrent calls wait for the first); SetupFailed if a
        call of the setup fails (its output is in the message)."""
        self._check_image(image)
        self._prepared.register(task_key, setup, call_timeout, image)

        async def in_a_slot() -> None:
            slot = await self.acquire(f"prepare:{task_key}", timeout)
            try:
                await self._prepared.prepare_in(slot, task_key)
            finally:
                self.release(slot)

        await self._prepared.once(task_key, in_a_slot)

    async def acquire(
        self,
        trajectory_id: str | None = None,
        timeout: float | None = None,
        from_snapshot: str | None = None,
        *,
        image: str | None = None,
    ) -> Slot:
        """Lease a free slot (FIFO among waiters). Raises AcquireTimeout after `timeout` seconds.
        With `from_snapshot` (a task key given to `prepare`), the slot starts from that task's
        prepared workspace, a copy-on-write fork of its own. With `image` (docker://NAME:TAG, docker-daemon://NAME:TAG,
        docker-archive:PATH, oci-archive:PATH on the servers' nodes) the slot's root is that image's,
        under a writable layer of its own until it is released; a bad or missing image fails the
        acquire (InvalidToolCall) and gives the slot back. A task prepared in an image (`prepare(...,
        image=...)`) brings its image: `image` may then be left out, or must name the same one."""
        if from_snapshot is not None and not self._prepared.known(from_snapshot):
            raise ValueError(f"no setup for task {from_snapshot!r}: call `await pool.prepare(task_key, setup)` first")
        named = self._check_image(image)
        if from_snapshot is not None and image is not None:
            prepared_in = self._prepared.image_of(from_snapshot)
            if prepared_in is None or named != self._check_image(prepared_in):
                raise ValueError(
                    f"task {from_snapshot!r} was prepared in image {prepared_in}, not {image}: "
                    "give the image to `prepare` (its forks then run in it)"
                )
        slot = await self._lease(trajectory_id, timeout, None if named is None else self._holding(named))
        try:
            if from_snapshot is not None:
                await self._prepared.fork_into(slot, from_snapshot)
            elif image is not None:
                await self._use_image(slot, image)
        except BaseException:
            self.release(slot)
            raise
        return slot

    def _check_image(self, image: str | None) -> str | None:
        """The reference as servers name it; InvalidToolCall for one a pool does not take."""
        try:
            ref = TaskImageRef.parse(image) if image is not None else None
        except InvalidReference as exc:
            raise InvalidToolCall(str(exc)) from None
        if ref is not None and ref.kind == "dir":  # the servers' own paths are never the caller's to show
            raise InvalidToolCall(f"image {image!r}: a directory is not taken by a pool; give an image archive")
        return None if ref is None else str(ref)

    def _holding(self, image: str) -> Callable[[SlotState], bool]:
        """Slots of servers that have `image` unpacked: the image's slots go there first."""

        def holds(st: SlotState) -> bool:
            member = self._fleet.members.get(st.server_id)
            return member is not None and (
                image in self._images_on.get(st.server_id, ()) or image in member.health.get("images", ())
            )

        return holds

    async def _use_image(self, slot: Slot, image: str) -> None:
        self.progress(f"slot {slot.server_id[:8]}/{slot.index}: starting in image {image}")
        async with self._calling(slot, "image", None) as (st, server):
            label = f"slot {slot.server_id[:8]}/{slot.index}: image {image} (unpacked first if its node lacks it)"
            answer = await reporting(server.client.use_image(st.index, image, _IMAGE_TIMEOUT), self.progress, label)
        self._images_on.setdefault(slot.server_id, set()).add(answer.image)
        how = "unpacked on its node" if answer.unpacked else "already on its node"
        if answer.copied is not None:
            how += f"; its root a copy, not an overlay: {answer.copied}"
        self.progress(
            f"slot {slot.server_id[:8]}/{slot.index}: in image {answer.image} ({how}, {answer.duration_ms / 1000:.1f}s)"
        )

    async def _lease(
        self, trajectory_id: str | None, timeout: float | None, prefer: Callable[[SlotState], bool] | None = None
    ) -> Slot:
        if self._closed or not self._started:
            raise PoolClosed("the pool is not running (use `async with SlotPool(...)` or `await pool.start()`)")
        trajectory = trajectory_id or uuid.uuid4().hex
        st = self._book.take_free(prefer)
        if st is not None:
            self._stats.counters["leases"] += 1
            return self._book.lease(st, trajectory)
        waited = time.monotonic()
        fut = self._book.enqueue_waiter()
        self._scaler.wakeup.set()
        limit = self.config.acquire_timeout if timeout is None else timeout
        try:
            done, _ = await asyncio.wait({fut}, timeout=limit)
        except asyncio.CancelledError:
            self._book.drop_waiter(fut)
            raise
        if not done:
            self._book.drop_waiter(fut)
            self._stats.counters["acquire_timeouts"] += 1
            counts = self._book.counts()
            raise AcquireTimeout(
                f"no slot became free within {limit}s for trajectory {trajectory!r}: {len(self._book.slots)} slots "
                f"({counts['leased']} leased, {counts['resetting']} resetting), {self._book.waiting} waiting, "
                f"{len(self._fleet)}/{self.config.max_containers} containers; release slots, or raise "
                "max_containers or slots_per_container"
            )
        st = fut.result()  # raises PoolClosed if the pool closed meanwhile
        self._stats.wait(time.monotonic() - waited)
        self._stats.counters["leases"] += 1
        return self._book.lease(st, trajectory)

    def release(self, slot: Slot) -> None:
        """Give the slot back. It is reset (processes killed, workspace emptied) in the background
        before anyone else gets it; releasing twice, or after the slot was lost, does nothing."""
        st = self._book.slots.get((slot.server_id, slot.index))
        if st is None or st.lease_id != slot.lease_id or st.status is not SlotStatus.LEASED:
            return
        self._stats.counters["releases"] += 1
        self._recycle(st)

    def _recycle(self, st: SlotState) -> None:
        self._book.end_lease(st)
        if not st.dirty:
            self._book.make_free(st)  # nothing ran since the last reset: nothing to clean
            return
        st.status = SlotStatus.RESETTING
        self._background.spawn(self._reset(st))

    async def _reset(self, st: SlotState) -> None:
        """Reset, then free the slot; a slot that cannot be reset is never handed out again."""
        for attempt in (1, 2):
            server = self._fleet.members.get(st.server_id)
            if server is None:
                return  # lost meanwhile: the health loop handles it
            try:
                await server.client.reset(st.index, _RESET_TIMEOUT)
            except SlotLost:
                return
            except SlotPoolError as exc:
                self._stats.error(exc)
                log.warning("event=reset_failed slot=%s/%d attempt=%d error=%s", st.server_id, st.index, attempt, exc)
                continue
            self._book.make_free(st)
            return
        self._book.retire(st)
        log.error("event=slot_retired slot=%s/%d reason=reset failed twice", st.server_id, st.index)

    @contextlib.asynccontextmanager
    async def slot(
        self,
        trajectory_id: str | None = None,
        timeout: float | None = None,
        from_snapshot: str | None = None,
        *,
        image: str | None = None,
    ) -> AsyncIterator[Slot]:
        leased = await self.acquire(trajectory_id, timeout, from_snapshot, image=image)
        try:
            yield leased
        finally:
            self.release(leased)

    async def open_sandbox(
        self,
        trajectory_id: str | None = None,
        timeout: float | None = None,
        *,
        image: str | None = None,
        from_snapshot: str | None = None,
    ) -> Sandbox:
        """A slot as a Sandbox object (atropos.slots.sandbox): `await sb.close()` gives it back."""
        return Sandbox(self, await self.acquire(trajectory_id, timeout, from_snapshot, image=image))

    @contextlib.asynccontextmanager
    async def sandbox(
        self,
        trajectory_id: str | None = None,
        timeout: float | None = None,
        *,
        image: str | None = None,
        from_snapshot: str | None = None,
    ) -> AsyncIterator[Sandbox]:
        """`async with pool.sandbox(image=..., trajectory_id=...) as sb:` a Sandbox, closed at the end."""
        sandbox = await self.open_sandbox(trajectory_id, timeout, image=image, from_snapshot=from_snapshot)
        try:
            yield sandbox
        finally:
            await sandbox.close()

    def time_left(self, slot: Slot) -> float | None:
        """Seconds before the slot's server is stopped by its backend (a SLURM job's time limit),
        where there is such an end; None otherwise. A call must end before it (else SlotDraining)."""
        return self._retirement.time_left(self._book.check(slot).server_id)

    def draining(self, slot: Slot) -> bool:
        """The slot's server is retiring: the slot serves the calls that end in time, and is not
        handed out again once released."""
        return self._member(self._book.check(slot)).retiring

    def heartbeat(self, slot: Slot) -> None:
        """Tell the pool the trajectory holding `slot` is alive (tool calls count as heartbeats)."""
        self._book.check(slot).last_seen = time.monotonic()

    # -- tool calls ----------------------------------------------------------------------------

    def server_of(self, slot: Slot) -> ServerInfo:
        """Where the slot's server listens (and its token): for debugging and direct calls."""
        return self._member(self._book.check(slot)).info

    def server_ids(self) -> list[str]:
        return list(self._fleet.members)

    def enforcement(self) -> dict[str, dict[str, Any]]:
        """Per server: what it said it enforces when it joined (isolation, the slots' runner, network,
        the uid slots run as, limits, cgroups, and why an `auto` mode fell back), from its /health."""
        keys = ("isolation", "runner", "network", "uid", "limits", "cgroups", "isolation_reason", "network_reason")
        return {sid: {k: s.health.get(k) for k in keys} for sid, s in self._fleet.members.items()}

    async def servers_health(self) -> dict[str, dict[str, Any] | BaseException]:
        """/health of every server (or the error asking it), by server id."""
        members = list(self._fleet.members.items())
        answers = await asyncio.gather(
            *(m.client.health(timeout=self.config.health_timeout) for _, m in members), return_exceptions=True
        )
        return {sid: answer for (sid, _), answer in zip(members, answers, strict=True)}

    async def server_health(self, slot: Slot) -> dict[str, Any]:
        """/health of the slot's server, through the same pooled connection its calls use."""
        st = self._book.check(slot)
        return await self._member(st).client.health(timeout=self.config.health_timeout)

    async def server_status(self, slot: Slot) -> StatusResponse:
        """/status of the slot's server: what each of its slots runs now, its images and bridges."""
        st = self._book.check(slot)
        return await self._member(st).client.status(timeout=self.config.health_timeout)

    def _member(self, st: SlotState) -> Member:
        """The server of a leased slot; after close() every call says so (PoolClosed)."""
        if self._closed:
            raise PoolClosed("the pool is closed: no more calls")
        member = self._fleet.members.get(st.server_id)
        if member is None:
            raise SlotLost(f"slot {st.server_id}/{st.index}: its server left the pool; acquire another slot")
        return member

    @contextlib.asynccontextmanager
    async def _calling(self, slot: Slot, what: str, timeout: float | None) -> AsyncIterator[tuple[SlotState, Member]]:
        """The slot's state and server for one call in it: refused before it runs if its server
        retires first (with a `timeout`), counted while it runs, its failures recorded, a lost
        server's health looked at."""
        st = self._book.check(slot)
        server = self._member(st)
        if timeout is not None:
            refused = self._retirement.refusal(st.server_id, st.index, timeout)
            if refused is not None:
                self._stats.error(refused)
                raise refused
        st.inflight += 1
        st.dirty = True
        started = time.monotonic()
        try:
            yield st, server
        except SlotPoolError as exc:
            self._stats.error(exc)
            if isinstance(exc, SlotLost):
                self._background.spawn(self._health.check(server))
            raise
        finally:
            st.inflight -= 1
            st.last_seen = time.monotonic()
        self._stats.call(what, time.monotonic() - started)

    async def execute(
        self, slot: Slot, tool: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> ExecuteResult:
        """Run one tool call in the leased slot. A command's failure is in the result; a failure of
        the sandbox raises InfrastructureError (SlotLost: acquire another slot)."""
        limit = timeout or self.config.tool_timeout
        async with self._calling(slot, tool, limit) as (st, server):
            return await server.client.execute(st.index, tool, args or {}, limit)

    async def execute_stream(
        self, slot: Slot, tool: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> AsyncIterator[OutputChunk | ExecuteResult]:
        """`execute`, with the command's output as it comes: OutputChunk items (stdout and stderr,
        up to the server's max-output of each), then the ExecuteResult, always last. Breaking out
        early stops the stream; the command still ends by its timeout at the latest."""
        limit = timeout or self.config.tool_timeout
        async with self._calling(slot, tool, limit) as (st, server):
            async for event in server.client.execute_stream(st.index, tool, args or {}, limit):
                st.last_seen = time.monotonic()  # output flows: the lease is in use
                yield event

    # -- snapshots and forks of a slot ----------------------------------------------------------

    async def snapshot(self, slot: Slot, name: str, timeout: float = 600.0) -> SnapshotInfo:
        """Keep the slot's workspace as snapshot `name` on its server (`fork` starts slots from it)."""
        async with self._calling(slot, "snapshot", None) as (st, server):
            return await server.client.snapshot(st.index, name, timeout)

    async def fork(self, of: Slot, name: str, trajectory_id: str | None = None, timeout: float | None = None) -> Slot:
        """A new slot on `of`'s server starting from its snapshot `name`, a copy-on-write workspace
        of its own. Snapshots stay on their server: SlotFailed when it has no free slot now."""
        server_id = self._book.check(of).server_id
        slot = await self._lease(trajectory_id, timeout, lambda st: st.server_id == server_id)
        try:
            if slot.server_id != server_id:
                raise SlotFailed(f"no free slot on server {server_id} to fork snapshot {name!r} into; try again")
            async with self._calling(slot, "fork", None) as (st, server):
                await server.client.fork(name, [st.index], 600.0)
        except BaseException:
            self.release(slot)
            raise
        return slot

    async def bridge(
        self, slot: Slot, to_port: int, to_host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0
    ) -> BridgeResponse:
        """Let the slot reach one service, `to_host:to_port` as its server's node reaches it, at the
        answer's `host:port` inside the slot (its own 127.0.0.1:`port`, 0: a free one); nothing else
        of the node opens to it. Closed when the slot is released. For an agent program in the slot
        that calls back to the trainer (a model proxy); its server must be on the node of that service
        or reach it, as the local backend's is."""
        async with self._calling(slot, "bridge", None) as (st, server):
            return await server.client.bridge(st.index, port, to_host, to_port, timeout)

    # -- whole trees -----------------------------------------------------------------------------

    async def upload_tree(self, slot: Slot, source: str, path: str = ".", timeout: float = 600.0) -> UploadResult:
        """Copy the local directory `source` into `path` of the slot's workspace (made if missing;
        entries of the same name replaced, directories merged). A refused archive changes nothing
        (InvalidToolCall says why); the tree streams, never wholly in memory."""
        async with self._calling(slot, "upload_tree", None) as (st, server):
            return await server.client.upload_tree(st.index, source, path, timeout)

    async def download_tree(
        self, slot: Slot, path: str, dest: str, timeout: float = 600.0, max_bytes: int = 16 << 30
    ) -> Unpacked:
        """Copy `path` of the slot's workspace into the local directory `dest` (made if missing),
        with the same confinement as an upload: nothing of the archive lands outside `dest`."""
        async with self._calling(slot, "download_tree", None) as (st, server):
            return await server.client.download_tree(st.index, path, dest, timeout, max_bytes)

    async def execute_batch(self, calls: Sequence[BatchCall]) -> list[ExecuteResult | InfrastructureError]:
        """Run many calls, one HTTP request per server. Results come in order; a call whose sandbox
        failed gets the InfrastructureError in its place instead of a result."""
        out: list[ExecuteResult | InfrastructureError | None] = [None] * len(calls)
        groups: dict[str, list[int]] = {}
        states: list[SlotState] = []
        for i, (slot, _tool, _args, timeout) in enumerate(calls):
            st = self._book.check(slot)
            states.append(st)
            refused = self._retirement.refusal(st.server_id, st.index, timeout or self.config.tool_timeout)
            if refused is not None:  # this call does not run; the others do
                self._stats.error(refused)
                out[i] = refused
                continue
            groups.setdefault(st.server_id, []).append(i)
        # resolved now, while every checked slot's server is still in the pool: the requests
        # start only once this coroutine yields, and a server may be lost by then
        servers = {sid: self._member(states[indices[0]]) for sid, indices in groups.items()}

        async def run_server(server: Member, indices: list[int]) -> None:
            body = [
                {
                    "slot": states[i].index,
                    "tool": calls[i][1],
                    "args": calls[i][2],
                    "timeout": calls[i][3] or self.config.tool_timeout,
                }
                for i in indices
            ]
            for i in indices:
                states[i].inflight += 1
                states[i].dirty = True
            started = time.monotonic()
            try:
                results = await server.client.batch(body)
            except InfrastructureError as exc:
                self._stats.error(exc)
                if isinstance(exc, SlotLost):
                    self._background.spawn(self._health.check(server))
                for i in indices:
                    out[i] = exc
                return
            finally:
                for i in indices:
                    states[i].inflight -= 1
                    states[i].last_seen = time.monotonic()
            elapsed = time.monotonic() - started
            for i, res in zip(indices, results, strict=True):
                if res.infra_error:
                    out[i] = InfrastructureError(f"slot {states[i].server_id}/{states[i].index}: {res.infra_error}")
                else:
                    self._stats.call(calls[i][1], elapsed)
                    out[i] = res

        # every server's request runs to its end before a refusal (InvalidToolCall) is raised
        failures = [
            r
            for r in await asyncio.gather(
                *(run_server(servers[sid], idx) for sid, idx in groups.items()), return_exceptions=True
            )
            if r is not None
        ]
        if failures:
            raise failures[0]
        return [r for r in out if r is not None]

    # -- leases of dead trajectories ------------------------------------------------------------

    async def _lease_reaper(self) -> None:
        ttl = self.config.lease_ttl
        assert ttl is not None
        while True:
            await asyncio.sleep(min(ttl / 4, 5.0))
            now = time.monotonic()
            for st in list(self._book.slots.values()):
                if st.status is SlotStatus.LEASED and st.lease_id and not st.inflight and now - st.last_seen > ttl:
                    log.warning(
                        "event=lease_reclaimed slot=%s/%d trajectory=%s idle=%.0fs",
                        st.server_id,
                        st.index,
                        st.trajectory_id,
                        now - st.last_seen,
                    )
                    self._stats.counters["reclaimed"] += 1
                    st.dirty = True
                    self._recycle(st)

    # -- introspection -------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        s = self._stats
        return PoolStats(
            servers=len(self._fleet.members),
            slots=len(self._book.slots),
            slots_by_status=self._book.counts(),
            waiting=self._book.waiting,
            leases=s.counters["leases"],
            releases=s.counters["releases"],
            reclaimed=s.counters["reclaimed"],
            acquire_waits=s.counters["acquire_waits"],
            acquire_timeouts=s.counters["acquire_timeouts"],
            acquire_wait=summarize(s.waits, s.counters["acquire_waits"]),
            calls={tool: summarize(samples, s.call_counts[tool]) for tool, samples in s.calls.items()},
            errors=dict(s.errors),
            servers_lost=s.counters["servers_lost"],
            servers_retired=s.counters["servers_retired"],
            scale_ups=s.counters["scale_ups"],
            scale_downs=s.counters["scale_downs"],
            replacements_pending=self._fleet.replacing,
            replace_error=self._fleet.replace_error if self._fleet.replacing else None,
        )
