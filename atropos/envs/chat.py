"""Chat messages in the OpenAI wire shape, the model a trajectory talks to, and the conversions
between a chat completion, the conversation history and what a tokenizer's chat template expects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

Message = dict[str, Any]


class ModelError(RuntimeError):
    """The model server failed, or answered something that is not a chat completion."""


@dataclass(frozen=True)
class RawToolCall:
    """A call as an OpenAI-compatible API returns it: arguments are JSON text, unchecked."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class AssistantReply:
    """One model turn: its text and, in the OpenAI format, its structured tool calls."""

    content: str
    tool_calls: list[RawToolCall] = field(default_factory=list)
    finish_reason: str | None = None


class ChatModel(Protocol):
    """What a trajectory talks to: a model server, or a scripted policy."""

    async def complete(self, messages: Sequence[Message], tools: Sequence[Message] | None) -> AssistantReply:
        """The next assistant turn; `tools` are the OpenAI tool schemas, or None when the prompt has them."""
        ...


def reply_from_completion(data: Mapping[str, Any]) -> AssistantReply:
    """The first choice of an OpenAI chat completion (as JSON)."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise ModelError(f"the model server's answer has no choices: {json.dumps(data)[:300]}")
    choice = choices[0]
    message = choice.get("message") or {}
    calls = []
    for number, raw in enumerate(message.get("tool_calls") or []):
        function = raw.get("function") or {}
        arguments = function.get("arguments")
        calls.append(
            RawToolCall(
                id=str(raw.get("id") or f"call_{number}"),
                name=str(function.get("name") or ""),
                arguments=arguments if isinstance(arguments, str) else json.dumps(arguments or {}),
            )
        )
    return AssistantReply(
        content=_text(message.get("content")), tool_calls=calls, finish_reason=choice.get("finish_reason")
    )


def _text(content: object) -> str:
    if isinstance(content, list):  # content parts
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return content if isinstance(content, str) else ""


def assistant_message(reply: AssistantReply) -> Message:
    """The history entry of a reply, as it goes back to the model server on the next turn."""
    message: Message = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in reply.tool_calls
        ]
    return message


def tool_message(call_id: str, name: str | None, content: str) -> Message:
    return {"role": "tool", "tool_call_id": call_id, "name": name or "unknown", "content": content}


def template_messages(messages: Sequence[Message]) -> list[Message]:
    """Messages for a chat template: tool call arguments as objects (templates render them with
    `tojson`), not the JSON text of the wire format; arguments that are not JSON stay text."""
    out: list[Message] = []
    for message in messages:
        calls = message.get("tool_calls")
        if not calls:
            out.append(dict(message))
            continue
        converted = []
        for call in calls:
            function = dict(call["function"])
            try:
                function["arguments"] = json.loads(function["arguments"])
            except (TypeError, ValueError):
                pass
            converted.append({**call, "function": function})
        out.append({**message, "tool_calls": converted})
    return out
