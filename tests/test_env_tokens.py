"""Tokens and masks from the chat template: only assistant tokens are trained on."""

from __future__ import annotations

from typing import Any

import pytest

from atropos.envs.chat import Message, template_messages
from atropos.envs.tokens import IGNORE, TemplateError, tokens_and_masks
from atropos.envs.tool_calls import TOOL_SCHEMAS
from tests.env_fixtures import build_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers comes with the `atropos` extra")
pytest.importorskip("tokenizers", reason="tokenizers comes with the `atropos` extra")

CONVERSATION: list[Message] = [
    {"role": "system", "content": "You are an engineer."},
    {"role": "user", "content": "Write a.txt"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "write_file", "arguments": '{"path": "a.txt", "content": "hi"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "name": "write_file", "content": "wrote 2 bytes to a.txt"},
    {"role": "assistant", "content": '<tool_call>{"name": "bash", "arguments": {"command": "cat a.txt"}}</tool_call>'},
    {"role": "tool", "tool_call_id": "call_1_0", "name": "bash", "content": "hi\n[exit code 0]"},
    {"role": "assistant", "content": "Done."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = build_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    return transformers.AutoTokenizer.from_pretrained(path)


def test_tokens_are_the_chat_template_and_masks_keep_only_assistant_turns(tokenizer: Any) -> None:
    tokens, masks = tokens_and_masks(tokenizer, CONVERSATION, TOOL_SCHEMAS)
    rendered = tokenizer.apply_chat_template(
        template_messages(CONVERSATION), tools=TOOL_SCHEMAS, tokenize=True, return_dict=False
    )
    assert tokens == list(rendered)
    assert len(masks) == len(tokens)
    assert all(m in (IGNORE, t) for m, t in zip(masks, tokens, strict=True))

    trained = tokenizer.decode([t for t in masks if t != IGNORE])
    assert trained == (
        '<tool_call>{"name": "write_file", "arguments": {"path": "a.txt", "content": "hi"}}'
        "</tool_call><|im_end|>\n"
        '<tool_call>{"name": "bash", "arguments": {"command": "cat a.txt"}}</tool_call><|im_end|>\n'
        "Done.<|im_end|>\n"
    )
    ignored = tokenizer.decode([t for t, m in zip(tokens, masks, strict=True) if m == IGNORE])
    for text in ("You are an engineer.", "Write a.txt", "wrote 2 bytes to a.txt", "hi\n[exit code 0]", "<tools>"):
        assert text in ignored


def test_without_tools_the_system_prompt_has_none(tokenizer: Any) -> None:
    tokens, masks = tokens_and_masks(tokenizer, CONVERSATION[:2] + CONVERSATION[-1:])
    assert "<tools>" not in tokenizer.decode(tokens)
    assert tokenizer.decode([t for t in masks if t != IGNORE]) == "Done.<|im_end|>\n"


def test_template_that_rewrites_history_is_refused(tokenizer: Any) -> None:
    original = tokenizer.chat_template
    tokenizer.chat_template = "{{ messages | length }}" + original
    try:
        with pytest.raises(TemplateError, match="renders message 2 differently"):
            tokens_and_masks(tokenizer, CONVERSATION)
    finally:
        tokenizer.chat_template = original


def test_the_extra_keeps_transformers_below_5() -> None:
    assert int(transformers.__version__.split(".")[0]) == 4
