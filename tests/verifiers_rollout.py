"""Rollouts of a verifiers environment through verifiers' own agent, in the pool's slots.

Run by tests/test_integration_verifiers.py with .venv-verifiers' Python (verifiers and this
project installed there):

    python tests/verifiers_rollout.py SPEC.json

SPEC: {"image": REF, "rollouts": [{"name", "command", "file", "expect"}, ...], "fixtures": DIR, "pool":
{SlotPoolConfig fields, optional: a driver, say}}. Every rollout is
`verifiers.v1.Agent.run(task, runtime=SlotRuntime(...))` with verifiers' bash harness: its chat
program runs inside the slot, talks to verifiers' interception server on this machine's loopback
(through the slot's bridge), and that relays to a scripted model here (an OpenAI-compatible
endpoint on loopback: turn 1 calls the `bash` tool with the rollout's command, turn 2 answers with
what it printed). The task's reward reads `file` back from the live box: 1.0 when it holds
`expect`. With "fixtures" (verifiers' own tests/v1/fixtures, from its sdist), one more rollout,
"echo_tool": the first task of verifiers' `echo_tool_v1` taskset, whose MCP toolset verifiers runs
on this machine and the chat program in the slot calls back (the scripted model calls its tool
with the phrase the task asks for); its own reward says whether the stamped tool result came back.
All rollouts run at once, on one pool. Prints one JSON line per rollout.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from typing import Any

import verifiers.v1 as vf
from aiohttp import web
from verifiers.v1.clients import EvalClientConfig
from verifiers.v1.dialects.chat import ChatDialect
from verifiers.v1.harnesses.bash import BashHarnessConfig

from atropos.integrations.verifiers import SlotRuntime
from atropos.slots import SlotPool, SlotPoolConfig

_COMMAND_MARK = "RUN:\n"


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "")


def _completion(body: dict[str, Any]) -> dict[str, Any]:
    """Turn 1: the bash tool on the command the prompt carries; turn 2: what it printed."""
    messages = body.get("messages", [])
    tools = [m for m in messages if m.get("role") == "tool"]
    if tools:
        message: dict[str, Any] = {"role": "assistant", "content": f"done: {_text(tools[-1].get('content')).strip()}"}
        finish = "stop"
    else:
        prompt = next(_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user")
        if _COMMAND_MARK in prompt:
            name, arguments = "bash", {"command": prompt.split(_COMMAND_MARK, 1)[1]}
        else:  # verifiers' echo_tool_v1: its tool, on the phrase its prompt asks for
            name = next(t["function"]["name"] for t in body.get("tools", []) if t["function"]["name"] != "bash")
            arguments = {"message": "hello world"}
        call = {
            "id": "call-1",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)},
        }
        message, finish = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    return {
        "id": "scripted",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "scripted"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    request.app["calls"].append(body)
    answer, dialect = _completion(body), ChatDialect()
    if not dialect.streaming(body):
        return web.json_response(answer)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for event in dialect.stream_events(answer):
        await response.write(event)
    await response.write_eof()
    return response


class _Data(vf.TaskData):
    file: str
    expect: str


class FileTask(vf.Task[_Data]):
    @vf.reward(weight=1.0)
    async def wrote_the_file(self, trace: vf.Trace, runtime: vf.Runtime) -> float:
        try:
            return float((await runtime.read(self.data.file)).decode() == self.data.expect)
        except vf.SandboxError:
            return 0.0


async def main(spec: dict[str, Any]) -> None:
    app = web.Application()
    app["calls"] = []
    app.router.add_post("/v1/chat/completions", _chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    os.environ["SCRIPTED_MODEL_KEY"] = "not-a-secret"
    agent = vf.Agent(
        vf.AgentConfig(
            model="scripted",
            client=EvalClientConfig(base_url=f"http://127.0.0.1:{port}/v1", api_key_var="SCRIPTED_MODEL_KEY"),
            harness=BashHarnessConfig(id="bash", compaction=None, edit=False),
            runtime=vf.SubprocessConfig(),  # what the agent would make itself; every run here borrows a slot
            max_turns=4,
        )
    )

    tasks: list[tuple[str, vf.Task[Any]]] = [
        (
            item["name"],
            FileTask(_Data(prompt=f"{_COMMAND_MARK}{item['command']}", file=item["file"], expect=item["expect"])),
        )
        for item in spec["rollouts"]
    ]
    if spec.get("fixtures"):
        sys.path.insert(0, spec["fixtures"])
        os.environ["PYTHONPATH"] = spec["fixtures"]  # verifiers starts the toolset's server as a subprocess
        echo = importlib.import_module("echo_tool_v1")
        tasks.append(("echo_tool", echo.EchoToolTaskset(echo.EchoToolConfig()).load()[0]))

    async def rollout(pool: SlotPool, name: str, task: vf.Task[Any]) -> dict[str, Any]:
        async with SlotRuntime(pool, image=spec["image"], name=name) as box:
            trace = await agent.run(task, runtime=box)
            runtime_id = box.info.id
        return {
            "name": name,
            "ok": trace.ok,
            "reward": trace.reward,
            "tool_outputs": [_text(m.content) for m in trace.tool_messages],
            "errors": [f"{e.type}: {e.message[:2000]}" for e in trace.errors],
            "runtime": runtime_id,
        }

    fields = {"slots_per_container": max(2, len(tasks)), "min_containers": 1, "max_containers": 1}
    config = SlotPoolConfig.model_validate({**fields, **spec.get("pool", {})})
    try:
        async with SlotPool(config) as pool:
            results = await asyncio.gather(*(rollout(pool, name, task) for name, task in tasks))
    finally:
        await runner.cleanup()
    for result in results:
        print(json.dumps({**result, "model_calls": len(app["calls"])}), flush=True)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as fh:
        asyncio.run(main(json.load(fh)))
