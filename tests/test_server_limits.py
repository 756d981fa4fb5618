"""Resource limits: each abuse is stopped with a result that says which limit, while the server
keeps answering /health and the other slots' calls complete (real server, real bubblewrap)."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from atropos.sandbox.limits import SlotLimits
from atropos.sandbox.runner.rlimits import count_tasks
from atropos.sandbox.server.cgroups import SlotCgroups
from atropos.units import format_size, parse_size
from tests.server_process import RunningServer, run_server

LIMIT_ARGS = (
    "--slots",
    "3",
    "--limit-memory",
    "512M",
    "--limit-processes",
    "64",
    "--limit-cpu",
    "2",
    "--limit-file-size",
    "64M",
    "--limit-workspace",
    "200M",
    "--limit-tmp",
    "100M",
)
# the pool declares a server lost when /health takes longer than this
HEALTH_DEADLINE = 2.0


def _cgroups_writable() -> bool:
    groups = SlotCgroups.create()
    if groups is None:
        return False
    from atropos.sandbox.server.cgroups import remove_server_groups

    remove_server_groups()
    return True


@pytest.fixture(scope="module", params=["bwrap", "none"])
def limited(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp(f"limits-{request.param}")
    with run_server(str(data), "--isolation", request.param, *LIMIT_ARGS) as srv:
        srv.isolation = request.param  # type: ignore[attr-defined]
        yield srv


@pytest.fixture(scope="module")
def limited_bwrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("limits-bwrap-only")
    with run_server(str(data), "--isolation", "bwrap", *LIMIT_ARGS) as srv:
        yield srv


@dataclass
class Neighbours:
    """/health pings and another slot's calls, running while an abuse happens."""

    health_ms: list[float] = field(default_factory=list)
    health_failures: list[str] = field(default_factory=list)
    other_results: list[dict[str, object]] = field(default_factory=list)
    other_failures: list[str] = field(default_factory=list)


