"""`atropos-sandbox demo` end to end: a real local pool, concurrent trajectories, the table, the
summary and the rollouts JSONL; with the reference policy and with a (scripted) model server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from atropos import cli
from tests.env_fixtures import failing_script, solving_script
from tests.fake_openai import FakeOpenAI
from tests.server_process import wait_until_gone

SMALL_POOL = ["--containers", "1", "--max-containers", "2", "--slots-per-container", "4"]


def rollouts(path: Path) -> list[dict[str, Any]]:
    """The rollouts of a run's JSONL (its first line is the run's header)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert "run" in lines[0] and lines[0]["run"]["pool"]["driver"]["type"], lines[0]
    return lines[1:]


def test_reference_policy_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rollouts.jsonl"
    code = cli.main(
        ["demo", "--tasks", "8", "--concurrency", "6", "--tool-call-format", "hermes", "--out", str(out), *SMALL_POOL]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "policy: reference solutions replayed through real tool calls (no model" in printed
    assert "pool ready" in printed  # start-up progress
    assert "task                      turns  tool calls  reward   wall s  status" in printed
    for line in (
        "trajectories      8 (8 scored, 8 solved)",
        "reward mean       1.000",
        "infra failures    0",
        "sandbox           isolation ",  # what was in force, in the summary too
        "tool calls/s      ",
        "wall time         ",
        f"rollouts          {out}",
    ):
        assert line in printed
    records = rollouts(out)
    assert len(records) == 8 and all(r["reward"] == 1.0 and r["status"] == "ok" for r in records)
    assert all(r["messages"][0]["role"] == "system" and r["tool_calls"] >= 1 for r in records)
    assert sum(1 for line in printed.splitlines() if line.rstrip().endswith("  ok")) == 8


async def test_model_server_drives_the_trajectories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rollouts.jsonl"
    async with FakeOpenAI([solving_script(), failing_script()]) as server:
        code = await asyncio.to_thread(
            cli.main,
            [
                "demo",
                "--openai-base-url",
                server.base_url,
                "--model",
                "scripted-model",
                "--task-ids",
                "fizzbuzz",
                "--tasks",
                "4",
                "--out",
                str(out),
                *SMALL_POOL,
            ],
        )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"policy: model scripted-model at {server.base_url} (openai tool calls)" in printed
    records = rollouts(out)
    assert [r["task_id"] for r in records] == ["fizzbuzz"] * 4
    assert sorted(r["reward"] for r in records) == [0.0, 0.0, 1.0, 1.0]
    assert sorted(r["malformed_calls"] for r in records) == [0, 0, 3, 3]
    assert "trajectories      4 (4 scored, 2 solved)" in printed and "reward mean       0.500" in printed
    assert "3 malformed call(s)" in printed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--concurrency", "0"], "--concurrency must be at least 1"),
        (["--model", "m"], "--openai-base-url and --model go together"),
        (["--driver", "singularity"], "driver 'singularity' needs `singularity_image`"),
        (["--driver", "docker"], "driver 'docker' needs `image`"),
        (["--task-ids", "fizzbuzz,nope"], "unknown task id(s): nope"),
        (["--task-file", "/nowhere/tasks.jsonl"], "cannot read the task file '/nowhere/tasks.jsonl'"),
        (["--backend", "slurm", "--backend-option", "partition"], "backend option 'partition': write KEY=VALUE"),
        (["--backend", "slurm", "--backend-option", "partitoin=cpu"], "backend.slurm.partitoin: Extra inputs"),
        (["--backend", "slurm", "--backend-option", "sbatch_args=[--x]"], "backend option sbatch_args: not JSON"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["demo", *flags]) == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_pool_that_cannot_start_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        [
            "demo",
            "--backend",
            "nomad",
            "--nomad-address",
            "http://127.0.0.1:1",
            "--tasks",
            "1",
            "--out",
            str(tmp_path / "r.jsonl"),
        ]
    )
    assert code == 1
    assert "error: the sandbox pool could not start: BackendError" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_everything_but_the_environment_imports_without_atroposlib() -> None:
    program = """
import importlib, pkgutil, sys
sys.modules["atroposlib"] = None  # as if the `atropos` extra were not installed
sys.modules["transformers"] = None
import atropos.envs
names = [m.name for m in pkgutil.iter_modules(atropos.envs.__path__, "atropos.envs.")]
for name in names:
    if name != "atropos.envs.agent_env":
        importlib.import_module(name)
from atropos import cli
assert "demo" in cli.build_parser().format_help()
try:
    import atropos.envs.agent_env
except ImportError:
    print("ok", len(names))
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "ok" and int(done.stdout.split()[1]) >= 10


def test_demo_as_a_user_runs_it_prints_no_traceback(tmp_path: Path) -> None:
    """The README's main command in a child process: a clean run leaves nothing on stderr but progress."""
    done = subprocess.run(
        [sys.executable, "-m", "atropos.cli", "demo", "--tasks", "6", "--out", str(tmp_path / "r.jsonl"), *SMALL_POOL],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "never retrieved" not in done.stderr, done.stderr
    assert "reward mean       1.000" in done.stdout


def _demo_child(tmp_path: Path, *flags: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TMPDIR": str(tmp_path), "ATROPOS_SANDBOX_STATE_DIR": str(tmp_path / "state")}
    return subprocess.Popen(
        [sys.executable, "-m", "atropos.cli", "demo", *flags, *SMALL_POOL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_demo_keeps_its_finished_rollouts_and_leaves_nothing(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    child = _demo_child(tmp_path, "--tasks", "400", "--concurrency", "2")
    assert child.stdout is not None
    seen = []
    for line in child.stdout:  # the table's rows: rollouts that finished
        seen.append(line)
        if line.rstrip().endswith("  ok"):
            break
    child.send_signal(sig)
    out, err = child.communicate(timeout=120)
    printed = "".join(seen) + out
    assert child.returncode == code, err
    assert "Traceback" not in err and "CancelledError" not in err, err
    (run_dir,) = (tmp_path / "demo-runs").iterdir()  # the default output: a new run directory
    assert f"rollouts go to {run_dir / 'rollouts.jsonl'}" in printed
    kept = rollouts(run_dir / "rollouts.jsonl")
    assert 1 <= len(kept) < 400 and all(r["status"] == "ok" for r in kept)
    assert (
        err.strip().splitlines()[-1]
        == f"interrupted: {len(kept)} finished rollout(s) kept in {run_dir / 'rollouts.jsonl'}"
    )
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("atropos-pool-")]  # the pool's work dir
    assert not list((tmp_path / "state").glob("*.json"))  # its servers' records
    assert wait_until_gone(str(tmp_path)) == []  # and its processes


def test_an_existing_out_file_is_never_written_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine.jsonl"
    out.write_text("precious\n")
    assert cli.main(["demo", "--out", str(out)]) == 2
    assert "exists: rollouts are never written over" in capsys.readouterr().err
    assert out.read_text() == "precious\n"


def test_a_model_server_that_is_not_there_is_said_before_any_slot_is_leased(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = cli.main(["demo", "--openai-base-url", f"http://127.0.0.1:{port}/v1", "--model", "m",
                     "--out", str(tmp_path / "r.jsonl"), *SMALL_POOL])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1 and f"the model server http://127.0.0.1:{port}/v1 does not answer" in captured.err
    assert "pool ready" not in captured.out  # checked before the pool started, not after 30 s of silence
