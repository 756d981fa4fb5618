"""A scale-up that keeps failing (a job that can never start, an exhausted quota) is tried again
later each time, not every few seconds: first after 5 s, doubling, never more than 5 minutes apart.
On a real pool, a backend whose scale-ups fail is not asked on every pass of the scaler, and the
user is told when the next attempt comes."""

from __future__ import annotations

import os
import signal

import pytest

from atropos.backends.base import ServerInfo
from atropos.backends.local import LocalBackend
from atropos.errors import BackendError
from atropos.progress import Progress, no_progress
from atropos.slots import AcquireTimeout, SlotPool, SlotPoolConfig, fleet
from atropos.slots.scaling import retry_after
from tests.faults import wait_for


def test_the_retry_schedule_doubles_and_is_capped() -> None:
    assert [retry_after(n) for n in range(0, 5)] == [0.0, 5.0, 10.0, 20.0, 40.0]
    assert retry_after(9) == 300.0 and retry_after(50) == 300.0


class FailingScaleUps(LocalBackend):
    """Starts the pool's first server, then refuses every further one."""

    def __init__(self, config: SlotPoolConfig) -> None:
        super().__init__(config.server_spec())
        self.asked = 0

    async def add_servers(self, count: int, progress: Progress = no_progress) -> list[ServerInfo]:
        self.asked += 1
        if self.asked > 1:
            raise BackendError("slurm job 7: pending (PartitionConfig): it will not start")
        return await super().add_servers(count, progress)


async def test_a_pool_whose_scale_ups_fail_does_not_ask_again_at_once() -> None:
    config = SlotPoolConfig(slots_per_container=1, min_containers=1, max_containers=2, scale_cooldown=0)
    backend = FailingScaleUps(config)
    said: list[str] = []
    async with SlotPool(config, backend=backend, progress=said.append) as pool:
        held = await pool.acquire("a")
        try:
            await pool.acquire("b", timeout=8)  # waits: the scaler tries once, then waits 5 s, then once more
        except AcquireTimeout:
            pass
        pool.release(held)
    assert backend.asked - 1 in (1, 2), backend.asked  # scale-ups asked for: not one per scaler pass (~1 s)
    assert any("next attempt in 5s" in line for line in said), said  # the user is told when it tries again


class RefusedReplacements(LocalBackend):
    """A node lost with its server, and no room left for a replacement the first `refusals` times."""

    def __init__(self, config: SlotPoolConfig, refusals: int) -> None:
        super().__init__(config.server_spec())
        self.refusals = refusals
        self.replaces = 0

    async def replace_server(self, server_id: str, progress: Progress = no_progress) -> list[ServerInfo]:
        self.replaces += 1
        if self.replaces <= self.refusals:
            raise BackendError("nomad: placement failed: 1 node(s) exhausted on cpu: exhausted")
        return await super().replace_server(server_id, progress)


async def test_a_replacement_that_cannot_be_placed_is_said_and_tried_until_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # it used to give up after 3 tries, the pool short of a server for the rest of the run, silently
    monkeypatch.setattr(fleet, "_REPLACE_BACKOFF", 0.05)
    config = SlotPoolConfig(slots_per_container=1, min_containers=2, max_containers=2, health_interval=0.1)
    backend = RefusedReplacements(config, refusals=4)
    said: list[str] = []
    async with SlotPool(config, backend=backend, progress=said.append) as pool:
        os.kill(backend.pid(pool.server_ids()[0]), signal.SIGKILL)
        assert await wait_for(lambda: pool.stats().replace_error is not None)
        short = pool.stats()
        assert short.replacements_pending == 1 and "cpu: exhausted" in str(short.replace_error), short
        assert await wait_for(lambda: pool.stats().servers == 2)
        back = pool.stats()
    assert backend.replaces == 5, backend.replaces
    assert (back.replacements_pending, back.replace_error) == (0, None), back
    assert any("(attempt 4)" in line and "running short: 1 slots on 1 server(s)" in line for line in said), said
    assert any(line.startswith("capacity back: 2 slots on 2 server(s)") for line in said), said
