"""Retiring servers that have a known end (a SLURM job's time limit) before it comes, on real local
servers whose backend stops each one after a fixed lifetime, as SLURM does at `--time`: no call is
lost to the end, a call that would outlast it is refused before it runs, and the replacement is
there before the old server goes. The same on a real SLURM is in test_pool_slurm.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from atropos.backends.base import ServerInfo
from atropos.backends.local import LocalBackend
from atropos.errors import SlotDraining, SlotLost
from atropos.progress import Progress, no_progress
from atropos.slots import SlotPool, SlotPoolConfig
from tests.faults import assert_exactly_once, calls_during, wait_for


class TimedBackend(LocalBackend):
    """Local servers, each stopped by its backend `lifetime` seconds after it started."""

    def __init__(self, config: SlotPoolConfig, lifetime: float) -> None:
        super().__init__(config.server_spec())
        self.lifetime = lifetime
        self.ends: dict[str, float] = {}
        self.timers: list[asyncio.Task[None]] = []

    async def add_servers(self, count: int, progress: Progress = no_progress) -> list[ServerInfo]:
        infos = await super().add_servers(count, progress)
        for info in infos:
            self.ends[info.server_id] = time.monotonic() + self.lifetime
            self.timers.append(asyncio.ensure_future(self._end(info.server_id)))
        return infos

    async def _end(self, server_id: str) -> None:
        await asyncio.sleep(self.lifetime)
        await self.remove_server(server_id)

    def ends_in(self, server_id: str) -> float | None:
        end = self.ends.get(server_id)
        return None if end is None else end - time.monotonic()

    async def close(self) -> None:
        for timer in self.timers:
            timer.cancel()
        await super().close()


def timed_pool(lifetime: float, progress: Progress = no_progress, **kw: object) -> SlotPool:
    base: dict[str, object] = {"slots_per_container": 2, "min_containers": 1, "max_containers": 1,
                               "health_interval": 0.2, "retire_before": 12.0}  # fmt: skip
    config = SlotPoolConfig.model_validate({**base, **kw})
    return SlotPool(config, backend=TimedBackend(config, lifetime), progress=progress)


async def test_a_server_near_its_end_retires_its_replacement_comes_first_and_no_call_is_lost() -> None:
    said: list[str] = []
    pool = timed_pool(24.0, said.append)
    async with pool:
        (first,) = pool.server_ids()
        async with pool.slot("kept") as slot:
            r = await pool.execute(slot, "bash", {"command": "echo work > f"}, timeout=5)
            assert r.ok and not pool.draining(slot)
            left = pool.time_left(slot)
            assert left is not None and 12.0 < left <= 24.0
            # at min(retire_before, half its lifetime) = 12 s left it retires; the replacement starts
            assert await wait_for(lambda: pool.stats().servers_retired == 1)
            assert pool.draining(slot)
            assert any(f"server {first} retiring" in line for line in said), said
            assert await wait_for(lambda: len(pool.server_ids()) == 2)  # the replacement, while `first` serves
            # the leased slot keeps its files and serves calls that end in time
            r = await pool.execute(slot, "bash", {"command": "cat f"}, timeout=2)
            assert r.ok and r.stdout == "work\n", r
            # a call that would outlast the server does not run
            with pytest.raises(SlotDraining) as refused:
                await pool.execute(slot, "bash", {"command": "echo ran > g"}, timeout=60)
            assert isinstance(refused.value, SlotLost) and "did not run" in str(refused.value)
            (outcome,) = await pool.execute_batch([(slot, "bash", {"command": "echo ran > g"}, 60.0)])
            assert isinstance(outcome, SlotDraining)
            r = await pool.execute(slot, "bash", {"command": "ls"}, timeout=2)
            assert r.stdout == "f\n", r
            async with pool.slot("new") as other:  # new leases go to the replacement only
                assert other.server_id != first and not pool.draining(other)
        # the last slot came back: the retired server goes now, ahead of its end, not lost
        assert await wait_for(lambda: first not in pool.server_ids())
        left_at_removal = pool.backend.ends_in(first)
        assert left_at_removal is not None and left_at_removal > 0
        stats = pool.stats()
        assert stats.servers_lost == 0 and stats.servers == 1, stats
        assert stats.errors == {"SlotDraining": 2}, stats.errors


async def test_trajectories_through_a_retirement_lose_no_call() -> None:
    pool = timed_pool(24.0, slots_per_container=4)
    async with pool:
        (first,) = pool.server_ids()

        async def retirement() -> None:
            assert await wait_for(lambda: first not in pool.server_ids() and len(pool.server_ids()) == 1)
            await asyncio.sleep(1.0)  # calls on the replacement too

        report, wrong = await calls_during(pool, retirement(), trajectories=4, call_timeout=3.0)
        assert_exactly_once(report, wrong)
        assert "SlotLost" not in report.errors, report  # none lost to the end
        stats = pool.stats()
        assert stats.servers_retired == 1 and stats.servers_lost == 0, stats


async def test_with_retirement_off_the_end_loses_the_server_and_its_calls_end_in_slot_lost() -> None:
    pool = timed_pool(3.0, retire_before=0)
    async with pool:
        async with pool.slot("t") as slot:
            with pytest.raises(SlotLost) as lost:
                await pool.execute(slot, "bash", {"command": "sleep 60"}, timeout=90)
            assert not isinstance(lost.value, SlotDraining)
        assert await wait_for(lambda: pool.stats().servers_lost == 1 and len(pool.server_ids()) == 1)
        assert pool.stats().servers_retired == 0
