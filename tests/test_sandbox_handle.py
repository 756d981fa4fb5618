"""The sandbox handle (`pool.sandbox()`) and its synchronous twin (SyncSlotPool) on a real local
pool: every call an agent framework makes, from many threads at once, and from code that runs an
event loop of its own."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from atropos.errors import InvalidToolCall
from atropos.slots import SlotPool, SlotPoolConfig, SyncSlotPool


def _cfg(slots: int = 2) -> SlotPoolConfig:
    return SlotPoolConfig(slots_per_container=slots, min_containers=1, max_containers=1)


async def test_a_sandbox_runs_reads_writes_moves_files_and_forks(tmp_path: Path) -> None:
    local = tmp_path / "local"
    (local / "pkg").mkdir(parents=True)
    (local / "pkg" / "mod.py").write_text("X = 1\n")
    (local / "run.sh").write_text("echo run\n")
    os.chmod(local / "run.sh", 0o755)
    async with SlotPool(_cfg()) as pool:
        async with pool.sandbox(trajectory_id="t1") as sb:
            assert sb.trajectory_id == "t1"
            result = await sb.run('mkdir -p a/b && cd a/b && pwd && echo "$GREETING"', env={"GREETING": "hi"})
            assert result.stdout.endswith("/a/b\nhi\n"), result
            assert (await sb.run("pwd", cwd="a")).stdout.endswith("/a\n")
            assert (await sb.session("cd a && export S=1")).ok
            assert (await sb.session("pwd; echo $S")).stdout.endswith("/a\n1\n")
            await sb.write("notes/t.txt", "text\n")
            await sb.write("blob.bin", b"\x00\xff\x10", mode=0o600)
            assert await sb.read("notes/t.txt") == "text\n"
            assert await sb.read("blob.bin", binary=True) == b"\x00\xff\x10"
            with pytest.raises(InvalidToolCall, match=r"missing\.txt"):
                await sb.read("missing.txt")
            with pytest.raises(InvalidToolCall, match="own unprivileged user"):
                await sb.run("id", user="root")
            await sb.upload(str(local / "pkg"), "src/pkg")
            await sb.upload(str(local / "run.sh"), "bin/run.sh")
            assert (await sb.run("cat src/pkg/mod.py && bin/run.sh")).stdout == "X = 1\nrun\n"
            await sb.download("src", str(tmp_path / "back"), tree=True)
            await sb.download("blob.bin", str(tmp_path / "back" / "blob.bin"))
            assert (tmp_path / "back" / "pkg" / "mod.py").read_text() == "X = 1\n"
            assert (tmp_path / "back" / "blob.bin").read_bytes() == b"\x00\xff\x10"
            info = await sb.snapshot("base")
            assert info.files >= 4
            async with await sb.fork("base", trajectory_id="t1-fork") as child:
                assert (await child.run("cat notes/t.txt; echo more >> notes/t.txt")).stdout == "text\n"
            assert await sb.read("notes/t.txt") == "text\n"  # the fork's write stayed in the fork
        assert sb.closed
        await sb.close()  # twice: nothing
        stats = pool.stats()
    assert stats.leases == 2 and stats.releases == 2, stats


def test_the_synchronous_twin_serves_many_threads_and_a_caller_with_its_own_loop() -> None:
    with SyncSlotPool(_cfg(slots=4)) as pool:
        outputs: dict[int, str] = {}
        errors: list[BaseException] = []

        def rollout(n: int) -> None:
            try:
                with pool.sandbox(trajectory_id=f"thread-{n}") as sb:
                    sb.write("n.txt", str(n))
                    outputs[n] = sb.run("cat n.txt; echo -n $X", env={"X": "!"}).stdout
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=rollout, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and outputs == {n: f"{n}!" for n in range(8)}

        async def inside_a_running_loop() -> str:  # e.g. a framework's async code calling a sync tool
            with pool.sandbox() as sb:
                return sb.run("echo nested-free").stdout

        assert asyncio.run(inside_a_running_loop()) == "nested-free\n"
        assert pool.stats().leases == 9


def test_a_synchronous_call_from_the_pools_own_loop_is_refused() -> None:
    with SyncSlotPool(_cfg(slots=1)) as pool:

        async def on_the_pools_loop() -> None:
            pool.open_sandbox()

        future = asyncio.run_coroutine_threadsafe(on_the_pools_loop(), pool.loop)
        with pytest.raises(RuntimeError, match=r"pool's own loop"):
            future.result(timeout=30)
