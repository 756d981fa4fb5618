"""The slot runner's CPU time limit holds from a command's first instruction: no process the
command starts, however early, runs without it."""

from __future__ import annotations

import resource
import time
from typing import Any

import pytest

from atropos.sandbox.runner.main import Runner
from atropos.sandbox.runner.oneshot import run_oneshot
from atropos.sandbox.runner.rlimits import RunnerLimits


def _cpu_line(limits_text: str) -> list[str]:
    line = next(row for row in limits_text.splitlines() if row.startswith("Max cpu time"))
    return line.split()[3:5]


async def test_a_command_forks_with_the_cpu_limit_already_set(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # a runner descheduled right after it starts a command (a loaded node): whatever the runner
    # still had to do to the command then came too late for what the command forked at once
    real_prlimit = resource.prlimit

    def late_prlimit(*args: Any) -> Any:
        time.sleep(0.5)
        return real_prlimit(*args)

    monkeypatch.setattr(resource, "prlimit", late_prlimit)
    runner = Runner(str(tmp_path), 1 << 16, 1 << 20, RunnerLimits(cpu_seconds=7))
    first = await run_oneshot(runner.children, "cat /proc/self/limits", timeout=30, cap=1 << 16)
    session = await runner.session.run("cat /proc/self/limits", timeout=30, cap=1 << 16)
    assert _cpu_line(str(first["stdout"])) == ["7", "8"], first
    assert _cpu_line(str(session["stdout"])) == ["7", "8"], session
