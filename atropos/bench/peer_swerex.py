"""Scenario 7: SWE-ReX's local runtime server on loopback beside ours, the same commands on both.

Runs only when `swe-rex` is installed (extra `bench`). Its server is started as its own process
(`swerex-remote`) and driven through its own client, as its users would.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from atropos.bench.measure import Row, Summary, judged, sample_async
from atropos.bench.scenarios import Sizes, ms, pool_config, single_calls
from atropos.slots import SlotPool


def available() -> bool:
    return importlib.util.find_spec("swerex") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def swerex_runtime() -> AsyncIterator[Any]:
    from swerex.runtime.remote import RemoteRuntime

    port, token = _free_port(), secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="swerex-bench-")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "swerex.server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--auth-token",
        token,
        cwd=workdir,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    runtime = RemoteRuntime(host="http://127.0.0.1", port=port, auth_token=token, timeout=60)
    try:
        await runtime.wait_until_alive(timeout=60)
        yield runtime
    finally:
        with contextlib.suppress(Exception):
            await runtime.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def swerex_rows(sizes: Sizes, say: Callable[[str], None]) -> list[Row]:
    from swerex.runtime.abstract import (
        BashAction,
        Command,
        CreateBashSessionRequest,
        ReadFileRequest,
        WriteFileRequest,
    )

    n = max(20, sizes.latency_n // 4)
    rows: list[Row] = []
    say("swe-rex: local runtime server on loopback")
    async with swerex_runtime() as rex:
        await rex.create_session(CreateBashSessionRequest(session="default"))
        tmp = tempfile.mkdtemp(prefix="swerex-files-")
        path = os.path.join(tmp, "f.txt")

        async def rex_exec() -> None:
            await rex.execute(Command(command="true", shell=True))

        async def rex_session() -> None:
            await rex.run_in_session(BashAction(command="true", session="default"))

        async def rex_files() -> None:
            await rex.write_file(WriteFileRequest(path=path, content="x" * 1024))
            await rex.read_file(ReadFileRequest(path=path))

        theirs = {
            "one-shot": Summary.of(await sample_async(rex_exec, n)),
            "session": Summary.of(await sample_async(rex_session, n)),
            "files": Summary.of(await sample_async(rex_files, n)),
        }
        for i in range(8):
            await rex.create_session(CreateBashSessionRequest(session=f"s{i}"))
        t0 = time.perf_counter()

        async def rex_sleeper(i: int) -> None:
            for _ in range(sizes.session_sleeps):
                await rex.run_in_session(BashAction(command="sleep 0.05", session=f"s{i}"))

        await asyncio.gather(*(rex_sleeper(i) for i in range(8)))
        rex_wall = time.perf_counter() - t0
        shutil.rmtree(tmp, ignore_errors=True)

    async with SlotPool(pool_config(slots_per_container=8)) as pool:
        slots = [await pool.acquire(f"p{i}") for i in range(8)]
        calls = single_calls(pool, slots[0])
        ours = {key: Summary.of(await sample_async(calls[key], n)) for key in ("one-shot", "session", "files")}
        await asyncio.gather(*(pool.execute(s, "bash_session", {"command": "true"}) for s in slots))
        t0 = time.perf_counter()

        async def our_sleeper(i: int) -> None:
            for _ in range(sizes.session_sleeps):
                await pool.execute(slots[i], "bash_session", {"command": "sleep 0.05"})

        await asyncio.gather(*(our_sleeper(i) for i in range(8)))
        our_wall = time.perf_counter() - t0

    speedups = {"one-shot": 3.0, "session": 30.0, "files": 1.0}
    for key, label in (("one-shot", "one-shot `true`"), ("session", "session `true`"), ("files", "1 KB write+read")):
        speedup = theirs[key].p50 / ours[key].p50
        # ratio = ours / swe-rex; a speed-up of S means a ratio of 1/S
        rows.append(
            judged(
                Row(
                    "7 vs swe-rex",
                    f"vs swe-rex: {label} p50 (ours)",
                    ms(ours[key].p50),
                    "ms",
                    "swe-rex p50",
                    ms(theirs[key].p50),
                    f"speed-up >= {speedups[key]:g}x",
                    note=f"speed-up {speedup:.1f}x",
                    extra={"speedup": speedup, "swerex_p99_ms": ms(theirs[key].p99)},
                ),
                1.0 / speedups[key],
            )
        )
    label = f"vs swe-rex: 8 sessions x {sizes.session_sleeps} x sleep 0.05 wall (ours)"
    ideal = f"ideal {sizes.session_sleeps * 0.05:.2f} s"
    rows.append(Row("7 vs swe-rex", label, our_wall, "s", "swe-rex wall", rex_wall, ideal, ratio=our_wall / rex_wall))
    return rows
