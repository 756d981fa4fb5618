"""Scoring a trajectory in its slot: copy the task's hidden files in after the agent finished (so it
could neither read nor edit them), then run each hidden check; a check passes when it exits 0.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel

from atropos.envs.task_set import Task, TaskError
from atropos.slots import Slot, SlotPool

_OUTPUT_KEPT = 2000
_WRITE_TIMEOUT = 60.0


class CheckResult(BaseModel):
    name: str
    passed: bool
    exit_code: int | None = None
    timed_out: bool = False
    output: str = ""


async def write_files(pool: SlotPool, slot: Slot, files: Mapping[str, str], timeout: float, what: str) -> None:
    """Write text files into the slot; a file the sandbox refuses is an error of the task."""
    for path, content in files.items():
        result = await pool.execute(slot, "write_file", {"path": path, "content": content}, timeout=timeout)
        if not result.ok:
            raise TaskError(f"{what}: cannot write {path!r}: {result.error or result.output}")


async def score_task(pool: SlotPool, slot: Slot, task: Task) -> list[CheckResult]:
    try:
        await write_files(pool, slot, task.hidden_files, _WRITE_TIMEOUT, what=f"task {task.id} hidden files")
    except TaskError as exc:  # e.g. the agent left a directory where a test file goes: its loss
        return [CheckResult(name=check.name, passed=False, output=str(exc)) for check in task.checks]
    results = []
    for check in task.checks:
        result = await pool.execute(slot, "bash", task.in_workdir({"command": check.command}), timeout=check.timeout)
        results.append(
            CheckResult(
                name=check.name,
                passed=result.exit_code == 0 and not result.timed_out,
                exit_code=result.exit_code,
                timed_out=result.timed_out,
                output=(result.output or result.error or "")[-_OUTPUT_KEPT:],
            )
        )
    return results
