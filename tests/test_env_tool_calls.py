"""Tool calls read from model replies: Hermes tags, OpenAI tool_calls, and every way they go wrong."""

from __future__ import annotations

import json

import pytest

from atropos.envs.chat import (
    AssistantReply,
    ModelError,
    RawToolCall,
    assistant_message,
    reply_from_completion,
    template_messages,
)
from atropos.envs.tool_calls import TOOL_SCHEMAS, MalformedCall, ToolCall, hermes_tools_prompt, parse_reply


def hermes_text(*calls: object) -> str:
    return "".join(f"<tool_call>{json.dumps(call)}</tool_call>" for call in calls)


def test_hermes_calls_in_order_with_text_around() -> None:
    text = (
        "Let me look.\n"
        + hermes_text({"name": "bash", "arguments": {"command": "ls"}})
        + " then "
        + hermes_text({"name": "read_file", "arguments": {"path": "a.txt"}})
    )
    calls = parse_reply(AssistantReply(text), turn=3)
    assert calls == [
        ToolCall("call_3_0", "bash", {"command": "ls"}),
        ToolCall("call_3_1", "read_file", {"path": "a.txt"}),
    ]


def test_hermes_arguments_encoded_twice_are_accepted() -> None:
    text = hermes_text({"name": "write_file", "arguments": json.dumps({"path": "x", "content": "y"})})
    assert parse_reply(AssistantReply(text), 0) == [ToolCall("call_0_0", "write_file", {"path": "x", "content": "y"})]


def test_malformed_hermes_calls_are_reported_not_dropped() -> None:
    text = (
        '<tool_call>{"name": "bash", "arguments": {"command": </tool_call>'
        + hermes_text(
            {"arguments": {"command": "ls"}},
            {"name": "rm_rf", "arguments": {}},
            {"name": "bash", "arguments": {"cmd": "ls"}},
            {"name": "bash", "arguments": [1]},
        )
        + '<tool_call>{"name": "bash"'
    )
    calls = parse_reply(AssistantReply(text), 0)
    assert all(isinstance(call, MalformedCall) for call in calls)
    errors = [call.error for call in calls if isinstance(call, MalformedCall)]
    assert len(errors) == 6
    assert "not valid JSON" in errors[0]
    assert "no string field 'name'" in errors[1]
    assert "unknown tool 'rm_rf'" in errors[2] and "bash, bash_session, read_file, write_file" in errors[2]
    assert "command: Field required" in errors[3] and "cmd: Extra inputs" in errors[3]
    assert "must be a JSON object" in errors[4]
    assert "not closed" in errors[5]
    assert [call.id for call in calls] == [f"call_0_{i}" for i in range(6)]


def test_openai_tool_calls_and_their_errors() -> None:
    reply = reply_from_completion(
        {
            "choices": [
                {
                    "finish_reason": "tool_calls",
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "a",
                                "type": "function",
                                "function": {"name": "bash", "arguments": '{"command": "pwd"}'},
                            },
                            {"id": "b", "type": "function", "function": {"name": "bash", "arguments": '{"command": '}},
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "write_file", "arguments": {"path": "p"}},
                            },
                        ],
                    },
                }
            ]
        }
    )
    assert reply.content == "" and reply.finish_reason == "tool_calls"
    calls = parse_reply(reply, 0)
    assert calls[0] == ToolCall("a", "bash", {"command": "pwd"})
    assert isinstance(calls[1], MalformedCall) and calls[1].id == "b" and "not valid JSON" in calls[1].error
    assert calls[2] == ToolCall("c", "write_file", {"path": "p"})  # arguments given as an object


def test_no_tool_call_is_a_final_answer() -> None:
    assert parse_reply(AssistantReply("All done, the tests pass."), 5) == []


def test_reply_without_choices_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="no choices"):
        reply_from_completion({"error": "overloaded"})


def test_history_and_template_shapes() -> None:
    reply = AssistantReply("", [RawToolCall("a", "bash", '{"command": "ls"}'), RawToolCall("b", "bash", "{bad")])
    message = assistant_message(reply)
    assert message["tool_calls"][0] == {
        "id": "a",
        "type": "function",
        "function": {"name": "bash", "arguments": '{"command": "ls"}'},
    }
    rendered = template_messages([message])[0]["tool_calls"]
    assert rendered[0]["function"]["arguments"] == {"command": "ls"}  # objects for chat templates
    assert rendered[1]["function"]["arguments"] == "{bad"  # unreadable arguments stay text
    assert message["tool_calls"][0]["function"]["arguments"] == '{"command": "ls"}'  # history untouched


def test_tool_descriptions() -> None:
    assert [schema["function"]["name"] for schema in TOOL_SCHEMAS] == [
        "bash",
        "bash_session",
        "read_file",
        "write_file",
    ]
    prompt = hermes_tools_prompt()
    assert "<tools>" in prompt and '"name": "write_file"' in prompt and "<tool_call>" in prompt
