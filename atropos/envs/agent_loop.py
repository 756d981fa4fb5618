"""One trajectory: lease a slot, let the model act through tool calls, score the result with the
task's hidden checks, give the slot back.

A failure of the sandbox (InfrastructureError, or no slot in time) makes the rollout an
infrastructure failure with no reward: it says nothing about the model and must not be trained on.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from atropos.envs.chat import AssistantReply, ChatModel, Message, assistant_message, tool_message
from atropos.envs.sampling import SampledModel, SampledTokens
from atropos.envs.scoring import CheckResult, score_task
from atropos.envs.task_set import Task, TaskError
from atropos.envs.task_setup import prepared, run_setup
from atropos.envs.tool_calls import TOOL_SCHEMAS, ParsedCall, ToolCall, ToolCallFormat, hermes_tools_prompt, parse_reply
from atropos.sandbox.models import ExecuteResult
from atropos.slots import AcquireTimeout, InfrastructureError, InvalidToolCall, LeaseError, Slot, SlotPool

RolloutStatus = Literal["ok", "infra_error", "error"]

_SYSTEM_PROMPT = (
    "You are an autonomous software engineer working in a Linux sandbox. Your workspace is /workspace "
    "(the current directory of every command). Use the tools to inspect files, write code and run "
    "commands until the task is done; nobody will answer questions. When you are finished, reply "
    "with a short summary and no tool call."
)


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_turns: int = Field(default=8, ge=1, le=1000, description="model turns per trajectory")
    tool_call_format: ToolCallFormat = "hermes"
    tool_timeout: float = Field(default=60.0, gt=0, description="seconds per tool call")
    max_tool_output: int = Field(default=4000, ge=100, description="characters of a tool result shown to the model")
    acquire_timeout: float | None = Field(default=None, gt=0, description="wait for a slot; pool default if unset")
    fork_setup: bool = Field(
        default=True, description="run a task's setup once per server and fork each rollout's slot from it"
    )


class Rollout(BaseModel):
    """A finished trajectory, as written to the rollouts JSONL."""

    task_id: str
    trajectory_id: str
    status: RolloutStatus
    reward: float | None = Field(description="fraction of hidden checks passed; None unless status is ok")
    checks: list[CheckResult] = Field(default_factory=list)
    turns: int = 0
    tool_calls: int = Field(default=0, description="calls the sandbox ran")
    malformed_calls: int = Field(default=0, description="calls answered with an error instead of running")
    finished: Literal["answer", "max_turns"] | None = None
    wall_time_s: float = 0.0
    sandbox_time_s: float = Field(default=0.0, description="time spent waiting for the model's tool calls to run")
    error: str | None = None
    messages: list[Message] = Field(default_factory=list)
    sampled: SampledTokens | None = Field(
        default=None, exclude=True, description="the ids and logprobs the server sampled, where it says"
    )


def initial_messages(task: Task, fmt: ToolCallFormat) -> list[Message]:
    system = _SYSTEM_PROMPT if fmt == "openai" else f"{_SYSTEM_PROMPT}\n\n{hermes_tools_prompt()}"
    return [{"role": "system", "content": system}, {"role": "user", "content": task.prompt}]


def request_tools(fmt: ToolCallFormat) -> list[Message] | None:
    """The `tools` of each chat request: the schemas in the OpenAI format; in the Hermes format the
    system prompt carries them."""
    return TOOL_SCHEMAS if fmt == "openai" else None


async def run_rollout(
    pool: SlotPool, task: Task, model: ChatModel, settings: AgentSettings, trajectory_id: str | None = None
) -> Rollout:
    """Run one trajectory of `task`. Errors of the model propagate; sandbox failures do not."""
    started = time.monotonic()
    rollout = Rollout(
        task_id=task.id,
        trajectory_id=trajectory_id or f"{task.id}-{uuid.uuid4().hex[:8]}",
        status="ok",
        reward=None,
        messages=initial_messages(task, settings.tool_call_format),
    )
    try:
        has_setup = bool(task.setup_files or task.setup_commands)
        forked = settings.fork_setup and has_setup  # a task's image goes with its prepared snapshot
        key = await prepared(pool, task, settings.tool_timeout) if forked else None
        async with pool.slot(
            rollout.trajectory_id, timeout=settings.acquire_timeout, from_snapshot=key, image=task.image
        ) as slot:
            if key is None:
                await run_setup(pool, slot, task, settings.tool_timeout)
            if task.workdir is not None:  # the agent's session starts there (a `cwd` per call would be a subshell)
                moved = await pool.execute(slot, "bash_session", {"command": f"cd {shlex.quote(task.workdir)}"})
                if not moved.ok:
                    raise TaskError(f"task {task.id}: workdir {task.workdir}: {moved.output.strip()}")
            try:
                await _agent_turns(pool, slot, model, settings, rollout, task)
            finally:
                if isinstance(model, SampledModel):  # also ends the model's use of the server
                    rollout.sampled = await model.sampled()
            rollout.checks = await score_task(pool, slot, task)
    except (InfrastructureError, AcquireTimeout, LeaseError) as exc:  # the sandbox failed, not the model
        rollout.status, rollout.error = "infra_error", f"{type(exc).__name__}: {exc}"
    else:
        rollout.reward = sum(1 for check in rollout.checks if check.passed) / len(rollout.checks)
    rollout.wall_time_s = round(time.monotonic() - started, 4)
    return rollout


async def _agent_turns(
    pool: SlotPool, slot: Slot, model: ChatModel, settings: AgentSettings, rollout: Rollout, task: Task
) -> None:
    tools = request_tools(settings.tool_call_format)
    rollout.finished = "max_turns"
    for turn in range(settings.max_turns):
        reply = await _model_turn(pool, slot, model, rollout.messages, tools)
        rollout.turns += 1
        rollout.messages.append(assistant_message(reply))
        calls = parse_reply(reply, turn)
        if not calls:
            rollout.finished = "answer"
            return
        for call in calls:
            began = time.monotonic()
            content = await _answer(pool, slot, call, settings, task)
            rollout.sandbox_time_s = round(rollout.sandbox_time_s + time.monotonic() - began, 4)
            if isinstance(call, ToolCall):
                rollout.tool_calls += 1
            else:
                rollout.malformed_calls += 1
            rollout.messages.append(tool_message(call.id, call.name, content))


async def _model_turn(
    pool: SlotPool, slot: Slot, model: ChatModel, messages: list[Message], tools: list[Message] | None
) -> AssistantReply:
    """The model's next turn, with the lease kept alive meanwhile: a slow model must not lose its slot
    to the pool's reclaiming of leases whose holder went quiet."""
    keeper = asyncio.ensure_future(_keep_lease(pool, slot))
    try:
        return await model.complete(messages, tools)
    finally:
        keeper.cancel()


