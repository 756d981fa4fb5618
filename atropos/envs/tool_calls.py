"""The tools an agent is offered, and its tool calls read from a model reply in either format:

- Hermes: `<tool_call>{"name": "bash", "arguments": {"command": "ls"}}</tool_call>` blocks in the text;
- OpenAI: the `tool_calls` list of a chat completion message (arguments as a JSON string).

A call that cannot be read or names no known tool, or whose arguments do not fit the tool, becomes a
`MalformedCall`: the agent loop answers it with the error instead of dropping it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from atropos.envs.chat import AssistantReply, RawToolCall
from atropos.sandbox.models import TOOL_ARGS

ToolCallFormat = Literal["hermes", "openai"]

_PATH = {"type": "string", "description": "Path relative to the workspace (/workspace), or absolute inside it."}
_COMMAND = {"type": "string", "description": "The shell command."}


def _function(name: str, description: str, **properties: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(properties)},
        },
    }


TOOL_SCHEMAS: list[dict[str, Any]] = [
    _function(
        "bash",
        "Run a shell command with `bash -c` in a fresh shell in the workspace; returns its output and exit code.",
        command=_COMMAND,
    ),
    _function(
        "bash_session",
        "Run a command in your persistent bash session: the working directory and "
        "environment variables survive between calls.",
        command=_COMMAND,
    ),
    _function("read_file", "Read a text file of the workspace.", path=_PATH),
    _function(
        "write_file",
        "Create or overwrite a file of the workspace with the given text; parent directories are created.",
        path=_PATH,
        content={"type": "string", "description": "The whole file."},
    ),
]

_HERMES_INSTRUCTIONS = (
    "You may call one or more functions to act in your workspace. The function signatures are within "
    "<tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-dict>}}\n</tool_call>'
)

_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_CALL_SHAPE = 'expected {"name": "<tool>", "arguments": {...}}'


@dataclass(frozen=True)
class ToolCall:
    """A call the sandbox can run: a known tool with arguments that fit it."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class MalformedCall:
    """A call the agent tried to make but that cannot run; `error` is what the agent is told."""

    id: str
    name: str | None
    error: str


ParsedCall = ToolCall | MalformedCall


def hermes_tools_prompt() -> str:
    """The tool section of a system prompt for models that call tools in Hermes `<tool_call>` tags."""
    return _HERMES_INSTRUCTIONS.format(tools="\n".join(json.dumps(t["function"]) for t in TOOL_SCHEMAS))


def parse_reply(reply: AssistantReply, turn: int) -> list[ParsedCall]:
    """Every tool call of a reply, in order: its structured calls, then the Hermes blocks of its text."""
    calls: list[ParsedCall] = [_from_raw(raw) for raw in reply.tool_calls]
    calls.extend(parse_hermes(reply.content, id_prefix=f"call_{turn}_"))
    return calls


def parse_hermes(text: str, id_prefix: str = "call_") -> list[ParsedCall]:
    """The `<tool_call>` blocks of a text; an opening tag without its closing tag is malformed."""
    calls: list[ParsedCall] = []
    for number, match in enumerate(_TOOL_CALL_BLOCK.finditer(text)):
        calls.append(_from_hermes_block(f"{id_prefix}{number}", match.group(1)))
    rest = _TOOL_CALL_BLOCK.sub("", text)
    if "<tool_call>" in rest:
        calls.append(
            MalformedCall(
                f"{id_prefix}{len(calls)}", None, "a <tool_call> tag is not closed by </tool_call>; " + _CALL_SHAPE
            )
        )
    return calls


def _from_hermes_block(call_id: str, body: str) -> ParsedCall:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        return MalformedCall(call_id, None, f"the tool call is not valid JSON ({exc}); {_CALL_SHAPE}")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return MalformedCall(call_id, None, f"the tool call has no string field 'name'; {_CALL_SHAPE}")
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some models encode the arguments twice
        return _checked(call_id, data["name"], arguments)
    return check_call(call_id, data["name"], arguments)


def _from_raw(raw: RawToolCall) -> ParsedCall:
    return _checked(raw.id, raw.name, raw.arguments)


def _checked(call_id: str, name: str, arguments_json: str) -> ParsedCall:
    try:
        arguments = json.loads(arguments_json) if arguments_json.strip() else {}
    except json.JSONDecodeError as exc:
        return MalformedCall(call_id, name, f"the arguments of {name!r} are not valid JSON ({exc})")
    return check_call(call_id, name, arguments)


def check_call(call_id: str, name: str, arguments: object) -> ParsedCall:
    """The call if `name` is a tool and `arguments` fit it, else a MalformedCall saying why."""
    model = TOOL_ARGS.get(name)
    if model is None:
        return MalformedCall(call_id, name, f"unknown tool {name!r}; the tools are: {', '.join(TOOL_ARGS)}")
    if not isinstance(arguments, dict):
        return MalformedCall(call_id, name, f"the arguments of {name!r} must be a JSON object")
    try:
        model.model_validate(arguments)
    except ValidationError as exc:
        return MalformedCall(call_id, name, f"invalid arguments for {name!r}: {validation_summary(exc)}")
    return ToolCall(call_id, name, arguments)


def validation_summary(exc: ValidationError, prefix: str = "") -> str:
    """A pydantic error as one line: `field: message; field: message` (`prefix` before each field)."""
    parts = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{prefix}{where}: {message}" if where else message)
    return "; ".join(parts)
