"""Tasks an agent is given: a prompt, files to start from, hidden checks that score the result, and
a reference solution as tool calls. The built-in set ships in the package (tasks/builtin.jsonl);
users bring their own as a JSONL file of the same shape, one task per line.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atropos.envs.tool_calls import MalformedCall, check_call, validation_summary

BUILTIN_RESOURCE = "builtin.jsonl"


class TaskError(ValueError):
    """A task file or task cannot be used (missing, malformed, inconsistent)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReferenceStep(_Strict):
    """One tool call of a reference solution."""

    tool: Literal["bash", "bash_session", "read_file", "write_file"]
    args: dict[str, Any]

    @model_validator(mode="after")
    def _fits_tool(self) -> ReferenceStep:
        call = check_call("reference", self.tool, self.args)
        if isinstance(call, MalformedCall):
            raise ValueError(call.error)
        return self


class Check(_Strict):
    """A hidden check: a command run in the workspace after the agent finished; exit 0 passes."""

    name: str = Field(min_length=1)
    command: str = Field(min_length=1)
    timeout: float = Field(default=60.0, gt=0, le=3600)


class Task(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    prompt: str = Field(min_length=1)
    tags: list[str] = Field(default_factory=list)
    setup_files: dict[str, str] = Field(default_factory=dict, description="path -> text, written before the agent")
    setup_commands: list[str] = Field(
        default_factory=list,
        description="shell commands run in order after the setup files, before the agent (a failing one is an "
        "error of the task); with fork_setup they run once per task and server, not per rollout",
    )
    hidden_files: dict[str, str] = Field(
        default_factory=dict, description="path -> text, written after the agent finished (tests it cannot edit)"
    )
    checks: list[Check] = Field(min_length=1)
    reference: list[ReferenceStep] = Field(default_factory=list, description="a solution, as tool calls")
    image: str | None = Field(
        default=None,
        description="the task's own image, its slot's root (docker://NAME:TAG, docker-daemon://NAME:TAG, "
        "docker-archive:PATH, oci-archive:PATH or a SIF path on the servers' nodes; see SlotPool.acquire); "
        "with fork_setup its setup runs once per server, in the image, and each rollout forks from that",
    )
    workdir: str | None = Field(
        default=None,
        description="where the agent's shell commands (its session starts there), the setup commands and the "
        "checks run: an absolute path, e.g. the repository in the task's image; files stay relative to "
        "/workspace; None: /workspace",
    )

    def in_workdir(self, args: dict[str, Any]) -> dict[str, Any]:
        """A shell tool's arguments, to run in the task's workdir unless they name their own."""
        return args if self.workdir is None or "cwd" in args else {**args, "cwd": self.workdir}

    @field_validator("workdir")
    @classmethod
    def _absolute_workdir(cls, workdir: str | None) -> str | None:
        if workdir is not None and (not workdir.startswith("/") or ".." in Path(workdir).parts):
            raise ValueError(f"workdir {workdir!r} must be an absolute path, without '..'")
        return workdir

    @field_validator("setup_files", "hidden_files")
    @classmethod
    def _relative_paths(cls, files: dict[str, str]) -> dict[str, str]:
        for path in files:
            if not path or path.startswith("/") or ".." in Path(path).parts:
                raise ValueError(f"file path {path!r} must be relative to the workspace, without '..'")
        return files

    @model_validator(mode="after")
    def _unique_check_names(self) -> Task:
        names = [check.name for check in self.checks]
        if len(set(names)) != len(names):
            raise ValueError(f"check names repeat: {names}")
        return self


def parse_tasks(lines: Iterable[str], source: str) -> list[Task]:
    """Tasks from JSONL text; blank lines and lines starting with '#' are skipped. Errors name the line."""
    tasks: list[Task] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            task = Task.model_validate_json(text)
        except ValidationError as exc:
            raise TaskError(f"{source}:{number}: invalid task: {validation_summary(exc)}") from None
        if task.id in seen:
            raise TaskError(f"{source}:{number}: task id {task.id!r} appears twice")
        seen.add(task.id)
        tasks.append(task)
    if not tasks:
        raise TaskError(f"{source}: no tasks in the file")
    return tasks


def load_task_file(path: str | Path) -> list[Task]:
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise TaskError(f"cannot read the task file {str(file)!r}: {exc.strerror or exc}") from None
    return parse_tasks(text.splitlines(), str(file))


def builtin_tasks() -> list[Task]:
    text = resources.files("atropos.envs").joinpath("tasks").joinpath(BUILTIN_RESOURCE).read_text(encoding="utf-8")
    return parse_tasks(text.splitlines(), f"atropos/envs/tasks/{BUILTIN_RESOURCE}")


def split_ids(text: str | None) -> list[str]:
    """Task ids from a comma-separated list, as the command lines take them."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def load_tasks(task_file: str | Path | None = None, ids: Sequence[str] | None = None) -> list[Task]:
    """The built-in tasks, or those of `task_file`; only `ids` (in that order) when given."""
    tasks = builtin_tasks() if task_file is None else load_task_file(task_file)
    if not ids:
        return tasks
    by_id = {task.id: task for task in tasks}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise TaskError(f"unknown task id(s): {', '.join(unknown)}; known: {', '.join(by_id)}")
    return [by_id[i] for i in ids]