@contextmanager
def neighbours(srv: RunningServer, other_slot: int = 2) -> Iterator[Neighbours]:
    seen = Neighbours()
    stop = threading.Event()

    def ping() -> None:
        with httpx.Client(base_url=srv.url, timeout=HEALTH_DEADLINE) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = c.get("/health")
                    r.raise_for_status()
                    seen.health_ms.append((time.perf_counter() - t0) * 1000)
                except httpx.HTTPError as exc:
                    seen.health_failures.append(repr(exc))
                time.sleep(0.02)

    def work() -> None:
        with srv.client(timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post("/execute", json={"slot": other_slot, "tool": "bash", "args": {"command": "echo hi"}})
                    seen.other_results.append(r.json())
                except httpx.HTTPError as exc:
                    seen.other_failures.append(repr(exc))
                time.sleep(0.05)

    # the neighbour's runner is started before the abuse, and each thread is running when it begins
    # (a short abuse could otherwise end before a thread made its first call)
    assert srv.execute(other_slot, "bash", command="echo hi")["output"] == "hi\n"
    threads = [threading.Thread(target=ping), threading.Thread(target=work)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while not (seen.health_ms and seen.other_results) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield seen
    finally:
        stop.set()
        for t in threads:
            t.join()
    p99 = statistics.quantiles(seen.health_ms, n=100)[98] if len(seen.health_ms) >= 2 else float("nan")
    print(
        f"\n/health during abuse: {len(seen.health_ms)} pings, p50 "
        f"{statistics.median(seen.health_ms) if seen.health_ms else float('nan'):.1f} ms, p99 {p99:.1f} ms"
    )
    assert not seen.health_failures, seen.health_failures[:3]
    assert seen.health_ms, "no /health answer at all during the abuse"
    assert not seen.other_failures, seen.other_failures[:3]
    assert seen.other_results and all(r.get("ok") and r.get("output") == "hi\n" for r in seen.other_results)


def _clean(srv: RunningServer, slot: int = 0) -> None:
    # only the workspace (the cwd): with isolation none, /tmp is the host's
    r = srv.execute(slot, "bash", command="rm -rf -- ./* ; true")
    assert r["limit"] is None, r


def test_memory_allocation_over_limit_fails_with_memory_limit(limited: RunningServer) -> None:
    with neighbours(limited):
        r = limited.execute(0, "bash", timeout=30, command="python3 -c 'b = bytearray(2 * 1024**3); print(len(b))'")
    assert r["ok"] is False and r["limit"] == "memory", r
    assert "MemoryError" in r["stderr"] and "memory limit reached" in r["error"]


def test_file_over_size_limit_is_stopped_by_sigxfsz(limited: RunningServer) -> None:
    with neighbours(limited):
        r = limited.execute(0, "bash", timeout=30, command="yes > big.txt")
    assert r["exit_code"] == 128 + 25 and r["limit"] == "file_size", r
    assert "file size limit reached (64 MiB)" in r["error"]
    size = int(limited.execute(0, "bash", command="stat -c %s big.txt")["output"])
    assert size <= parse_size("64M")
    _clean(limited)


def test_filling_the_workspace_is_stopped_and_deleting_still_works(limited: RunningServer) -> None:
    fill = "for i in $(seq 1 8); do head -c 50M /dev/zero > f$i; done; sleep 5; echo not reached"
    with neighbours(limited):
        r = limited.execute(0, "bash", timeout=60, command=fill)
    assert r["limit"] == "workspace" and r["ok"] is False, r
    assert "not reached" not in r["output"]
    assert "workspace size limit reached (200 MiB)" in r["error"]
    # over the limit, a command that frees space still runs
    r = limited.execute(0, "bash", command="rm -f f*; sleep 1.5; echo freed")
    assert r["ok"] and r["output"] == "freed\n" and r["limit"] is None, r


def test_cpu_time_limit_stops_a_busy_loop(limited: RunningServer) -> None:
    with neighbours(limited):
        r = limited.execute(0, "bash", timeout=60, command="python3 -c 'while True: pass'")
    assert r["limit"] == "cpu_time" and r["exit_code"] == 128 + 24 and not r["timed_out"], r
    assert "CPU time limit reached (2 s per process)" in r["error"]


def test_output_flood_is_cut_at_the_timeout(limited: RunningServer) -> None:
    with neighbours(limited):
        r = limited.execute(0, "bash", timeout=2, command="yes")
    assert r["timed_out"] and r["truncated"] and r["ok"] is False, {k: r[k] for k in ("timed_out", "truncated")}
    assert len(r["stdout"]) <= (1 << 20) + 64


def test_sigterm_ignoring_command_is_killed_at_its_timeout(limited: RunningServer) -> None:
    with neighbours(limited):
        r = limited.execute(0, "bash", timeout=1.5, command="trap '' TERM; (trap '' TERM; sleep 301) & sleep 301")
    assert r["timed_out"] and r["exit_code"] == 128 + 9, r
    left = limited.execute(0, "bash", command="pgrep -f 'slee[p] 301' | wc -l")
    assert left["output"].strip() == "0", "a TERM-ignoring process survived its timeout"


def test_fork_bomb_is_stopped_and_the_slot_recovers(limited_bwrap: RunningServer) -> None:
    srv = limited_bwrap
    with neighbours(srv):
        bomb = srv.execute(0, "bash", timeout=20, command=":(){ :|:& };:")
        # the bomb's processes live on in the background until the watch (or the next fork) kills them
        deadline = time.monotonic() + 20
        notes = []
        while time.monotonic() < deadline:
            r = srv.execute(0, "bash", command="ls /proc | grep -c '^[0-9]'")
            notes.append(r)
            if r["ok"] and int(r["stdout"]) < 10 and any(n["limit"] == "processes" for n in [bomb, *notes]):
                break
            time.sleep(0.3)
    assert int(notes[-1]["stdout"]) < 10, notes[-1]
    said = [n for n in [bomb, *notes] if n["limit"] == "processes"]
    assert said, "no result said the process limit stopped the bomb"
    assert any("process limit reached (64 per slot)" in (n["output"] + (n["error"] or "")) for n in said)


def test_foreground_fork_bomb_result_names_the_limit(limited_bwrap: RunningServer) -> None:
    with neighbours(limited_bwrap):
        r = limited_bwrap.execute(0, "bash", timeout=20, command="f(){ f | f; }; f")
    assert r["limit"] == "processes" and r["ok"] is False, {k: r[k] for k in ("limit", "error", "exit_code")}


def test_private_tmp_is_bounded(limited_bwrap: RunningServer) -> None:
    r = limited_bwrap.execute(0, "bash", command="head -c 60M /dev/zero > /tmp/a; head -c 60M /dev/zero > /tmp/b")
    assert r["ok"] is False and "No space left on device" in r["stderr"], r
    assert limited_bwrap.execute(0, "bash", command="rm /tmp/a /tmp/b")["ok"]


@pytest.mark.skipif(
    os.geteuid() != 0 or not _cgroups_writable(),
    reason="per-slot cgroups need write access to the v1 memory and pids hierarchies (root)",
)
def test_slot_memory_cgroup_kills_processes_that_together_exceed_it(limited_bwrap: RunningServer) -> None:
    each = "python3 -c 'import time; b = bytearray(300 * 1024**2); time.sleep(3)'"
    with neighbours(limited_bwrap):
        r = limited_bwrap.execute(0, "bash", timeout=30, command=f"for i in 1 2 3; do {each} & done; wait")
    assert r["limit"] == "memory", r


def test_limits_off_with_none(tmp_path: str) -> None:
    with run_server(
        str(tmp_path),
        "--isolation",
        "bwrap",
        "--slots",
        "1",
        "--limit-memory",
        "none",
        "--limit-file-size",
        "none",
        "--limit-cpu",
        "none",
    ) as srv:
        r = srv.execute(0, "bash", command="ulimit -d; ulimit -f; ulimit -t")
    assert r["output"].split() == ["unlimited"] * 3, r


def test_commands_cannot_raise_their_limits(limited: RunningServer) -> None:
    r = limited.execute(0, "bash", command="ulimit -d; ulimit -f; ulimit -Hd; ulimit -d unlimited")
    lines = r["output"].splitlines()
    assert lines[:3] == [str(512 * 1024), str(64 * 1024), str(512 * 1024)], r
    assert r["ok"] is False and "ulimit" in r["stderr"]


def test_size_parsing_and_formatting() -> None:
    assert parse_size("2G") == 2 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000
    assert format_size(2 << 30) == "2 GiB" and format_size(1000) == "1000 bytes"
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
    assert SlotLimits().runner_args(nproc_rlimit=True)[-1] == "--nproc-rlimit"
    assert "--nproc-rlimit" not in SlotLimits().runner_args(nproc_rlimit=False)


def test_bad_limit_option_is_one_clear_line(tmp_path: str) -> None:
    import subprocess
    import sys

    for bad, expect in ((["--limit-memory", "lots"], "not a size"), (["--limit-processes", "2"], "--limit-processes")):
        proc = subprocess.run(
            [sys.executable, "-m", "atropos.sandbox.server", "--data-dir", str(tmp_path), *bad],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2 and expect in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_count_tasks_sees_threads() -> None:
    assert count_tasks() >= len(os.listdir("/proc/self/task"))


async def test_pool_limits_reach_every_slot() -> None:
    from atropos.slots import SlotPool, SlotPoolConfig

    limits = SlotLimits(file_size=2 * 1024 * 1024, cpu_seconds=7, memory=None)
    config = SlotPoolConfig(driver="process", slots_per_container=1, min_containers=1, max_containers=1, limits=limits)
    async with SlotPool(config) as pool, pool.slot(trajectory_id="limits") as slot:
        # the CPU limit is set on each command just after it starts (the runner's own CPU must not
        # count): read it a moment later, as a command that ran into it would
        r = await pool.execute(slot, "bash", {"command": "sleep 0.2; ulimit -f; ulimit -t; ulimit -d"})
        assert r.stdout.split() == ["2048", "7", "unlimited"], r
        r = await pool.execute(slot, "bash", {"command": "head -c 3M /dev/zero > big"})
        assert r.limit == "file_size" and not r.ok, r


def test_pool_passes_only_the_limits_it_changes() -> None:
    # servers of images built before the --limit-* options keep starting under default limits
    assert SlotLimits().server_args() == []
    assert SlotLimits(memory=None, cpu_seconds=5).server_args() == ["--limit-memory", "none", "--limit-cpu", "5"]
