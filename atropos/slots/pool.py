"""SlotPool: leases isolated slots of sandbox servers to trajectories, runs their tool calls,
scales the servers, and survives servers that die.

    async with SlotPool(SlotPoolConfig()) as pool:
        async with pool.slot(trajectory_id="t1") as slot:
            result = await pool.execute(slot, "bash", {"command": "echo hi"})
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from atropos.backends.base import SandboxBackend, ServerInfo
from atropos.errors import (
    AcquireTimeout,
    BackendError,
    InfrastructureError,
    PoolClosed,
    SlotLost,
    SlotPoolError,
)
from atropos.progress import Progress, no_progress
from atropos.sandbox.models import ExecuteResult
from atropos.slots.admission import IsolationRefused, refusal
from atropos.slots.config import SlotPoolConfig
from atropos.slots.leasing import LeaseBook, Slot, SlotState, SlotStatus
from atropos.slots.server_client import ServerClient, ServerRefused
from atropos.slots.stats import PoolStats, StatsRecorder, summarize

log = logging.getLogger("atropos.slots")

_RESET_TIMEOUT = 60.0
_SCALE_UP_RETRY = 5.0
_REPLACE_ATTEMPTS = 3

BatchCall = tuple[Slot, str, dict[str, Any], float | None]


@dataclass(eq=False)
class _Server:
    info: ServerInfo
    client: ServerClient
    last_ok: float
    idle_since: float
    health: dict[str, Any]  # /health when it joined: what it enforces


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
        self._servers: dict[str, _Server] = {}
        self._stats = StatsRecorder()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False
        self._closed = False
        self._scaling = False
        self._replacing = 0  # lost servers whose replacement is on its way
        self._last_scale = 0.0
        self._scale_up_failed = 0.0
        self._scale_wakeup = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> SlotPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def progress(self, message: str) -> None:
        log.info("event=progress %s", message)
        self._progress(message)

    async def start(self) -> None:
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
            await self._register(infos)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, asyncio.TimeoutError):
                raise BackendError(f"servers not ready within start_timeout={self.config.start_timeout}s") from None
            raise
        self.progress(
            f"pool ready: {len(self._book.slots)} slots on {len(self._servers)} server(s) "
            f"in {time.monotonic() - started:.2f}s"
        )
        self._spawn(self._health_loop())
        self._spawn(self._scale_loop())
        if self.config.lease_ttl is not None:
            self._spawn(self._lease_reaper())

    async def _register(self, infos: Sequence[ServerInfo]) -> None:
        """Hand out the slots of these servers; a server with weaker isolation than configured is
        stopped instead, and IsolationRefused raised once the others are in."""
        clients = {
            info.server_id: ServerClient(info.server_id, info.url, info.token, max_connections=info.slots + 4)
            for info in infos
        }
        healths = await asyncio.gather(
            *(c.health(timeout=self.config.health_timeout) for c in clients.values()), return_exceptions=True
        )
        refused: dict[str, str] = {}
        admitted: list[ServerInfo] = []
        now = time.monotonic()
        for info, answer in zip(infos, healths, strict=True):
            health = answer if isinstance(answer, dict) else {}  # unanswered: the health loop decides
            why = refusal(self.config, info.server_id, health)
            if why is not None:
                refused[info.server_id] = why
                log.error("event=server_refused server=%s reason=%s", info.server_id, why)
                await clients[info.server_id].aclose()
                await self.backend.remove_server(info.server_id)
                continue
            admitted.append(info)
            self._servers[info.server_id] = _Server(info, clients[info.server_id], now, now, health)
            exited = self.backend.exited(info.server_id)
            if exited is not None:
                exited.add_done_callback(functools.partial(self._on_exit, info.server_id))
        infos = admitted
        # interleave servers so consecutive acquires spread over containers
        per_server = [[SlotState(info.server_id, i) for i in range(info.slots)] for info in infos]
        width = max((len(p) for p in per_server), default=0)
        self._book.add([p[i] for i in range(width) for p in per_server if i < len(p)])
        if refused:
            raise IsolationRefused("; ".join(refused.values()))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._book.fail_waiters(PoolClosed("the pool was closed while waiting for a slot"))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers.values():
            server.client.mark_lost("the pool is closed")
            await server.client.aclose()
        self._servers.clear()
        await self.backend.close()
        self.progress("pool closed")

    # -- leasing -------------------------------------------------------------------------------

    async def acquire(self, trajectory_id: str | None = None, timeout: float | None = None) -> Slot:
        """Lease a free slot (FIFO among waiters). Raises AcquireTimeout after `timeout` seconds."""
        if self._closed or not self._started:
            raise PoolClosed("the pool is not running (use `async with SlotPool(...)` or `await pool.start()`)")
        trajectory = trajectory_id or uuid.uuid4().hex
        st = self._book.take_free()
        if st is not None:
            self._stats.counters["leases"] += 1
            return self._book.lease(st, trajectory)
        waited = time.monotonic()
        fut = self._book.enqueue_waiter()
        self._scale_wakeup.set()
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
                f"{len(self._servers)}/{self.config.max_containers} containers; release slots, or raise "
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
        self._spawn(self._reset(st))

    async def _reset(self, st: SlotState) -> None:
        """Reset, then free the slot; a slot that cannot be reset is never handed out again."""
        for attempt in (1, 2):
            server = self._servers.get(st.server_id)
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
    async def slot(self, trajectory_id: str | None = None, timeout: float | None = None) -> AsyncIterator[Slot]:
        leased = await self.acquire(trajectory_id, timeout)
        try:
            yield leased
        finally:
            self.release(leased)

    def heartbeat(self, slot: Slot) -> None:
        """Tell the pool the trajectory holding `slot` is alive (tool calls count as heartbeats)."""
        self._book.check(slot).last_seen = time.monotonic()

    # -- tool calls ----------------------------------------------------------------------------

    def server_of(self, slot: Slot) -> ServerInfo:
        """Where the slot's server listens (and its token): for debugging and direct calls."""
        return self._servers[self._book.check(slot).server_id].info

    def server_ids(self) -> list[str]:
        return list(self._servers)

    def enforcement(self) -> dict[str, dict[str, Any]]:
        """Per server: what it said it enforces when it joined (isolation, network, the uid slots
        run as, limits, cgroups, and why an `auto` mode fell back), from its /health."""
        keys = ("isolation", "network", "uid", "limits", "cgroups", "isolation_reason", "network_reason")
        return {sid: {k: s.health.get(k) for k in keys} for sid, s in self._servers.items()}

    async def server_health(self, slot: Slot) -> dict[str, Any]:
        """/health of the slot's server, through the same pooled connection its calls use."""
        st = self._book.check(slot)
        return await self._servers[st.server_id].client.health(timeout=self.config.health_timeout)

    async def execute(
        self, slot: Slot, tool: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> ExecuteResult:
        """Run one tool call in the leased slot. A command's failure is in the result; a failure of
        the sandbox raises InfrastructureError (SlotLost: acquire another slot)."""
        st = self._book.check(slot)
        server = self._servers[st.server_id]
        st.inflight += 1
        st.dirty = True
        started = time.monotonic()
        try:
            result = await server.client.execute(st.index, tool, args or {}, timeout or self.config.tool_timeout)
        except SlotPoolError as exc:
            self._stats.error(exc)
            if isinstance(exc, SlotLost):
                self._spawn(self._check_server(server))
            raise
        finally:
            st.inflight -= 1
            st.last_seen = time.monotonic()
        self._stats.call(tool, time.monotonic() - started)
        return result

    async def execute_batch(self, calls: Sequence[BatchCall]) -> list[ExecuteResult | InfrastructureError]:
        """Run many calls, one HTTP request per server. Results come in order; a call whose sandbox
        failed gets the InfrastructureError in its place instead of a result."""
        out: list[ExecuteResult | InfrastructureError | None] = [None] * len(calls)
        groups: dict[str, list[int]] = {}
        states: list[SlotState] = []
        for i, (slot, _tool, _args, _timeout) in enumerate(calls):
            st = self._book.check(slot)
            states.append(st)
            groups.setdefault(st.server_id, []).append(i)
        # resolved now, while every checked slot's server is still in the pool: the requests
        # start only once this coroutine yields, and a server may be lost by then
        servers = {sid: self._servers[sid] for sid in groups}

        async def run_server(server: _Server, indices: list[int]) -> None:
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
                    self._spawn(self._check_server(server))
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

    # -- failure detection and replacement ------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            await asyncio.gather(*(self._check_server(s) for s in list(self._servers.values())))

    async def _check_server(self, server: _Server) -> None:
        if server.info.server_id not in self._servers:
            return
        deadline = self.config.health_timeout
        try:
            await server.client.health(timeout=deadline)
            server.last_ok = time.monotonic()
        except ServerRefused as exc:  # nothing listens any more: the server is gone
            self._lose(server.info.server_id, f"connection refused ({exc!r})")
        except Exception as exc:
            if time.monotonic() - server.last_ok >= deadline:
                self._lose(server.info.server_id, f"/health unanswered for {deadline}s ({exc!r})")

    def _on_exit(self, server_id: str, _exited: object = None) -> None:
        if not self._closed:
            self._lose(server_id, "its process exited")

    def _lose(self, server_id: str, reason: str) -> None:
        server = self._servers.pop(server_id, None)
        if server is None or self._closed:
            return
        server.client.mark_lost(reason)  # in-flight calls fail now, not at their timeout
        slots = self._book.remove_server(server_id, SlotStatus.LOST)
        leased = sum(1 for st in slots if st.lease_id)
        self._stats.counters["servers_lost"] += 1
        log.error("event=server_lost server=%s reason=%s slots=%d leased=%d", server_id, reason, len(slots), leased)
        self.progress(f"server {server_id} lost ({reason}); {leased} leased slot(s) fail with SlotLost; replacing it")
        self._replacing += 1
        self._spawn(self._replace(server))

    async def _replace(self, server: _Server) -> None:
        try:
            await self._replace_once(server)
        finally:
            self._replacing -= 1

    async def _replace_once(self, server: _Server) -> None:
        await server.client.aclose()
        sid = server.info.server_id
        for attempt in range(1, _REPLACE_ATTEMPTS + 1):
            try:
                infos = await self.backend.replace_server(sid, self.progress)
                break
            except Exception as exc:
                log.error("event=replace_failed server=%s attempt=%d error=%s", sid, attempt, exc)
                self.progress(f"could not replace server {sid} (attempt {attempt}/{_REPLACE_ATTEMPTS}): {exc}")
                if attempt == _REPLACE_ATTEMPTS:
                    return
                await asyncio.sleep(_SCALE_UP_RETRY * attempt)
        if not self._closed:
            await self._register(infos)
            self.progress(f"capacity back: {len(self._book.slots)} slots on {len(self._servers)} server(s)")

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

    # -- scaling -------------------------------------------------------------------------------

    async def _scale_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._scale_wakeup.wait(), timeout=1.0)
            self._scale_wakeup.clear()
            try:
                await self._scale_once()
            except Exception as exc:  # a failed scaling step must not stop the loop
                self._stats.error(exc)
                log.error("event=scale_failed error=%s", exc)

    async def _scale_once(self) -> None:
        c = self.config
        now = time.monotonic()
        waiting = self._book.waiting
        have = len(self._servers) + self._replacing  # a replacement under way counts: it is coming
        if (
            waiting
            and self._book.free_count == 0
            and have < c.max_containers
            and now - self._scale_up_failed >= _SCALE_UP_RETRY
        ):
            want = min(math.ceil(waiting / c.slots_per_container), c.max_containers - have)
            self.progress(f"scaling up by {want}: {waiting} trajectories wait for a slot")
            self._stats.counters["scale_ups"] += 1
            self._last_scale = now
            try:
                infos = await self.backend.add_servers(want, self.progress)
            except Exception:
                self._scale_up_failed = time.monotonic()
                raise
            await self._register(infos)
            return
        busy = {st.server_id for st in self._book.slots.values() if st.status is not SlotStatus.FREE}
        for busy_id in busy:
            if busy_id in self._servers:
                self._servers[busy_id].idle_since = now
        if waiting or len(self._servers) <= c.min_containers or now - self._last_scale < c.scale_cooldown:
            return
        idle = sorted(
            (s for s in self._servers.values() if now - s.idle_since >= c.idle_scale_down), key=lambda s: s.idle_since
        )
        sid = self.backend.pick_removable([s.info.server_id for s in idle])
        if sid is not None:
            victim = self._servers[sid]
            self._book.remove_server(sid, SlotStatus.DRAINING)
            del self._servers[sid]
            self._stats.counters["scale_downs"] += 1
            self._last_scale = now
            self.progress(f"scaling down: server {sid} idle for {now - victim.idle_since:.0f}s")
            victim.client.mark_lost("removed by scale-down")
            await victim.client.aclose()
            await self.backend.remove_server(sid)

    # -- introspection -------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        s = self._stats
        return PoolStats(
            servers=len(self._servers),
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
            scale_ups=s.counters["scale_ups"],
            scale_downs=s.counters["scale_downs"],
        )