async def _keep_lease(pool: SlotPool, slot: Slot) -> None:
    ttl = pool.config.lease_ttl
    if ttl is None:
        return
    with contextlib.suppress(LeaseError):  # gone already: the next tool call says so
        while True:
            await asyncio.sleep(ttl / 3)
            pool.heartbeat(slot)


async def _answer(pool: SlotPool, slot: Slot, call: ParsedCall, settings: AgentSettings, task: Task) -> str:
    """What the model is told about one of its calls: the tool's result, or why it could not run."""
    if not isinstance(call, ToolCall):
        return f"error: {call.error}"
    args = task.in_workdir(call.arguments) if call.name == "bash" else call.arguments
    try:
        result = await pool.execute(slot, call.name, args, timeout=settings.tool_timeout)
    except InvalidToolCall as exc:  # the server refused the arguments: the model's mistake, not the sandbox's
        return f"error: {exc}"
    return render_result(result, settings.max_tool_output)


def render_result(result: ExecuteResult, limit: int) -> str:
    parts = []
    if result.output:
        parts.append(clip(result.output, limit))
    if result.truncated:
        parts.append("[output truncated by the sandbox]")
    if result.error:
        parts.append(f"[error: {result.error}]")
    if result.exit_code is not None:
        parts.append(f"[exit code {result.exit_code}]")
    return "\n".join(parts) or "[no output]"


def clip(text: str, limit: int) -> str:
    """At most `limit` characters: the head and the tail, with a marker saying what was cut."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n[... {len(text) - limit} characters cut ...]\n{text[-tail:]}"
