"""Fixtures of the environment tests: scripted agent turns for the `fizzbuzz` task, and a tokenizer
built on the spot (a byte-level BPE trained on a few lines, wrapped in transformers'
PreTrainedTokenizerFast with a ChatML-like chat template that renders tools and tool calls). No
download: the tests stay offline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from atropos.envs.chat import AssistantReply, Message
from tests.fake_openai import Turn, hermes, openai_call, raw, say

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'system' and tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
    "{{ m['content'] or '' }}"
    "{% for call in m['tool_calls'] or [] %}<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "You are an autonomous software engineer working in a Linux sandbox.",
    '<tool_call>{"name": "write_file", "arguments": {"path": "fizzbuzz.py", "content": "def fizzbuzz(n):"}}',
    "</tool_call> bash read_file write_file bash_session command path content exit code error",
    "def return for in range if else print import assert True False None",
]


def build_tokenizer(directory: Path) -> str:
    """Save a small chat tokenizer in `directory` and return its path for `from_pretrained`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return str(directory)


FIZZBUZZ = """def fizzbuzz(n):
    return ["Fizz" * (i % 3 == 0) + "Buzz" * (i % 5 == 0) or str(i) for i in range(1, n + 1)]
"""
WRONG_FIZZBUZZ = "def fizzbuzz(n):\n    return [str(i) for i in range(1, n + 1)]\n"


def solving_script() -> list[Turn]:
    """Solves the `fizzbuzz` task through both call formats and three malformed calls on the way."""
    return [
        raw('I will write it. <tool_call>{"name": "write_file", "arguments": {"path": "fizzbuzz.py"</tool_call>'),
        openai_call("write_file", {"path": "fizzbuzz.py", "content": FIZZBUZZ}),
        openai_call("bash", '{"command": '),
        hermes("bash", command="python3 -c 'from fizzbuzz import fizzbuzz; print(fizzbuzz(5))'"),
        hermes("delete_everything"),
        say("Done: fizzbuzz.py is written and prints the expected values."),
    ]


def failing_script() -> list[Turn]:
    """Writes a wrong `fizzbuzz` and stops."""
    return [hermes("write_file", path="fizzbuzz.py", content=WRONG_FIZZBUZZ), say("Done.")]


OFFLINE_VARS = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TRANSFORMERS_VERBOSITY": "error"}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small tokenizer with a chat template, built offline (no hub)."""
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


class Scripted:
    """A chat model that answers with these replies in turn (an exception is raised instead)."""

    def __init__(self, *replies: AssistantReply | Exception) -> None:
        self.replies = list(replies)

    async def complete(self, messages: Sequence[Message], tools: Sequence[Message] | None) -> AssistantReply:
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply
