"""Nomad connection resets (the stand-in aborts connections without answering): the client rides
over a few with its retries and fails with a typed error while they last; a pool keeps every call
exactly-once while Nomad resets and one of its allocations is lost, and recovers afterwards."""

from __future__ import annotations

import asyncio
import signal
from urllib.parse import urlparse

import pytest

from atropos.nomad.errors import NomadConnectionError
from atropos.slots import SlotPool
from tests.faults import assert_exactly_once, calls_during, signal_pids, wait_for
from tests.nomad_fixtures import client_for, nomad_backend
from tests.nomad_standin import NomadStandIn
from tests.server_process import pids_with_arg
from tests.test_pool_nomad import pool_config


async def test_client_rides_over_resets_then_fails_typed_then_recovers(nomad_standin: NomadStandIn) -> None:
    async with client_for(nomad_standin.address) as client:  # 3 attempts per request
        nomad_standin.faults.reset("GET", r"^/v1/jobs$", times=2)  # python-nomad (requests)
        assert await client.list_jobs() == []
        nomad_standin.faults.reset("GET", r"^/v1/agent/health$", times=2)  # httpx
        assert (await client.agent_health()).server.ok
        assert nomad_standin.resets == 4
        nomad_standin.faults.reset("*", r"^/v1/", times=None, for_seconds=3600)
        with pytest.raises(NomadConnectionError, match="cannot reach Nomad"):
            await client.list_jobs()
        with pytest.raises(NomadConnectionError, match="cannot reach Nomad"):
            await client.watch_job_allocations("nope", index=1, wait=1.0)
        nomad_standin.faults.rules.clear()
        assert await client.list_jobs() == []


async def test_pool_calls_exactly_once_while_nomad_resets_and_an_allocation_dies(nomad_standin: NomadStandIn) -> None:
    config = pool_config(min_containers=2, max_containers=2, slots_per_container=2)
    backend = nomad_backend(config, client_for(nomad_standin.address))
    async with SlotPool(config, backend=backend) as pool:

        async def scenario() -> None:
            await asyncio.sleep(1.0)
            # Nomad resets every connection for a while; meanwhile an allocation's server dies
            nomad_standin.faults.reset("*", r"^/v1/", times=None, for_seconds=4.0)
            probe = await pool.acquire("probe", timeout=60)  # the one slot no trajectory holds
            port = urlparse(pool.server_of(probe).url).port
            pool.release(probe)
            signal_pids(pids_with_arg(f"--port {port} "), signal.SIGKILL)
            assert await wait_for(lambda: pool.stats().servers_lost == 1)
            # the replacement needs Nomad: it comes once the resets stop (the pool retries)
            assert await wait_for(lambda: pool.stats().servers == 2)
            await asyncio.sleep(1.0)  # calls on the replacement

        report, wrong = await calls_during(pool, scenario(), trajectories=3)
        print(report, nomad_standin.resets)
        assert nomad_standin.resets > 0
        assert_exactly_once(report, wrong)
        assert report.errors.get("SlotLost", 0) > 0
        slot = await pool.acquire("after", timeout=30)
        assert (await pool.execute(slot, "bash", {"command": "echo back"})).stdout == "back\n"
