"""SlotPool on the local backend: real servers, real processes, real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from atropos.backends.local import LocalBackend
from atropos.slots import (
    AcquireTimeout,
    LeaseError,
    PoolClosed,
    Slot,
    SlotLost,
    SlotPool,
    SlotPoolConfig,
)
from tests.faults import wait_for
from tests.server_process import pids_with_arg, wait_until_gone


def cfg(**kw: object) -> SlotPoolConfig:
    base: dict[str, object] = {
        "slots_per_container": 4,
        "min_containers": 1,
        "max_containers": 1,
        "health_interval": 0.25,
        "scale_cooldown": 0.0,
    }
    base.update(kw)
    return SlotPoolConfig.model_validate(base)


async def test_64_trajectories_no_cross_talk() -> None:
    config = cfg(slots_per_container=16, min_containers=4, max_containers=4)
    async with SlotPool(config) as pool:
        seen_slots: list[str] = []

        async def trajectory(i: int) -> None:
            async with pool.slot(trajectory_id=f"traj-{i}", timeout=120) as slot:
                seen_slots.append(slot.slot_id)
                first = await pool.execute(slot, "bash", {"command": "ls -A | wc -l"})
                assert first.stdout == "0\n", f"slot {slot.slot_id} was not empty for traj-{i}"
                await pool.execute(slot, "write_file", {"path": "me.txt", "content": f"traj-{i}"})
                await pool.execute(slot, "bash_session", {"command": f"mkdir -p d{i} && cd d{i} && export ME={i}"})
                for _ in range(3):
                    await asyncio.sleep(0)
                    res = await pool.execute(slot, "bash_session", {"command": "echo $ME $(basename $PWD)"})
                    assert res.stdout == f"{i} d{i}\n"
                mine = await pool.execute(slot, "read_file", {"path": "me.txt"})
                assert mine.output == f"traj-{i}"

        await asyncio.gather(*(trajectory(i) for i in range(64)))
        await asyncio.gather(*(trajectory(i) for i in range(64, 96)))  # reused slots come back clean
        stats = pool.stats()
        assert stats.leases == 96 and stats.releases == 96
        assert stats.errors == {}
        assert len(set(seen_slots[:64])) == 64  # 64 concurrent leases, 64 distinct slots


async def test_slot_never_leased_twice_and_fifo() -> None:
    async with SlotPool(cfg(slots_per_container=2)) as pool:
        a = await pool.acquire("a")
        b = await pool.acquire("b")
        assert a.slot_id != b.slot_id
        order: list[str] = []

        async def waiter(name: str) -> Slot:
            s = await pool.acquire(name, timeout=30)
            order.append(name)
            return s

        tasks = [asyncio.ensure_future(waiter(f"w{i}")) for i in range(3)]
        await asyncio.sleep(0.05)
        pool.release(a)
        pool.release(b)
        first_two = await asyncio.gather(tasks[0], tasks[1])
        assert order == ["w0", "w1"]
        assert {s.slot_id for s in first_two} == {a.slot_id, b.slot_id}
        pool.release(first_two[0])
        third = await tasks[2]
        assert third.slot_id == first_two[0].slot_id
        with pytest.raises(LeaseError):  # the old handle is dead: the slot belongs to w2 now
            await pool.execute(first_two[0], "bash", {"command": "true"})
        pool.release(first_two[0])  # releasing a stale handle is a no-op ...
        assert (await pool.execute(third, "bash", {"command": "echo still-mine"})).stdout == "still-mine\n"


async def test_acquire_timeout_is_clear() -> None:
    async with SlotPool(cfg(slots_per_container=1)) as pool:
        held = await pool.acquire("holder")
        with pytest.raises(AcquireTimeout, match=r"no slot became free within 0\.2s"):
            await pool.acquire("late", timeout=0.2)
        pool.release(held)
        again = await pool.acquire("late", timeout=5)
        assert again.slot_id == held.slot_id
        assert pool.stats().acquire_timeouts == 1


async def test_release_resets_without_waiting() -> None:
    tag = f"7{os.getpid() % 10000:04d}"
    async with SlotPool(cfg(slots_per_container=1)) as pool:
        slot = await pool.acquire("dirty")
        await pool.execute(slot, "bash", {"command": f"echo x > junk; nohup sleep {tag} >/dev/null 2>&1 &"})
        pool.release(slot)
        # release returned before the reset ran: the slot is still being reset in the background
        assert pool.stats().slots_by_status["resetting"] == 1
        clean = await pool.acquire("clean", timeout=30)
        assert (await pool.execute(clean, "bash", {"command": "ls -A"})).stdout == ""
        assert wait_until_gone(f"sleep {tag}") == []


async def test_dead_trajectory_lease_is_reclaimed() -> None:
    async with SlotPool(cfg(slots_per_container=1, lease_ttl=0.6)) as pool:
        abandoned = await pool.acquire("crashed")
        await pool.execute(abandoned, "write_file", {"path": "left.txt", "content": "x"})
        fresh = await pool.acquire("next", timeout=30)
        assert fresh.slot_id == abandoned.slot_id
        assert (await pool.execute(fresh, "bash", {"command": "ls -A"})).stdout == ""
        with pytest.raises(LeaseError, match="reclaimed"):
            await pool.execute(abandoned, "bash", {"command": "true"})
        assert pool.stats().reclaimed == 1


async def test_heartbeat_and_long_calls_keep_lease() -> None:
    async with SlotPool(cfg(slots_per_container=1, lease_ttl=1.0)) as pool:
        slot = await pool.acquire("alive")
        res = await pool.execute(slot, "bash", {"command": "sleep 2.5; echo done"})  # in flight past the TTL
        assert res.stdout == "done\n"
        for _ in range(8):
            await asyncio.sleep(0.2)
            pool.heartbeat(slot)
        assert (await pool.execute(slot, "bash", {"command": "echo ok"})).stdout == "ok\n"
        assert pool.stats().reclaimed == 0


def _server_pid(pool: SlotPool, server_id: str) -> int:
    backend = pool.backend
    assert isinstance(backend, LocalBackend)
    return backend.pid(server_id)


@pytest.mark.parametrize("how", ["kill", "stop"])
async def test_server_failure_is_slot_lost_and_capacity_returns(how: str) -> None:
    config = cfg(slots_per_container=2, min_containers=2, max_containers=2)
    async with SlotPool(config) as pool:
        slots = [await pool.acquire(f"t{i}") for i in range(4)]
        victim_id = slots[0].server_id
        doomed = [s for s in slots if s.server_id == victim_id]
        healthy = [s for s in slots if s.server_id != victim_id]
        assert len(doomed) == 2 and len(healthy) == 2
        in_flight = [
            asyncio.ensure_future(pool.execute(s, "bash", {"command": "sleep 20"}, timeout=60)) for s in doomed
        ]
        ok_calls = [asyncio.ensure_future(pool.execute(s, "bash", {"command": "sleep 1; echo fine"})) for s in healthy]
        await asyncio.sleep(0.3)
        pid = _server_pid(pool, victim_id)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        try:
            results = await asyncio.gather(*in_flight, return_exceptions=True)
            detected = time.monotonic() - t0
            assert all(isinstance(r, SlotLost) for r in results), results
            # the commands run for 20 s: failing well before that means the loss was detected
            assert detected < 10, f"in-flight calls took {detected:.1f}s to fail"
            assert [r.stdout for r in await asyncio.gather(*ok_calls)] == ["fine\n", "fine\n"]
            with pytest.raises(SlotLost):
                await pool.execute(doomed[0], "bash", {"command": "true"})
            pool.release(doomed[0])  # no error: the slot is simply gone
            deadline = time.monotonic() + 30
            while pool.stats().servers < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert pool.stats().servers == 2 and pool.stats().servers_lost == 1
            replacement = await pool.acquire("retry", timeout=30)
            assert replacement.server_id != victim_id
            assert (await pool.execute(replacement, "bash", {"command": "echo back"})).stdout == "back\n"
        finally:
            if how == "stop":
                with contextlib.suppress(ProcessLookupError):  # the pool has killed it already
                    os.kill(pid, signal.SIGCONT)


async def test_scale_up_and_down_locally() -> None:
    config = cfg(slots_per_container=2, min_containers=1, max_containers=2, idle_scale_down=0.5)
    async with SlotPool(config) as pool:
        assert pool.stats().servers == 1
        held = [await pool.acquire(f"h{i}") for i in range(2)]
        extra = await pool.acquire("needs-more", timeout=60)  # waits -> the pool scales up
        assert pool.stats().servers == 2 and pool.stats().scale_ups == 1
        for s in [*held, extra]:
            pool.release(s)
        deadline = time.monotonic() + 30
        while pool.stats().servers > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert pool.stats().servers == 1 and pool.stats().scale_downs == 1


async def test_batch_one_request_per_server() -> None:
    async with SlotPool(cfg(slots_per_container=3)) as pool:
        slots = [await pool.acquire(f"b{i}") for i in range(3)]
        calls = [(s, "bash", {"command": f"echo {i}"}, None) for i, s in enumerate(slots)]
        calls.append((slots[0], "bash", {"command": "echo last"}, 5.0))
        results = await pool.execute_batch(calls)
        assert [getattr(r, "stdout", None) for r in results] == ["0\n", "1\n", "2\n", "last\n"]


async def test_shutdown_leaves_nothing_behind() -> None:
    pool = SlotPool(cfg(slots_per_container=2, min_containers=2, max_containers=2))
    await pool.start()
    workdir = pool.backend.workdir  # type: ignore[attr-defined]
    slot = await pool.acquire("bg")
    await pool.execute(slot, "bash", {"command": "nohup sleep 600 >/dev/null 2>&1 &"})
    await pool.execute(slot, "bash_session", {"command": "sleep 601 &"})
    assert pids_with_arg(workdir)
    await pool.close()
    assert wait_until_gone(workdir) == []
    assert wait_until_gone("sleep 600") == [] and wait_until_gone("sleep 601") == []
    assert not os.path.exists(workdir)
    with pytest.raises(PoolClosed):
        await pool.acquire("late")
    for late_call in (pool.execute(slot, "bash", {"command": "true"}), pool.execute_batch([(slot, "bash", {}, None)])):
        with pytest.raises(PoolClosed):  # a rollout still calling after close: the pool's error, not a KeyError
            await late_call


def test_config_validation_messages(tmp_path: object) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs `image`"):
        SlotPoolConfig(driver="docker")
    with pytest.raises(ValidationError, match="needs `singularity_image`"):
        SlotPoolConfig(driver="singularity")
    with pytest.raises(ValidationError, match="does not exist"):
        SlotPoolConfig(driver="singularity", singularity_image="/nope/x.sif")
    assert SlotPoolConfig(driver="singularity", singularity_image="docker://python:3.11").driver.image
    with pytest.raises(ValidationError, match="min_containers"):
        SlotPoolConfig(min_containers=5, max_containers=2)


async def test_slot_that_cannot_be_reset_is_retired(monkeypatch: pytest.MonkeyPatch) -> None:
    from atropos.sandbox.client import ServerClient
    from atropos.slots import SlotFailed

    async def broken_reset(self: ServerClient, slot: int, timeout: float = 60.0) -> dict[str, object]:
        raise SlotFailed("reset refused (test)")

    async with SlotPool(cfg(slots_per_container=2)) as pool:
        dirty = await pool.acquire("dirty")
        await pool.execute(dirty, "write_file", {"path": "secret", "content": "x"})
        monkeypatch.setattr(ServerClient, "reset", broken_reset)
        pool.release(dirty)
        deadline = time.monotonic() + 10
        while pool.stats().slots == 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert pool.stats().slots == 1  # the uncleanable slot left the pool
        other = await pool.acquire("next", timeout=5)
        assert other.slot_id != dirty.slot_id
        assert (await pool.execute(other, "bash", {"command": "ls -A"})).stdout == ""


async def test_a_pool_closed_during_a_prepare_leaves_no_unretrieved_task_error() -> None:
    # Ctrl-C on `atropos-sandbox demo` while a task's setup ran printed `Task exception was never
    # retrieved ... SlotLost`: every task the pool spawns has its outcome retrieved; closing is no error
    import gc

    reported: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    async def close_during_a_prepare() -> None:
        async with SlotPool(cfg(slots_per_container=1, max_containers=1)) as pool:
            setup = asyncio.ensure_future(pool.prepare("slow", [("bash", {"command": "sleep 60"})]))
            assert await wait_for(lambda: pool.stats().leases == 1)
            setup.cancel()  # the caller goes (Ctrl-C); the preparation it started goes on until close
            with contextlib.suppress(asyncio.CancelledError):
                await setup

    try:
        await close_during_a_prepare()
        gc.collect()  # what the demo's exit does: the pool and its tasks are collected
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert reported == [], [str(c.get("message")) + " " + repr(c.get("exception")) for c in reported]


@pytest.mark.parametrize("started", [False, True])
async def test_a_closed_pool_refuses_to_start_and_leaves_no_server(started: bool, tmp_path: Path) -> None:
    pool = SlotPool(cfg(slots_per_container=1, max_containers=1, backend={"type": "local", "workdir": str(tmp_path)}))
    if started:
        await pool.start()
    await pool.close()
    with pytest.raises(PoolClosed, match="make a new SlotPool"):
        await pool.start()
    await pool.close()
    assert pool.stats().servers == 0 and pids_with_arg(str(tmp_path)) == []
