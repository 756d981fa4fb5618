"""Text the demo prints: one table row per trajectory, and the summary of the batch."""

from __future__ import annotations

from atropos.envs.agent_loop import Rollout
from atropos.envs.batch import BatchSummary

_COLUMNS = (
    ("task", 24, "<"),
    ("turns", 5, ">"),
    ("tool calls", 10, ">"),
    ("reward", 6, ">"),
    ("wall s", 7, ">"),
    ("status", 0, "<"),
)


def _line(cells: list[str]) -> str:
    return "  ".join(f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, _COLUMNS, strict=True))


def table_header() -> str:
    header = _line([name for name, _, _ in _COLUMNS])
    return f"{header}\n{'-' * len(header)}"


def table_row(rollout: Rollout) -> str:
    reward = "-" if rollout.reward is None else f"{rollout.reward:.2f}"
    if rollout.status == "ok":
        status = "ok" if rollout.finished == "answer" else "ok (turn limit)"
        if rollout.malformed_calls:
            status += f", {rollout.malformed_calls} malformed call(s)"
    else:
        status = f"{rollout.status}: {rollout.error}"
    task = rollout.task_id if len(rollout.task_id) <= 24 else rollout.task_id[:23] + "~"
    return _line([task, str(rollout.turns), str(rollout.tool_calls), reward, f"{rollout.wall_time_s:.2f}", status])


def summary_lines(summary: BatchSummary) -> list[str]:
    reward = "-" if summary.reward_mean is None else f"{summary.reward_mean:.3f}"
    return [
        f"trajectories      {summary.trajectories} ({summary.ok} scored, {summary.solved} solved)",
        f"tool calls        {summary.tool_calls} ({summary.malformed_calls} malformed, answered with an error)",
        f"tool calls/s      {summary.tool_calls_per_s}",
        f"wall time         {summary.wall_time_s:.2f} s",
        f"reward mean       {reward}",
        f"infra failures    {summary.infra_failures} (sandbox failures: excluded from scoring)",
        f"errors            {summary.errors} (model or task failures)",
    ]
