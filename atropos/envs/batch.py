"""Many trajectories at once over one pool, with a bound on how many run concurrently, and the
figures of the batch."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence

from pydantic import BaseModel

from atropos.envs.agent_loop import AgentSettings, Rollout, run_rollout
from atropos.envs.chat import ChatModel
from atropos.envs.task_set import Task
from atropos.slots import SlotPool

ModelFactory = Callable[[Task], ChatModel]
RolloutCallback = Callable[[Rollout], None]


class BatchSummary(BaseModel):
    trajectories: int
    ok: int
    infra_failures: int
    errors: int
    solved: int
    turns: int
    tool_calls: int
    malformed_calls: int
    wall_time_s: float
    tool_calls_per_s: float
    reward_mean: float | None


async def run_batch(
    pool: SlotPool,
    tasks: Sequence[Task],
    model_for: ModelFactory,
    settings: AgentSettings,
    concurrency: int,
    on_rollout: RolloutCallback | None = None,
) -> list[Rollout]:
    """One trajectory per task (repeat a task in `tasks` for more), results in the order of `tasks`.
    A trajectory whose model or task fails is recorded with status "error" instead of stopping the batch."""
    gate = asyncio.Semaphore(concurrency)

    async def one(number: int, task: Task) -> Rollout:
        async with gate:
            started = time.monotonic()
            trajectory_id = f"{task.id}-{number}-{uuid.uuid4().hex[:6]}"
            try:
                rollout = await run_rollout(pool, task, model_for(task), settings, trajectory_id)
            except Exception as exc:
                rollout = Rollout(
                    task_id=task.id,
                    trajectory_id=trajectory_id,
                    status="error",
                    reward=None,
                    wall_time_s=round(time.monotonic() - started, 4),
                    error=f"{type(exc).__name__}: {exc}",
                )
        if on_rollout is not None:
            on_rollout(rollout)
        return rollout

    return list(await asyncio.gather(*(one(number, task) for number, task in enumerate(tasks))))


def summarize(rollouts: Sequence[Rollout], wall_time_s: float) -> BatchSummary:
    scored = [r.reward for r in rollouts if r.reward is not None]
    tool_calls = sum(r.tool_calls for r in rollouts)
    return BatchSummary(
        trajectories=len(rollouts),
        ok=sum(1 for r in rollouts if r.status == "ok"),
        infra_failures=sum(1 for r in rollouts if r.status == "infra_error"),
        errors=sum(1 for r in rollouts if r.status == "error"),
        solved=sum(1 for reward in scored if reward >= 1.0),
        turns=sum(r.turns for r in rollouts),
        tool_calls=tool_calls,
        malformed_calls=sum(r.malformed_calls for r in rollouts),
        wall_time_s=round(wall_time_s, 3),
        tool_calls_per_s=round(tool_calls / wall_time_s, 2) if wall_time_s > 0 else 0.0,
        reward_mean=round(sum(scored) / len(scored), 4) if scored else None,
    )
