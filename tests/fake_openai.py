"""A stand-in for an OpenAI-compatible model server: `POST /v1/chat/completions` on loopback, playing
scripted turns.

Each new conversation (one with no assistant message yet) gets the next script in rotation; later
requests of that conversation are recognised by its first assistant message, and get the turn whose
number is the count of assistant messages so far. A request without a system message (atroposlib's
health probe) gets a one-word answer and consumes nothing. Every request body is kept in `requests`.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from aiohttp import web

Turn = dict[str, Any]


def say(text: str) -> Turn:
    """A final answer (no tool call)."""
    return {"content": text}


def hermes(name: str, **arguments: Any) -> Turn:
    """A Hermes tool call in the text."""
    return {"content": f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"}


def openai_call(name: str, arguments: dict[str, Any] | str) -> Turn:
    """An OpenAI tool call; a string is sent as the arguments verbatim (to send broken JSON)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"content": None, "tool_calls": [{"name": name, "arguments": text}]}


def raw(text: str) -> Turn:
    """Text sent as is, e.g. a malformed <tool_call>."""
    return {"content": text}


class FakeOpenAI:
    def __init__(self, scripts: list[list[Turn]], model: str = "scripted-model") -> None:
        if not scripts or any(not script for script in scripts):
            raise ValueError("every script needs at least one turn")
        firsts = [json.dumps(script[0], sort_keys=True) for script in scripts]
        if len(set(firsts)) != len(firsts):
            raise ValueError("scripts must differ in their first turn (it identifies the conversation)")
        self.scripts = scripts
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.conversations = 0
        self._by_first_turn: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> FakeOpenAI:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeOpenAI:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def scripted_requests(self) -> list[dict[str, Any]]:
        """The requests of conversations (the health probes left out)."""
        return [r for r in self.requests if r["messages"] and r["messages"][0].get("role") == "system"]

    async def _complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        messages = body.get("messages") or []
        if not messages or messages[0].get("role") != "system":
            return web.json_response(self._completion(say("ok")))
        assistants = [m for m in messages if m.get("role") == "assistant"]
        if not assistants:
            script = self.conversations % len(self.scripts)
            self.conversations += 1
        else:
            script = self._by_first_turn.get(self._key(assistants[0]), -1)
        if script < 0:
            return web.json_response({"error": {"message": "unknown conversation"}}, status=400)
        turns = self.scripts[script]
        turn = turns[len(assistants)] if len(assistants) < len(turns) else say("(script over)")
        reply = self._completion(turn)
        if not assistants:
            self._by_first_turn[self._key(reply["choices"][0]["message"])] = script
        return web.json_response(reply)

    @staticmethod
    def _key(message: dict[str, Any]) -> str:
        calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
        return json.dumps([message.get("content") or "", calls])

    def _completion(self, turn: Turn) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": turn.get("content")}
        calls = turn.get("tool_calls")
        if calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{self.conversations}_{i}",
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for i, c in enumerate(calls)
            ]
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": self.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls" if calls else "stop"}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
