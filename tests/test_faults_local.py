"""Exactly-once under faults, local backend: servers SIGKILLed and frozen and a slot runner killed
while many trajectories have calls (single and batched) in flight. Every call ends once, with a
result or a typed error; the pool keeps serving with its capacity back."""

from __future__ import annotations

import asyncio
import os
import random
import signal

from atropos.bench.soak_faults import LocalFaults
from atropos.slots import SlotPool, SlotPoolConfig
from tests.faults import assert_exactly_once, calls_during, wait_for


def cfg() -> SlotPoolConfig:
    return SlotPoolConfig(
        slots_per_container=3,
        min_containers=3,
        max_containers=3,
        health_interval=0.25,
        scale_cooldown=0.0,
        acquire_timeout=60,
    )


async def test_every_call_ends_once_while_servers_die_and_freeze() -> None:
    async with SlotPool(cfg()) as pool:
        faults = LocalFaults(pool, random.Random(5))
        frozen: list[int] = []

        async def scenario() -> None:
            await asyncio.sleep(1.5)  # calls in flight everywhere
            assert await faults.inject("kill_server")
            await asyncio.sleep(1.0)
            assert await faults.inject("kill_runner")
            # freeze a server for longer than health_timeout: lost, replaced, killed by the pool
            victim = faults.backend.pid(pool.server_ids()[0])
            os.kill(victim, signal.SIGSTOP)
            frozen.append(victim)
            await asyncio.sleep(4.0)
            assert await wait_for(lambda: pool.stats().servers == 3)
            await asyncio.sleep(1.5)  # calls on the replacements

        try:
            report, wrong = await calls_during(pool, scenario(), trajectories=10)
        finally:
            for pid in frozen:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        print(report)
        assert_exactly_once(report, wrong)
        assert report.errors.get("SlotLost", 0) > 0  # the faults did hit calls in flight
        assert pool.stats().servers_lost >= 2
        assert await wait_for(lambda: pool.stats().servers == 3)
        slot = await pool.acquire("after", timeout=30)
        assert (await pool.execute(slot, "bash", {"command": "echo fine"})).stdout == "fine\n"
