"""`--runner`: which program runs in every slot (the compiled runner or the Python one), how the
compiled one is found, and what `/health` says of it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from atropos.host import snapshot, tree_members
from atropos.sandbox.image_slots import HOST
from atropos.sandbox.rootfs import RUNNER_BINARY, build_layout
from atropos.sandbox.runner_choice import RUNNER_BIN_ENV, RunnerNotFound, choose_runner
from atropos.sandbox.server.isolation import runner_command
from atropos.slots import SlotPoolConfig
from tests.server_process import RunningServer, is_runner, run_server

NOWHERE = "/nonexistent/atropos-runner"


def health(srv: RunningServer) -> dict[str, object]:
    return dict(httpx.get(srv.url + "/health", timeout=30).json())


@pytest.fixture
def stand_in(tmp_path: Path) -> str:
    """An executable where the compiled runner is looked for (it never runs here: no slot starts)."""
    path = tmp_path / "bin" / "atropos-runner"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\nexit 70\n")
    path.chmod(0o755)
    return str(path)


def test_runner_python_runs_the_python_runner_and_health_says_so(tmp_path: Path) -> None:
    with run_server(str(tmp_path), "--slots", "1", "--isolation", "none", "--runner", "python") as srv:
        assert srv.execute(0, "bash", command="echo hi")["stdout"] == "hi\n"
        assert health(srv)["runner"] == "python"
        runners = [p for p in tree_members(srv.proc.pid, snapshot(), include_root=False) if is_runner(p)]
        assert len(runners) == 1
        with open(f"/proc/{runners[0]}/cmdline", "rb") as fh:
            assert b"atropos.sandbox.runner.main" in fh.read()


def test_runner_compiled_with_no_binary_refuses_to_start_and_names_where_it_looked(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "atropos.sandbox.server", "--data-dir", str(tmp_path), "--port", "0", "--runner",
         "compiled", "--isolation", "none"],
        env={**os.environ, RUNNER_BIN_ENV: NOWHERE}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"--runner compiled: no executable atropos-runner at {NOWHERE}" in done.stderr, done.stderr
    assert "ATROPOS_SANDBOX_READY" not in done.stdout


def test_auto_runs_the_compiled_runner_where_it_is_found_and_python_elsewhere(tmp_path: Path, stand_in: str) -> None:
    common = ("--slots", "1", "--isolation", "none", "--warm-slots", "0")
    with run_server(str(tmp_path / "a"), *common, env={RUNNER_BIN_ENV: NOWHERE}) as srv:
        assert health(srv)["runner"] == "python"
    if "ATROPOS_TEST_RUNNER" not in os.environ:  # that run names its runner: auto is not asked
        with run_server(str(tmp_path / "b"), *common, env={RUNNER_BIN_ENV: stand_in}) as srv:
            assert health(srv)["runner"] == "compiled"


def test_choose_runner(monkeypatch: pytest.MonkeyPatch, stand_in: str) -> None:
    monkeypatch.setenv(RUNNER_BIN_ENV, stand_in)
    assert choose_runner("auto").binary == choose_runner("compiled").binary == stand_in
    assert choose_runner("python").binary is None
    monkeypatch.setenv(RUNNER_BIN_ENV, NOWHERE)
    assert choose_runner("auto").kind == "python"
    with pytest.raises(RunnerNotFound, match=NOWHERE):
        choose_runner("compiled")


def test_the_compiled_runner_runs_from_its_copy_in_a_sandbox_and_needs_no_python_in_an_image(
    tmp_path: Path, stand_in: str
) -> None:
    args = ["--root", "/w", "--max-output", "10", "--max-file-bytes", "20", "--pid-namespace"]
    assert runner_command("/w", 10, 20, ("--pid-namespace",), binary=stand_in) == [stand_in, *args]
    assert runner_command("/w", 10, 20, ("--pid-namespace",), sandboxed=True, binary=stand_in) == [RUNNER_BINARY, *args]
    compiled = build_layout("system", state_dir=str(tmp_path / "c"), private=[], runner_binary=stand_in)
    assert os.access(tmp_path / "c" / "runner" / "atropos-runner", os.X_OK)
    assert compiled.image_runner == (RUNNER_BINARY,)
    assert not any(arg.startswith(HOST) for arg in compiled.image_args)  # nothing of the node's Python
    python = build_layout("system", state_dir=str(tmp_path / "p"), private=[])
    assert python.image_runner[-1].startswith(HOST) and any(arg.startswith(HOST) for arg in python.image_args)


def test_a_pool_passes_its_runner_to_its_servers() -> None:
    assert "--runner" not in SlotPoolConfig().server_spec().settings.to_args()  # the server's default
    args = SlotPoolConfig(runner="python").server_spec().settings.to_args()
    assert args[args.index("--runner") + 1] == "python"
    with pytest.raises(ValidationError, match="runner"):
        SlotPoolConfig.model_validate({"runner": "java"})
