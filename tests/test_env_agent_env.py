"""AgentEnv through atroposlib: the `serve | process | evaluate` command line, JSONL of scored groups
from `process` against a scripted model server (driver process, and driver singularity with the
apptainer stand-in of tests/bin), and the environment's handling of groups."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from atropos.envs.agent_loop import Rollout
from atropos.envs.task_set import load_tasks
from atropos.errors import InfrastructureError
from tests.env_fixtures import OFFLINE_VARS, failing_script, solving_script
from tests.fake_openai import FakeOpenAI
from tests.nomad_fixtures import agent_env as standin_env
from tests.nomad_fixtures import task_user, write_standin_image

pytest.importorskip("atroposlib", reason="atroposlib comes with the `atropos` extra (CI installs it)")

from atropos.envs.agent_env import AgentEnv, AgentEnvConfig

POOL = ["--env.slots_per_container=2", "--env.max_containers=1"]


@pytest.fixture(autouse=True)
def _in_a_scratch_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """atroposlib makes data/<env>.jsonl where an environment is built: never in the checkout."""
    monkeypatch.chdir(tmp_path)


async def run_env(*args: str) -> tuple[int, str, str]:
    """`python -m atropos.envs.agent_env ...` as a child, without blocking the loop of the test's servers.
    The apptainer stand-in (tests/bin) is on its PATH for `--env.driver=singularity`."""
    env = {**standin_env(), **OFFLINE_VARS}
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "atropos.envs.agent_env",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), timeout=90)
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """AgentEnv.cli() in this process: the same parsing as `python -m atropos.envs.agent_env`, minus the start-up."""
    monkeypatch.setattr(sys, "argv", ["agent_env", *args])
    with pytest.raises(SystemExit) as exited:
        AgentEnv.cli()
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


@pytest.mark.parametrize("command", ["serve", "process", "evaluate"])
def test_help_lists_the_sandbox_flags(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(monkeypatch, capsys, command, "--help")
    assert code == 0
    for flag in (
        "--env.driver",
        "--env.singularity_image",
        "--env.backend",
        "--env.tool_call_format",
        "--env.max_turns",
        "--env.task_file",
        "--openai.base_url",
    ):
        assert flag in out, f"{flag} missing from `{command} --help`"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--env.driver=kubernetes"], "env.driver: Input should be 'process', 'docker' or 'singularity'"),
        (["--env.driver=singularity"], "driver 'singularity' needs `singularity_image`"),
        (
            ["--env.driver=singularity", "--env.singularity_image=/nowhere/x.sif"],
            "singularity_image '/nowhere/x.sif' does not exist",
        ),
        (["--env.max_turns=0"], "env.max_turns: Input should be greater than or equal to 1"),
    ],
)
def test_bad_values_fail_with_one_clear_line(
    flags: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "process", "--env.use_wandb=false", *flags)
    assert code == 2
    assert f"error: invalid configuration: {message}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("fmt", "driver"), [("hermes", "process"), ("openai", "singularity")])
async def test_process_writes_groups_whose_rewards_tell_solving_from_failing(
    fmt: str, driver: str, tokenizer_dir: str, tmp_path: Path
) -> None:
    out = tmp_path / "groups.jsonl"
    sandbox = [f"--env.driver={driver}"]
    if driver == "singularity":
        sandbox.append(f"--env.singularity_image={write_standin_image(str(tmp_path / 'sandbox.sif'))}")
        sandbox.append(f"--env.run_as={task_user() or 'none'}")  # a stand-in image is this host's Python
    async with FakeOpenAI([solving_script(), failing_script()]) as server:
        code, _, err = await run_env(
            "process",
            *sandbox,
            f"--openai.base_url={server.base_url}",
            "--openai.model_name=scripted-model",
            "--openai.api_key=x",
            f"--env.tokenizer_name={tokenizer_dir}",
            f"--env.tool_call_format={fmt}",
            "--env.task_ids=fizzbuzz",
            "--env.group_size=2",
            "--env.total_steps=1",
            "--env.use_wandb=false",
            f"--env.data_path_to_save_groups={out}",
            *POOL,
        )
    assert code == 0, err
    groups = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(groups) == 1
    group = groups[0]
    assert sorted(group["scores"]) == [0.0, 1.0]
    for tokens, masks, messages, score in zip(
        group["tokens"], group["masks"], group["messages"], group["scores"], strict=True
    ):
        assert len(tokens) == len(masks) > 0
        trained = [t for t, m in zip(tokens, masks, strict=True) if m != -100]
        assert trained and all(m in (-100, t) for t, m in zip(tokens, masks, strict=True))
        assert masks[0] == -100  # the prompt is never trained on
        assistant_turns = sum(1 for m in messages if m["role"] == "assistant")
        assert assistant_turns == (6 if score == 1.0 else 2)
    tools_sent = {"tools" in request for request in server.scripted_requests()}
    assert tools_sent == {fmt == "openai"}
    answered = [m["content"] for r in server.scripted_requests() for m in r["messages"] if m["role"] == "tool"]
    assert any(content.startswith("error: the tool call is not valid JSON") for content in answered)
    assert "[atropos-sandbox] pool ready" in err and "[atropos-sandbox] pool closed" in err
    assert f"starting 1 {driver} server(s)" in err
    # an OpenAI-compatible server says no sampled ids: the chat template's tokens, and the log says so
    assert group.get("inference_logprobs") is None


async def test_evaluate_runs_each_task_once(tokenizer_dir: str, tmp_path: Path) -> None:
    async with FakeOpenAI([solving_script()]) as server:
        code, _, err = await run_env(
            "evaluate",
            f"--openai.base_url={server.base_url}",
            "--openai.model_name=scripted-model",
            "--openai.api_key=x",
            f"--env.tokenizer_name={tokenizer_dir}",
            "--env.task_ids=fizzbuzz",
            "--env.use_wandb=false",
            f"--env.data_dir_to_save_evals={tmp_path}",
            *POOL,
        )
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())["results"]["all"]
    assert metrics == {
        "eval/reward_mean": 1.0,
        "eval/solved_fraction": 1.0,
        "eval/infra_failures": 0.0,
        "eval/errors": 0.0,
    }
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(s["task_id"], s["reward"]) for s in samples] == [("fizzbuzz", 1.0)]


def test_config_init_gives_server_configs_so_openai_flags_apply() -> None:
    env_config, servers = AgentEnv.config_init()
    assert isinstance(env_config, AgentEnvConfig) and env_config.driver == "process"
    assert isinstance(servers, list) and len(servers) == 1 and servers[0].base_url


def test_config_maps_onto_the_pool(tmp_path: Path) -> None:
    sif = tmp_path / "sandbox.sif"
    sif.write_bytes(b"SIF")
    config = AgentEnvConfig(
        driver="singularity",
        singularity_image=str(sif),
        backend="nomad",
        nomad_address="http://nomad:4646",
        slots_per_container=16,
        max_containers=8,
        tool_timeout=30,
        tool_call_format="openai",
        max_turns=3,
    )
    pool = config.pool_config()
    assert (pool.driver.type, pool.driver.image, pool.backend.type, pool.backend.address) == (
        "singularity",
        str(sif),
        "nomad",
        "http://nomad:4646",
    )
    assert (pool.slots_per_container, pool.max_containers, pool.tool_timeout) == (16, 8, 30)
    settings = config.agent_settings()
    assert (settings.tool_call_format, settings.max_turns, settings.tool_timeout) == ("openai", 3, 30)


def test_backend_options_set_the_backend_and_bad_ones_are_refused_by_name() -> None:
    config = AgentEnvConfig(backend="slurm", backend_options='{"partition": "cpu", "time_limit": "4:00:00"}')
    backend = config.pool_config().backend
    assert (backend.type, getattr(backend, "partition", None), getattr(backend, "time_limit", None)) == (
        "slurm",
        "cpu",
        "4:00:00",
    )
    for bad, expect in [("{nope", "backend_options: not JSON"), ('["cpu"]', "a JSON object"),
                        ('{"partitoin": "cpu"}', "partitoin")]:  # fmt: skip
        with pytest.raises(ValueError, match=expect):
            AgentEnvConfig(backend="slurm", backend_options=bad)


def make_env(tokenizer_dir: str, **overrides: Any) -> AgentEnv:
    env_config, servers = AgentEnv.config_init()
    config = env_config.model_copy(
        update={
            "tokenizer_name": tokenizer_dir,
            "use_wandb": False,
            "group_size": 2,
            "include_messages": True,
            **overrides,
        }
    )
    return AgentEnv(config, servers)


def env_with_outcomes(tokenizer_dir: str, *outcomes: tuple[str, float | None]) -> AgentEnv:
    """An AgentEnv whose rollouts come out as given, (status, reward) each, without model or pool."""
    env = make_env(tokenizer_dir, group_size=len(outcomes))

    async def fake_rollouts(tasks: list[Any], split: str, temperature: float, concurrency: int) -> list[Rollout]:
        return [
            Rollout(
                task_id=task.id,
                trajectory_id=f"t{i}",
                status=status,
                reward=reward,  # type: ignore[arg-type]
                error=None if status == "ok" else f"{status} happened",
            )
            for i, (task, (status, reward)) in enumerate(zip(tasks, outcomes, strict=True))
        ]

    env.rollouts = fake_rollouts  # type: ignore[method-assign]
    return env


async def test_a_group_with_sandbox_failures_is_dropped_and_requeued(tokenizer_dir: str) -> None:
    env = env_with_outcomes(tokenizer_dir, ("ok", 1.0), ("infra_error", None))
    task = load_tasks(None, ["fizzbuzz"])[0]
    group, backlog = await env.collect_trajectories(task)
    assert group is None and backlog == [task]
    assert env._infra_failures == 1


async def test_a_group_whose_model_failed_raises(tokenizer_dir: str) -> None:
    env = env_with_outcomes(tokenizer_dir, ("ok", 1.0), ("error", None))
    with pytest.raises(RuntimeError, match="1 of 2 rollouts of task fizzbuzz failed; first: error happened"):
        await env.collect_trajectories(load_tasks(None, ["fizzbuzz"])[0])


async def test_per_rollout_facts_reach_the_metrics_and_the_log(
    tokenizer_dir: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from atroposlib.envs.base import BaseEnv

    env = make_env(tokenizer_dir, group_size=2)
    facts = [
        {"turns": 3, "tool_calls": 2, "malformed_calls": 1, "finished": "answer", "sandbox_time_s": 0.5},
        {"turns": 8, "tool_calls": 7, "malformed_calls": 0, "finished": "max_turns", "sandbox_time_s": 1.5},
    ]

    async def fake_rollouts(tasks: list[Any], split: str, temperature: float, concurrency: int) -> list[Rollout]:
        return [Rollout(task_id=t.id, trajectory_id=f"t{i}", status="ok", reward=1.0, **f)
                for i, (t, f) in enumerate(zip(tasks, facts, strict=True))]  # fmt: skip

    env.rollouts = fake_rollouts  # type: ignore[method-assign]
    env.scored_group = lambda rollouts: {"scores": [1.0] * len(rollouts)}  # type: ignore[method-assign,assignment,return-value]
    logged: dict[str, Any] = {}

    async def capture(self: Any, wandb_metrics: dict[str, Any] | None = None) -> None:
        logged.update(wandb_metrics or {})

    monkeypatch.setattr(BaseEnv, "wandb_log", capture)
    with caplog.at_level("INFO", logger="atropos.envs"):
        await env.collect_trajectories(load_tasks(None, ["fizzbuzz"])[0])
    await env.wandb_log({})
    assert logged["train/turns_mean"] == 5.5 and logged["train/tool_calls_mean"] == 4.5
    assert logged["train/malformed_calls_mean"] == 0.5 and logged["train/finished_with_answer"] == 0.5
    assert logged["train/sandbox_time_s_mean"] == 1.0 and logged["train/infra_failure_fraction"] == 0.0
    assert any("event=group task=fizzbuzz rollouts=2 turns=11 tool_calls=9 malformed_calls=1" in r.message
               for r in caplog.records), caplog.text  # fmt: skip


async def test_serve_stops_on_a_dead_sandbox_backend_and_requeues_the_item(
    tokenizer_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from atroposlib.envs.base import BaseEnv

    env = env_with_outcomes(tokenizer_dir, ("infra_error", None), ("infra_error", None))
    task = load_tasks(None, ["fizzbuzz"])[0]
    attempts = []
    groups = []
    run_group = env.rollouts

    async def counted(*args: Any) -> list[Rollout]:
        groups.append(1)
        return await run_group(*args)

    env.rollouts = counted  # type: ignore[method-assign]

    async def atroposlib_loop(self: Any) -> None:
        # what atroposlib's serve loop does with a group: any error is logged and the next one starts
        while True:
            attempts.append(1)
            try:
                await self.collect_trajectories(task)
            except Exception:
                pass
            await asyncio.sleep(0)

    monkeypatch.setattr(BaseEnv, "env_manager", atroposlib_loop)
    with pytest.raises(InfrastructureError, match="groups in a row lost to sandbox failures"):
        await asyncio.wait_for(env.env_manager(), 30)
    assert len(groups) == 5 and len(attempts) >= 5 and env.backlog[-1] is task  # no group after the 5th


async def test_a_model_server_that_does_not_answer_is_said_before_any_slot_is_leased(tokenizer_dir: str) -> None:
    import socket

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _, err = await run_env(
        "process",
        f"--openai.base_url=http://127.0.0.1:{port}/v1",
        "--openai.model_name=m",
        "--openai.api_key=x",
        f"--env.tokenizer_name={tokenizer_dir}",
        "--env.use_wandb=false",
        "--env.total_steps=1",
        "--env.model_wait=2",
        *POOL,
    )
    assert code == 1, err
    assert f"error: no model server answers (http://127.0.0.1:{port}/v1: ConnectError" in err, err
    assert "waiting for a model server" in err and "pool ready" not in err


async def test_training_tokens_are_the_ids_and_logprobs_the_server_sampled(
    tokenizer_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    from atroposlib.envs.base import APIServerConfig
    from transformers import AutoTokenizer

    from tests.env_fixtures import FIZZBUZZ
    from tests.fake_openai import hermes
    from tests.fake_vllm import FakeVLLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    turns = [str(hermes("write_file", path="fizzbuzz.py", content=FIZZBUZZ)["content"]), "Done."]
    async with FakeVLLM(tokenizer, turns) as vllm:
        env_config, _ = AgentEnv.config_init()
        config = env_config.model_copy(update={
            "tokenizer_name": tokenizer_dir, "use_wandb": False, "group_size": 2, "include_messages": True,
            "tool_call_format": "hermes", "task_ids": "fizzbuzz", "slots_per_container": 2, "max_containers": 1,
        })  # fmt: skip
        server = APIServerConfig(server_type="vllm", base_url=vllm.base_url, model_name="m", api_key="x",
                                 tokenizer_name=tokenizer_dir)  # fmt: skip
        env = AgentEnv(config, [server])
        with caplog.at_level("INFO", logger="atropos.envs"):
            await env.setup()
            try:
                group, backlog = await env.collect_trajectories(env.tasks[0])
            finally:
                await env.close_pool()
    assert group is not None and backlog == [] and group["scores"] == [1.0, 1.0]
    assert "event=tokens source=server" in caplog.text
    trained = []
    for tokens, masks, logprobs in zip(group["tokens"], group["masks"], group["inference_logprobs"], strict=True):
        assert len(tokens) == len(masks) == len(logprobs) and masks[0] == -100
        trained += [(t, lp) for t, m, lp in zip(tokens, masks, logprobs, strict=True) if m != -100]
        assert all(m in (-100, t) for t, m in zip(tokens, masks, strict=True))
    assert len(vllm.sampled) == 4 and len(trained) == sum(len(ids) for ids, _ in vllm.sampled)  # 2 x 2 turns
    # exactly what the server sampled (ids and logprobs), nothing re-tokenized, nothing else trained
    assert sorted(trained) == sorted((t, lp) for ids, lps in vllm.sampled for t, lp in zip(ids, lps, strict=True))


@pytest.mark.parametrize("command", ["serve", "process"])
def test_help_shows_the_defaults_the_environment_runs_with(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(monkeypatch, capsys, command, "--help")
    text = " ".join(out.split())  # argparse wraps the help text anywhere
    env, servers = AgentEnv.config_init()
    assert code == 0
    for flag, value in (
        ("--env.tokenizer_name", env.tokenizer_name),
        ("--env.max_token_length", env.max_token_length),
        ("--openai.model_name", servers[0].model_name),
        ("--openai.base_url", servers[0].base_url),
    ):
        shown = text.split(f"{flag} {flag[2:].upper()} ", 1)[1].split(" --", 1)[0]
        assert f"default={value!r}" in shown.replace(" ", ""), (flag, shown)  # (no value holds a space)
    assert "DeepHermes-3-Llama-3-3B-Preview" not in text  # atroposlib's own default, which we never run with
