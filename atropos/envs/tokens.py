"""Token ids and training masks of a conversation, built with the tokenizer's own chat template.

Masks follow the Atropos convention: -100 for tokens the trainer must not learn (system, user and
tool turns, generation prompts), the token id itself for tokens the model produced (assistant turns).
`return_dict=False` keeps `apply_chat_template` returning plain ids on transformers 4.x and 5.x alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from atropos.envs.chat import Message, template_messages

IGNORE = -100


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: list[Message], **kwargs: Any) -> Any: ...


class TemplateError(ValueError):
    """The chat template does not render a conversation as an extension of its prefixes."""


def tokens_and_masks(
    tokenizer: ChatTokenizer, messages: Sequence[Message], tools: Sequence[Message] | None = None
) -> tuple[list[int], list[int]]:
    conversation = template_messages(messages)

    def ids(upto: int, generation_prompt: bool = False) -> list[int]:
        result = tokenizer.apply_chat_template(
            conversation[:upto],
            tools=list(tools) if tools else None,
            add_generation_prompt=generation_prompt,
            tokenize=True,
            return_dict=False,
        )
        return [int(token) for token in result]

    tokens = ids(len(conversation))
    masks = [IGNORE] * len(tokens)
    for index, message in enumerate(conversation):
        if message.get("role") != "assistant":
            continue
        start = len(ids(index, generation_prompt=True))
        through = ids(index + 1)
        if tokens[: len(through)] != through:
            raise TemplateError(
                f"the chat template renders message {index} differently once later messages follow it, so "
                "the assistant tokens cannot be located; use a template that keeps earlier turns unchanged"
            )
        masks[start : len(through)] = through[start:]
    return tokens, masks
