"""A server stopped while calls run (SIGTERM) never passes a killed command off as the command's
own result: when the same signal reaches every process at once, as at the end of a SLURM job, the
calls in flight end in SlotLost."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from atropos.backends.local import LocalBackend
from atropos.host import snapshot, tree_members
from atropos.slots import InfrastructureError, SlotLost, SlotPool, SlotPoolConfig


@pytest.mark.parametrize("tool", ["bash", "bash_session"])
async def test_sigterm_to_every_process_of_a_server_ends_its_calls_in_slot_lost(tool: str) -> None:
    config = SlotPoolConfig(slots_per_container=2, min_containers=1, max_containers=1, warm_slots=0)
    async with SlotPool(config) as pool:
        assert isinstance(pool.backend, LocalBackend)
        slots = [await pool.acquire(f"t{i}") for i in range(2)]
        calls = [asyncio.ensure_future(pool.execute(s, tool, {"command": "sleep 30"}, timeout=60)) for s in slots]
        batch = asyncio.ensure_future(pool.execute_batch([(slots[0], "bash", {"command": "sleep 30"}, 60.0)]))
        await asyncio.sleep(1.0)  # the commands run
        server = pool.backend.pid(pool.server_ids()[0])
        # as slurmd signals a job's processes: every one, here the commands a moment before the
        # rest (the order is not set), so that a command's death reaches its slot first
        members = tree_members(server, snapshot(), include_root=True)
        commands = [pid for pid in members if _comm(pid) == "sleep"]
        assert len(commands) == 2, [_comm(p) for p in members]  # the batch waits behind slot 0's call
        _terminate(commands)
        await asyncio.sleep(0.1)
        _terminate([pid for pid in members if pid not in commands])
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(o, SlotLost) for o in outcomes), outcomes
        (in_batch,) = await batch
        assert isinstance(in_batch, InfrastructureError), in_batch


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _terminate(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
