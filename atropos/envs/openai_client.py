"""A chat model behind an OpenAI-compatible `/chat/completions` endpoint (vLLM, SGLang, OpenAI...),
spoken to with httpx. Transient failures (connection errors, 429, 5xx) are retried a few times."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from atropos.envs.chat import AssistantReply, Message, ModelError, reply_from_completion

_ATTEMPTS = 3


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and (
        exc.response.status_code == 429 or exc.response.status_code >= 500
    )


async def model_server_silence(base_url: str, timeout: float = 5.0) -> str | None:
    """None when the server at `base_url` answers `GET /models` with any HTTP status, else why not."""
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            await client.get(base_url.rstrip("/") + "/models")
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc or 'no answer'} within {timeout:.0f} s"
    return None


class OpenAIChatModel:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        temperature: float = 0.7,
        max_tokens: int = 1024,
        timeout: float = 300.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout)

    async def check(self, timeout: float = 5.0) -> None:
        """The server answers at all (any HTTP status of `GET /models` will do): checked before
        trajectories lease slots, so a server that is not there costs seconds, not every slot."""
        why = await model_server_silence(self.base_url, timeout)
        if why is not None:
            raise ModelError(
                f"the model server {self.base_url} does not answer ({why}); check --openai-base-url and that "
                "the server runs"
            )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def complete(self, messages: Sequence[Message], tools: Sequence[Message] | None) -> AssistantReply:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": list(messages),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if tools:
            body["tools"] = list(tools)
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(_ATTEMPTS),
                retry=retry_if_exception(_transient),
                wait=wait_exponential(multiplier=0.5, max=8),
                reraise=True,
            ):
                with attempt:
                    response = await self._client.post(self.url, json=body)
                    response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            raise ModelError(
                f"model server {self.url} answered HTTP {exc.response.status_code}: {exc.response.text[:500]}"
            ) from None
        except httpx.HTTPError as exc:
            raise ModelError(f"cannot reach the model server {self.url}: {type(exc).__name__}: {exc}") from None
        try:
            data = response.json()
        except ValueError:
            raise ModelError(f"model server {self.url} answered non-JSON: {response.text[:300]}") from None
        if not isinstance(data, dict):
            raise ModelError(f"model server {self.url} answered {type(data).__name__}, not a chat completion")
        return reply_from_completion(data)
