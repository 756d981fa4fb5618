"""A task's setup (its files, then its setup commands) in a rollout's slot: run in every slot, or,
with `fork_setup` (the default), once per task and server, every rollout's slot forked from the
result (`SlotPool.prepare`; one setup per GRPO group instead of one per rollout)."""

from __future__ import annotations

import hashlib
import json

from atropos.envs.scoring import write_files
from atropos.envs.task_set import Task, TaskError
from atropos.errors import SetupFailed
from atropos.slots import Slot, SlotPool
from atropos.slots.prepared import SetupCall


def setup_calls(task: Task) -> list[SetupCall]:
    files: list[SetupCall] = [("write_file", {"path": p, "content": c}) for p, c in task.setup_files.items()]
    return files + [("bash", task.in_workdir({"command": command})) for command in task.setup_commands]


def setup_key(task: Task) -> str:
    """The prepared setup's key: the task, its setup and its image, so that a changed task is prepared anew."""
    made = {"calls": setup_calls(task), "image": task.image}
    digest = hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:16]
    return f"{task.id}:{digest}"


async def prepared(pool: SlotPool, task: Task, timeout: float) -> str:
    """Prepare the task's setup once (later calls wait for or reuse it); the key to fork from."""
    key = setup_key(task)
    try:
        await pool.prepare(key, setup_calls(task), call_timeout=timeout, image=task.image)
    except SetupFailed as exc:
        raise TaskError(f"task {task.id} setup: {exc}") from None
    return key


async def run_setup(pool: SlotPool, slot: Slot, task: Task, timeout: float) -> None:
    """The task's setup in this slot alone."""
    await write_files(pool, slot, task.setup_files, timeout, what=f"task {task.id} setup")
    for command in task.setup_commands:
        result = await pool.execute(slot, "bash", task.in_workdir({"command": command}), timeout=timeout)
        if not result.ok:
            raise TaskError(
                f"task {task.id} setup: {command!r} failed (exit {result.exit_code}): {result.output[-2000:]}"
            )
