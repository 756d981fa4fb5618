"""A scripted stand-in for vLLM's native `/generate` (what atroposlib's `VLLMServer` and its
`managed_server` call): prompt token ids in, sampled ids with their logprobs out.

One script of text turns (Hermes format, no API tool calls); the turn is the number of assistant
turns already in the prompt. Every id it samples and its logprob are recorded, so a test can check
that the trainer got exactly those, not a re-tokenization.
"""

from __future__ import annotations

import socket
from typing import Any

from aiohttp import web


class FakeVLLM:
    def __init__(self, tokenizer: Any, turns: list[str]) -> None:
        self.tokenizer = tokenizer
        self.turns = turns
        self.sampled: list[tuple[list[int], list[float]]] = []  # per /generate: ids, logprobs
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def __aenter__(self) -> FakeVLLM:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_post("/generate", self._generate)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt = self.tokenizer.decode(body["prompt"]["prompt_token_ids"])
        turn = prompt.count("<|im_start|>assistant") - 1  # the last one is the generation prompt
        text = self.turns[turn] if 0 <= turn < len(self.turns) else "(script over)"
        ids = [*self.tokenizer.encode(text, add_special_tokens=False), self.tokenizer.eos_token_id]
        # logprobs that no re-tokenization could produce: the n-th sampled id of the run gets -n/1000
        start = sum(len(s[0]) for s in self.sampled)
        logprobs = [-(start + i + 1) / 1000 for i in range(len(ids))]
        self.sampled.append((ids, logprobs))
        tokens = [[{str(token): lp}] for token, lp in zip(ids, logprobs, strict=True)]
        return web.json_response({"logprobs": [tokens], "finish_reasons": ["stop"]})
