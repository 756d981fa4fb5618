"""The agent loop against a scripted OpenAI-compatible server and a real slot pool: tool calls in
both formats run in the slot, malformed ones are answered with an error, hidden checks score the
result, sandbox failures are infrastructure failures, and the slot always goes back."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from atropos.envs.agent_loop import AgentSettings, clip, initial_messages, run_rollout
from atropos.envs.chat import AssistantReply, Message, ModelError
from atropos.envs.openai_client import OpenAIChatModel
from atropos.envs.task_set import TaskError, load_tasks
from atropos.envs.tool_calls import ToolCallFormat
from atropos.slots import SlotLost, SlotPool, SlotPoolConfig
from tests.env_fixtures import Scripted, failing_script, solving_script
from tests.fake_openai import FakeOpenAI, hermes

FIZZBUZZ = load_tasks(None, ["fizzbuzz"])[0]


def small_pool(**overrides: Any) -> SlotPool:
    return SlotPool(
        SlotPoolConfig.model_validate({"slots_per_container": 2, "min_containers": 1, "max_containers": 1, **overrides})
    )


@pytest.mark.parametrize("fmt", ["hermes", "openai"])
async def test_scripted_model_solves_and_fails(fmt: ToolCallFormat) -> None:
    settings = AgentSettings(tool_call_format=fmt)
    async with FakeOpenAI([solving_script(), failing_script()]) as server, small_pool() as pool:
        model = OpenAIChatModel(server.base_url, "scripted-model")
        solved, failed = await asyncio.gather(
            run_rollout(pool, FIZZBUZZ, model, settings, "solver"),
            run_rollout(pool, FIZZBUZZ, model, settings, "failer"),
        )
        await model.aclose()
        stats = pool.stats()

    assert (solved.status, solved.reward, solved.finished) == ("ok", 1.0, "answer")
    assert (solved.turns, solved.tool_calls, solved.malformed_calls) == (6, 2, 3)
    assert [c.passed for c in solved.checks] == [True, True]
    assert (failed.status, failed.reward, failed.turns, failed.tool_calls) == ("ok", 0.0, 2, 1)
    assert stats.leases == 2 and stats.releases == 2

    tool_results = [m for m in solved.messages if m["role"] == "tool"]
    assert [m["content"].startswith("error:") for m in tool_results] == [True, False, True, False, True]
    assert "not valid JSON" in tool_results[0]["content"]
    assert tool_results[1]["content"].startswith("wrote ") and "fizzbuzz.py" in tool_results[1]["content"]
    assert "['1', '2', 'Fizz', '4', 'Buzz']" in tool_results[3]["content"]
    assert "[exit code 0]" in tool_results[3]["content"]
    assert "unknown tool 'delete_everything'" in tool_results[4]["content"]
    assert tool_results[2]["tool_call_id"] == solved.messages[4]["tool_calls"][0]["id"]

    requests = server.scripted_requests()
    assert len(requests) == 8  # 6 turns + 2 turns
    has_tools = {"tools" in request for request in requests}
    system = requests[0]["messages"][0]["content"]
    if fmt == "openai":
        assert has_tools == {True} and "<tools>" not in system
    else:
        assert has_tools == {False} and "<tools>" in system
    # what the model saw after its malformed first turn: the error, answering its call
    second = next(r for r in requests if len(r["messages"]) == 4 and "not valid JSON" in str(r["messages"][3]))
    assert second["messages"][3]["role"] == "tool"


async def test_turn_limit_still_scores() -> None:
    endless = [hermes("bash", command=f"echo {i}") for i in range(10)]
    async with FakeOpenAI([endless]) as server, small_pool() as pool:
        model = OpenAIChatModel(server.base_url, "scripted-model")
        rollout = await run_rollout(pool, FIZZBUZZ, model, AgentSettings(max_turns=3))
        await model.aclose()
    assert (rollout.finished, rollout.turns, rollout.tool_calls, rollout.reward) == ("max_turns", 3, 3, 0.0)


class BrokenPool:
    """A pool whose sandbox dies on the first tool call."""

    def __init__(self) -> None:
        self.released = 0
        self.config = SlotPoolConfig()

    def heartbeat(self, slot: str) -> None:
        pass

    @contextlib.asynccontextmanager
    async def slot(
        self,
        trajectory_id: str | None = None,
        timeout: float | None = None,
        from_snapshot: str | None = None,
        *,
        image: str | None = None,
    ) -> AsyncIterator[str]:
        try:
            yield "slot-0"
        finally:
            self.released += 1

    async def execute(
        self, slot: str, tool: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> None:
        raise SlotLost("server local-0 died")


async def test_sandbox_failure_is_an_infrastructure_failure_not_a_zero() -> None:
    pool = BrokenPool()
    model = Scripted(AssistantReply('<tool_call>{"name": "bash", "arguments": {"command": "ls"}}</tool_call>'))
    rollout = await run_rollout(pool, FIZZBUZZ, model, AgentSettings())  # type: ignore[arg-type]
    assert rollout.status == "infra_error" and rollout.reward is None
    assert rollout.error is not None and "SlotLost: server local-0 died" in rollout.error
    assert pool.released == 1


async def test_no_free_slot_in_time_is_an_infrastructure_failure() -> None:
    async with small_pool(slots_per_container=1) as pool:
        held = await pool.acquire("holder")
        rollout = await run_rollout(pool, FIZZBUZZ, Scripted(), AgentSettings(acquire_timeout=0.2))
        pool.release(held)
    assert rollout.status == "infra_error" and rollout.error is not None and "AcquireTimeout" in rollout.error


class Slow(Scripted):
    async def complete(self, messages: Sequence[Message], tools: Sequence[Message] | None) -> AssistantReply:
        await asyncio.sleep(1.5)
        return await super().complete(messages, tools)


async def test_a_slow_model_keeps_its_slot() -> None:
    # leases quiet for 0.6 s are reclaimed; the model thinks for 1.5 s per turn
    async with small_pool(lease_ttl=0.6) as pool:
        model = Slow(
            AssistantReply('<tool_call>{"name": "bash", "arguments": {"command": "echo still mine"}}</tool_call>'),
            AssistantReply("done"),
        )
        rollout = await run_rollout(pool, FIZZBUZZ, model, AgentSettings())
        stats = pool.stats()
    assert rollout.status == "ok", rollout.error
    assert "still mine" in rollout.messages[3]["content"]
    assert stats.reclaimed == 0


async def test_model_failure_propagates_and_the_slot_goes_back() -> None:
    async with small_pool() as pool:
        model = Scripted(
            AssistantReply('<tool_call>{"name": "bash", "arguments": {"command": "touch x"}}</tool_call>'),
            ModelError("model server answered HTTP 500"),
        )
        with pytest.raises(ModelError):
            await run_rollout(pool, FIZZBUZZ, model, AgentSettings())
        stats = pool.stats()
    assert stats.leases == 1 and stats.releases == 1


async def test_unreachable_model_server_is_a_clear_model_error() -> None:
    model = OpenAIChatModel("http://127.0.0.1:9/v1", "m")
    with pytest.raises(
        ModelError, match=re.escape("cannot reach the model server http://127.0.0.1:9/v1/chat/completions")
    ):
        await model.complete(initial_messages(FIZZBUZZ, "openai"), None)
    await model.aclose()


def test_long_tool_output_is_clipped_head_and_tail() -> None:
    text = "".join(f"line {i}\n" for i in range(1000))
    clipped = clip(text, 300)
    assert clipped.startswith("line 0\n") and clipped.endswith("line 999\n")
    assert "characters cut" in clipped and len(clipped) < 400


SETUP_TASK = FIZZBUZZ.model_copy(
    update={
        "id": "with-setup",
        "setup_files": {"notes/readme.txt": "from the task\n"},
        "setup_commands": ["cat /proc/sys/kernel/random/uuid > stamp && mkdir -p dep && echo installed > dep/x"],
    }
)


@pytest.mark.parametrize("fork_setup", [True, False])
async def test_task_setup_runs_once_per_server_with_fork_setup(fork_setup: bool) -> None:
    async def rollout(pool: SlotPool, n: int) -> str:
        model = Scripted(
            AssistantReply('<tool_call>{"name": "bash", "arguments": {"command": "cat stamp dep/x notes/readme.txt"}}'
                           "</tool_call>"),
            AssistantReply("done"),
        )  # fmt: skip
        result = await run_rollout(pool, SETUP_TASK, model, AgentSettings(fork_setup=fork_setup), f"r{n}")
        assert result.status == "ok", result.error
        content = str(result.messages[3]["content"])
        assert "installed" in content and "from the task" in content, content
        return content.split("\n")[0]

    async with small_pool(slots_per_container=3) as pool:
        stamps = await asyncio.gather(*(rollout(pool, n) for n in range(3)))
    # with fork_setup the three rollouts start from one setup; without, each ran its own
    assert len(set(stamps)) == (1 if fork_setup else 3), stamps


@pytest.mark.parametrize("fork_setup", [True, False])
async def test_a_failing_setup_command_is_an_error_of_the_task(fork_setup: bool) -> None:
    broken = SETUP_TASK.model_copy(update={"id": "broken-setup", "setup_commands": ["echo oops >&2; exit 4"]})
    async with small_pool() as pool:
        with pytest.raises(TaskError, match=r"broken-setup setup.*exit 4.*oops"):
            await run_rollout(pool, broken, Scripted(), AgentSettings(fork_setup=fork_setup))
        stats = pool.stats()
    assert stats.leases == stats.releases
