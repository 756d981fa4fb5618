"""On-policy tokens: the ids and logprobs the inference server sampled, instead of re-tokenizing text.

Re-tokenizing a conversation with the chat template can give other ids than the ones sampled
(merges across turn boundaries, normalisation), and importance-ratio trainers then compute wrong
ratios. Where the model server can say what it sampled (atroposlib's `managed_server`: vLLM, SGLang,
TRL), a rollout keeps those ids, the masks (-100 for prompts and tool results) and the sampled
logprobs; elsewhere (OpenAI-compatible endpoints) the environment re-tokenizes and says so.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel

from atropos.envs.chat import AssistantReply, Message, ModelError, reply_from_completion

logger = logging.getLogger("atropos.envs")


class SampledTokens(BaseModel):
    """A whole trajectory as the server sampled it: aligned ids, training masks and logprobs
    (atroposlib's convention: -100 and 1.0 at positions that are not the model's own)."""

    tokens: list[int]
    masks: list[int]
    logprobs: list[float]


@runtime_checkable
class SampledModel(Protocol):
    async def sampled(self) -> SampledTokens | None:
        """What was sampled over the whole trajectory (None: not known), and the end of the model's use."""


class ManagedChatModel:
    """The policy through atroposlib's `managed_server`, which tracks every turn's prompt and
    sampled ids; one per trajectory (its state is that trajectory's)."""

    def __init__(self, server: Any, tokenizer: Any, *, max_tokens: int, temperature: float) -> None:
        self.server = server
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._stack = contextlib.AsyncExitStack()
        self._managed: Any = None

    async def complete(self, messages: Sequence[Message], tools: Sequence[Message] | None) -> AssistantReply:
        if self._managed is None:
            self._managed = await self._stack.enter_async_context(self.server.managed_server(tokenizer=self.tokenizer))
        kwargs: dict[str, Any] = {
            "messages": list(messages), "n": 1, "max_tokens": self.max_tokens, "temperature": self.temperature,
        }  # fmt: skip
        if tools:
            kwargs["tools"] = list(tools)
        try:
            completion = await self._managed.chat_completion(**kwargs)
        except Exception as exc:  # the server's own errors, whatever their type
            raise ModelError(f"model server: {type(exc).__name__}: {exc}") from exc
        return reply_from_completion(completion.model_dump())

    async def sampled(self) -> SampledTokens | None:
        try:
            if self._managed is None:
                return None
            nodes = list(self._managed.get_state().get("nodes") or [])
            if len(nodes) != 1:
                # each turn's prompt extends the last one's full text unless the chat template
                # rewrites earlier turns: then the ids of the whole trajectory are not one sequence
                logger.warning("event=tokens source=retokenized reason=%d sampled sequences, not one", len(nodes))
                return None
            node = nodes[0]
            return SampledTokens(tokens=list(node.tokens), masks=list(node.masked_tokens),
                                 logprobs=[float(x) for x in node.logprobs])  # fmt: skip
        finally:
            await self._stack.aclose()
            self._managed = None


def server_samples(server: Any) -> bool:
    """The model servers can say what they sampled (not an OpenAI-compatible endpoint)."""
    try:
        from atroposlib.envs.server_handling.openai_server import OpenAIServer
    except ImportError:  # pragma: no cover - atroposlib's layout
        return False
    servers = list(getattr(server, "servers", []))
    return (
        bool(servers)
        and not any(isinstance(s, OpenAIServer) for s in servers)
        and all(hasattr(s, "tokens_and_logprobs_completion") for s in servers)
    )
