"""Warm slots on real servers: sandboxes started ahead of their first call are as clean as cold
ones, are refilled as they are used, a warm runner that dies is started again (never used dead,
no false "session restarted"), and closing leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import signal

from atropos.backends.local import LocalBackend
from atropos.host import snapshot, tree_members
from atropos.slots import SlotPool, SlotPoolConfig
from tests.faults import wait_for
from tests.server_process import is_runner


def pool(**kw: object) -> SlotPool:
    base: dict[str, object] = {"slots_per_container": 4, "min_containers": 1, "max_containers": 1}
    return SlotPool(SlotPoolConfig.model_validate({**base, **kw}))


async def warm_state(p: SlotPool) -> dict[str, int]:
    (health,) = (await p.servers_health()).values()
    assert isinstance(health, dict), health
    warm = health["warm"]
    assert isinstance(warm, dict)
    return warm


async def until_warm(p: SlotPool, ready: int) -> dict[str, int]:
    """The server's warm state once `ready` slots are warm (readiness, not a timing assertion)."""
    for _ in range(600):
        state = await warm_state(p)
        if state["ready"] == ready:
            return state
        await asyncio.sleep(0.1)
    return await warm_state(p)


def runner_pids(p: SlotPool) -> list[int]:
    assert isinstance(p.backend, LocalBackend)
    server = p.backend.pid(p.server_ids()[0])
    return [pid for pid in tree_members(server, snapshot(), include_root=False) if is_runner(pid)]


# what a slot shows of itself on its first call: its files, its processes, its shell's state
# (ps writes to a file first: a pipeline's own processes would race with its listing)
LOOK = "ls -A; ps -eo comm= > /tmp/ps; sort /tmp/ps | uniq -c | tr -s ' '; ls -A /tmp; echo ${FOO:-unset}"


async def test_a_warm_slot_is_as_clean_as_a_cold_one() -> None:
    async with pool(warm_slots=0) as cold_pool, cold_pool.slot("c") as slot:
        cold = await cold_pool.execute(slot, "bash", {"command": LOOK})
    async with pool() as warm_pool:
        assert await until_warm(warm_pool, 4) == {"target": 4, "ready": 4}  # every slot started, none used
        assert len(runner_pids(warm_pool)) == 4
        async with warm_pool.slot("w") as slot:
            warm = await warm_pool.execute(slot, "bash", {"command": LOOK})
    assert warm.ok and cold.ok, (warm, cold)
    assert warm.stdout == cold.stdout and warm.stdout.endswith("unset\n"), (warm.stdout, cold.stdout)


async def test_warm_slots_are_refilled_as_they_are_used() -> None:
    async with pool(warm_slots=2) as p:
        assert await until_warm(p, 2) == {"target": 2, "ready": 2}
        assert len(runner_pids(p)) == 2  # the other two start on their first call
        first = await p.acquire("a")
        await p.execute(first, "bash", {"command": "true"})
        # one warm slot was used: another slot's sandbox starts, so two are warm again
        assert await wait_for(lambda: len(runner_pids(p)) == 3)
        assert await until_warm(p, 2) == {"target": 2, "ready": 2}
        p.release(first)


async def test_a_warm_runner_that_dies_is_started_again_and_its_slot_serves() -> None:
    async with pool(slots_per_container=1) as p:
        assert await until_warm(p, 1) == {"target": 1, "ready": 1}
        (dead,) = runner_pids(p)
        os.kill(dead, signal.SIGKILL)
        assert await wait_for(lambda: runner_pids(p) not in ([], [dead]))  # a new runner, warm again
        assert await until_warm(p, 1) == {"target": 1, "ready": 1}
        async with p.slot("t") as slot:
            r = await p.execute(slot, "bash_session", {"command": "echo alive"})
        assert r.ok and r.stdout == "alive\n", r
        assert "[sandbox]" not in r.output, r  # no "session restarted": it never had a session


async def test_closing_a_pool_with_warm_slots_leaves_no_process() -> None:
    p = pool(slots_per_container=3)
    async with p:
        assert await until_warm(p, 3) == {"target": 3, "ready": 3}
        assert isinstance(p.backend, LocalBackend)
        tree = tree_members(p.backend.pid(p.server_ids()[0]), snapshot(), include_root=True)
        assert len(tree) >= 4
    await asyncio.sleep(0.2)
    alive = [pid for pid in tree if _running(pid)]
    assert alive == [], alive


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit status waits for init to collect it: it holds nothing)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            return "State:\tZ" not in fh.read()
    except OSError:
        return False


async def test_by_default_a_big_server_keeps_a_bounded_number_warm() -> None:
    async with pool(slots_per_container=40, warm_slots=None) as p:
        assert (await warm_state(p))["target"] == 32  # not all 40: each warm slot holds a runner's memory
