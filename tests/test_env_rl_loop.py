"""The RL user's loop, for real and offline: atroposlib's trajectory API (`run-api`) on loopback, the
environment in `serve` mode against it with a scripted model server (a solving and a failing
policy), and a trainer that registers and pulls `/batch`. A sandbox server killed mid-run must cost
no false zero: its groups are dropped and requeued, never scored."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from atropos.host import command_line, snapshot
from tests.env_fixtures import OFFLINE_VARS, WRONG_FIZZBUZZ, solving_script
from tests.fake_openai import FakeOpenAI, hermes, say
from tests.server_process import pids_with_arg

# one slot per server: a group's two rollouts always run on two servers, so killing one loses one rollout
POOL = ["--env.slots_per_container=1", "--env.min_containers=2", "--env.max_containers=2", "--env.run_as=none"]
BATCHES = 4
SLOW = "sleep 1.5"


def slow_failing_script() -> list[dict[str, Any]]:
    """Waits in the sandbox (long enough to lose its server meanwhile), then writes a wrong `fizzbuzz`."""
    return [hermes("bash", command=f"{SLOW}; echo waited"), hermes("write_file", path="fizzbuzz.py",
            content=WRONG_FIZZBUZZ), say("Done.")]  # fmt: skip


def _server_of(pid: int) -> int | None:
    """The sandbox server above this process (its runner's parent)."""
    procs = snapshot()
    while pid in procs:
        if "atropos.sandbox.server" in command_line(pid):
            return pid
        pid = procs[pid].ppid
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout:.0f} s")


async def test_serve_feeds_a_trainer_and_a_killed_sandbox_costs_no_false_zero(
    tokenizer_dir: str, tmp_path: Path, figures: list[str]
) -> None:
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **OFFLINE_VARS}
    api = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "run-api"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    serve: asyncio.subprocess.Process | None = None
    try:
        async with httpx.AsyncClient(base_url=api_url, timeout=10) as http:

            async def api_up() -> bool:
                try:
                    return (await http.get("/")).status_code < 500
                except httpx.HTTPError:
                    return False

            await _until(api_up, 60, "trajectory API")
            registration = {"wandb_group": "g", "wandb_project": "p", "batch_size": 4, "max_token_len": 8192,
                            "checkpoint_dir": str(tmp_path), "save_checkpoint_interval": 0, "starting_step": 0,
                            "num_steps": 100}  # fmt: skip
            assert (await http.post("/register", json=registration)).status_code == 200
            async with FakeOpenAI([solving_script(), slow_failing_script()]) as model:
                started = time.monotonic()
                serve_log = (tmp_path / "serve.log").open("wb")  # a pipe nobody reads would fill up
                serve = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "atropos.envs.agent_env", "serve",
                    f"--env.rollout_server_url={api_url}", f"--openai.base_url={model.base_url}",
                    "--openai.model_name=scripted-model", "--openai.api_key=x",
                    f"--env.tokenizer_name={tokenizer_dir}", "--env.task_ids=fizzbuzz", "--env.group_size=2",
                    "--env.batch_size=4", "--env.total_steps=100", "--env.use_wandb=false",
                    "--env.include_messages=true", "--env.max_num_workers=2", *POOL,
                    env=env, stdout=asyncio.subprocess.DEVNULL, stderr=serve_log,
                    start_new_session=True, cwd=tmp_path,  # atroposlib writes data/ where it runs
                )  # fmt: skip

                async def a_batch() -> list[dict[str, Any]] | None:
                    batch = (await http.get("/batch")).json().get("batch")
                    return list(batch) if batch else None

                batches = [await _until(a_batch, 90, "first batch")]
                first = time.monotonic() - started

                async def a_slow_call() -> int | None:
                    return next((srv for p in pids_with_arg(SLOW) if (srv := _server_of(p)) is not None), None)

                # the server of a failing rollout dies while that rollout's command runs
                servers = [await _until(a_slow_call, 30, "slow call")]
                os.kill(servers[0], signal.SIGKILL)
                batches = []  # what was made after the kill
                while len(batches) < BATCHES:
                    batches.append(await _until(a_batch, 90, f"batch {len(batches) + 1} after the kill"))
                total = time.monotonic() - started
    finally:
        if serve is not None and serve.returncode is None:
            serve.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(serve.wait(), 30)
            except asyncio.TimeoutError:
                os.killpg(serve.pid, signal.SIGKILL)
                await serve.wait()
        api.terminate()
        api.wait(30)
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert " lost (" in log and "replacing it" in log, log[-3000:]  # the pool saw the kill and replaced the server
    assert "event=group_dropped" in log, log[-3000:]  # the group with the lost rollout was not sent
    assert serve is not None and serve.returncode == 130 and "Traceback" not in log, log[-3000:]  # Ctrl-C
    assert "Error in collect_trajectories" not in log, log[-3000:]  # workers outliving the pool requeue quietly
    groups = [group for batch in batches for group in batch]
    rollouts = sum(len(g["scores"]) for g in groups)
    figures.append(
        f"serve: first batch {first:.1f} s after start; then {rollouts} rollouts in {len(batches)} batches in "
        f"{total - first:.1f} s ({rollouts / (total - first):.2f} rollouts/s), a sandbox server killed meanwhile"
    )
    scores = [s for g in groups for s in g["scores"]]
    assert set(scores) == {0.0, 1.0}, scores
    for group in groups:
        for tokens, masks, messages, score in zip(
            group["tokens"], group["masks"], group["messages"], group["scores"], strict=True
        ):
            assert len(tokens) == len(masks) > 0 and masks[0] == -100
            assert all(m in (-100, t) for t, m in zip(tokens, masks, strict=True))
            assistant = [m for m in messages if m["role"] == "assistant"]
            solving = str(assistant[0].get("content") or "").startswith("I will write it.")
            # a zero only ever comes from the failing policy, run to its end: a lost sandbox is never a score
            assert score == (1.0 if solving else 0.0), (score, assistant[0])
            assert len(assistant) == (6 if solving else 3), (score, len(assistant))
    assert [p for p in servers if p in pids_with_arg("atropos.sandbox.server")] == []  # serve left none
