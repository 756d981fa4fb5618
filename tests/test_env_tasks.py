"""The task set: loading and validation, and every built-in task checked for real in a slot pool:
its reference solution passes its hidden checks, and doing nothing fails them all."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from atropos.envs.agent_loop import AgentSettings, Rollout, run_rollout
from atropos.envs.chat import AssistantReply, Message
from atropos.envs.reference_policy import ReferencePolicy
from atropos.envs.task_set import TaskError, builtin_tasks, load_task_file, load_tasks
from atropos.slots import SlotPool, SlotPoolConfig

GOOD = {
    "id": "t1",
    "prompt": "make a.txt",
    "checks": [{"name": "exists", "command": "test -f a.txt"}],
    "reference": [{"tool": "write_file", "args": {"path": "a.txt", "content": "x"}}],
}


class DoNothing:
    async def complete(self, messages: Sequence[Message], tools: Sequence[Message] | None) -> AssistantReply:
        return AssistantReply("I will not do anything.")


def write_lines(path: Path, *records: object) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_builtin_set_is_large_and_varied() -> None:
    tasks = builtin_tasks()
    assert len(tasks) >= 20
    assert len({task.id for task in tasks}) == len(tasks)
    tags = {tag for task in tasks for tag in task.tags}
    assert {"python", "shell", "bugfix", "files"} <= tags
    assert all(task.reference and task.checks for task in tasks)
    tools = {step.tool for task in tasks for step in task.reference}
    assert tools == {"bash", "bash_session", "read_file", "write_file"}


def test_user_task_file(tmp_path: Path) -> None:
    other = dict(GOOD, id="t2")
    path = write_lines(tmp_path / "tasks.jsonl", "# my tasks", GOOD, "", other)
    assert [task.id for task in load_task_file(path)] == ["t1", "t2"]
    assert [task.id for task in load_tasks(path, ["t2"])] == ["t2"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({**GOOD, "checks": []}, "tasks.jsonl:1: invalid task: checks: List should have at least 1 item"),
        ({**GOOD, "id": "bad id!"}, "id: String should match pattern"),
        ({**GOOD, "hidden_files": {"../escape.py": ""}}, "must be relative to the workspace"),
        ({**GOOD, "reference": [{"tool": "bash", "args": {"cmd": "ls"}}]}, "invalid arguments for 'bash'"),
        ({**GOOD, "surprise": 1}, "surprise: Extra inputs are not permitted"),
        ("{not json", "tasks.jsonl:1: invalid task: Invalid JSON"),
    ],
)
def test_invalid_tasks_name_the_line_and_field(tmp_path: Path, record: object, message: str) -> None:
    path = write_lines(tmp_path / "tasks.jsonl", record)
    with pytest.raises(TaskError, match=re.escape("tasks.jsonl:1")) as info:
        load_task_file(path)
    assert message in str(info.value)


def test_task_file_errors(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="cannot read the task file"):
        load_task_file(tmp_path / "missing.jsonl")
    with pytest.raises(TaskError, match="no tasks"):
        load_task_file(write_lines(tmp_path / "empty.jsonl", "# nothing"))
    with pytest.raises(TaskError, match=re.escape("twice.jsonl:2: task id 't1' appears twice")):
        load_task_file(write_lines(tmp_path / "twice.jsonl", GOOD, GOOD))
    with pytest.raises(TaskError, match=r"unknown task id.*nope"):
        load_tasks(None, ["fizzbuzz", "nope"])


async def test_every_builtin_reference_passes_and_doing_nothing_fails() -> None:
    tasks = builtin_tasks()
    settings = AgentSettings(tool_call_format="hermes")
    config = SlotPoolConfig(slots_per_container=8, min_containers=2, max_containers=2)
    async with SlotPool(config) as pool:
        solved: list[Rollout] = await asyncio.gather(
            *(run_rollout(pool, task, ReferencePolicy(task, "hermes"), settings) for task in tasks)
        )
        idle: list[Rollout] = await asyncio.gather(*(run_rollout(pool, task, DoNothing(), settings) for task in tasks))
    broken = {r.task_id: [c.model_dump() for c in r.checks if not c.passed] for r in solved if r.reward != 1.0}
    assert not broken, f"reference solutions that fail their checks: {broken}"
    too_easy = {r.task_id: [c.name for c in r.checks if c.passed] for r in idle if r.reward != 0.0}
    assert not too_easy, f"checks that pass without any work: {too_easy}"
    assert all(r.status == "ok" and r.malformed_calls == 0 for r in solved + idle)
    assert all(r.turns == 1 and r.tool_calls == 0 and r.finished == "answer" for r in idle)
