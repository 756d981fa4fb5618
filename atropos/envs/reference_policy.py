"""A scripted policy that replays a task's reference solution: one tool call per turn, in the chosen
tool call format, then a final answer. Its calls go through the same parsing and the same sandbox
as a model's, so it exercises everything but the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from atropos.envs.chat import AssistantReply, Message, RawToolCall
from atropos.envs.task_set import Task, TaskError
from atropos.envs.tool_calls import ToolCallFormat

FINAL_ANSWER = "Done: the reference solution was replayed."


class ReferencePolicy:
    def __init__(self, task: Task, fmt: ToolCallFormat) -> None:
        if not task.reference:
            raise TaskError(f"task {task.id!r} has no reference solution to replay")
        self.task = task
        self.format = fmt

    async def complete(self, messages: Sequence[Message], tools: Sequence[Message] | None) -> AssistantReply:
        step = sum(1 for message in messages if message.get("role") == "assistant")
        if step >= len(self.task.reference):
            return AssistantReply(content=FINAL_ANSWER, finish_reason="stop")
        call = self.task.reference[step]
        if self.format == "openai":
            raw = RawToolCall(id=f"ref_{step}", name=call.tool, arguments=json.dumps(call.args))
            return AssistantReply(content="", tool_calls=[raw], finish_reason="tool_calls")
        body = json.dumps({"name": call.tool, "arguments": call.args})
        return AssistantReply(content=f"<tool_call>\n{body}\n</tool_call>", finish_reason="stop")
