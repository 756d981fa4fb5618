"""The Harbor adapter, through Harbor's own runner: `harbor run -a oracle -e
atropos.integrations.harbor:SlotEnvironment` on small local tasks whose images are built from CI's
base image, in a Python 3.12 virtualenv of its own (Harbor needs >= 3.12; `.ci/run` makes
`.venv-harbor`, or $ATROPOS_HARBOR names a `harbor` command). Skipped with the reason where Harbor or
the Docker engine is missing, except where $ATROPOS_REQUIRE_HARBOR=1 (CI): there that fails."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.attacks import node_uids
from tests.images_fixtures import BASE_IMAGE, docker_unready

HARBOR = os.environ.get("ATROPOS_HARBOR") or str(Path(__file__).parent.parent / ".venv-harbor" / "bin" / "harbor")
REQUIRED = os.environ.get("ATROPOS_REQUIRE_HARBOR") == "1"
_MARK = "atropos-harbor-probe"


@pytest.fixture(scope="module", autouse=True)
def _harbor_here() -> None:
    missing = docker_unready() or (None if os.access(HARBOR, os.X_OK) else f"no Harbor at {HARBOR}")
    if missing is not None:
        if REQUIRED:
            pytest.fail(f"ATROPOS_REQUIRE_HARBOR=1 but {missing}")
        pytest.skip(missing)


def _task(root: Path, name: str, solve: str, test: str, network: str = "public") -> None:
    task = root / name
    for sub in ("environment", "solution", "tests"):
        (task / sub).mkdir(parents=True)
    (task / "task.toml").write_text(
        textwrap.dedent(f"""\
        version = "1.0"
        [verifier]
        timeout_sec = 120.0
        [agent]
        timeout_sec = 120.0
        [environment]
        network_mode = "{network}"
        """)
    )
    (task / "instruction.md").write_text(f"Task {name}.\n")
    (task / "environment" / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nWORKDIR /app\n")
    (task / "solution" / "solve.sh").write_text(f"#!/bin/bash\n{solve}\n")
    (task / "tests" / "test.sh").write_text(f"#!/bin/bash\n{test}\n")


def _run(tasks: Path, jobs: Path, name: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HARBOR_TELEMETRY": "0"}
    argv = [HARBOR, "run", "-p", str(tasks), "-a", "oracle", "-e", "atropos.integrations.harbor:SlotEnvironment",
            "--ek", 'pool={"slots_per_container": 4, "max_containers": 2}', "-o", str(jobs), "--job-name", name,
            "-n", "3", "-y"]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900, check=False)


def _trials(jobs: Path, name: str) -> dict[str, dict[str, object]]:
    found = {}
    for result in (jobs / name).glob("*/result.json"):
        trial = json.loads(result.read_text())
        found[trial["task_name"]] = {
            "reward": ((trial.get("verifier_result") or {}).get("rewards") or {}).get("reward"),
            "error": trial.get("exception_info"),
            "stdout": (result.parent / "verifier" / "test-stdout.txt").read_text(errors="replace")
            if (result.parent / "verifier" / "test-stdout.txt").is_file()
            else "",
        }
    return found


def test_harbor_runs_tasks_in_slots_scoring_a_solution_1_and_a_wrong_one_0(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    check = 'test "$(cat /app/hello.txt 2>/dev/null)" = hello && echo 1 > /logs/verifier/reward.txt || echo 0 > $_'
    check = check.replace("$_", "/logs/verifier/reward.txt")
    # each trial in a slot of its own: what one solution leaves in its root is not in another's;
    # no command runs as root on the node: the solution's marked `sleep`, seen from the node
    probe = 'ls /app; echo nets=$(awk \'NR > 2 {sub(":", "", $1); print $1}\' /proc/net/dev)'
    mark = f"(exec -a {_MARK} sleep 3)"
    _task(
        tasks, "right", f"{mark}; echo hello > /app/hello.txt; echo secret > /app/right-was-here", f"{probe}\n{check}"
    )
    _task(tasks, "wrong", "echo goodbye > /app/hello.txt", f"{probe}\n{check}")
    _task(tasks, "offline", "true", f"{probe}\necho 1 > /logs/verifier/reward.txt", "no-network")
    with node_uids(_MARK) as uids:
        done = _run(tasks, tmp_path / "jobs", "slots")
    trials = _trials(tmp_path / "jobs", "slots")
    assert done.returncode == 0 and len(trials) == 3, (done.stdout[-3000:], done.stderr[-3000:])
    assert {name: t["error"] for name, t in trials.items()} == {"right": None, "wrong": None, "offline": None}
    assert (trials["right"]["reward"], trials["wrong"]["reward"]) == (1.0, 0.0), trials
    assert "right-was-here" in str(trials["right"]["stdout"])
    assert "right-was-here" not in str(trials["wrong"]["stdout"]), trials["wrong"]
    assert uids and 0 not in uids, uids  # the node saw the solution's process, never as root
    offline = dict(line.split("=", 1) for line in str(trials["offline"]["stdout"]).splitlines() if "=" in line)
    assert offline["nets"] == "lo", trials["offline"]  # no-network: a slot with no interface but loopback


def test_an_allowlist_task_is_refused_before_it_starts(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    _task(tasks, "listed", "true", "echo 1 > /logs/verifier/reward.txt", "allowlist")
    toml = tasks / "listed" / "task.toml"
    toml.write_text(toml.read_text() + 'allowed_hosts = ["example.com"]\n')
    done = _run(tasks, tmp_path / "jobs", "listed")
    assert done.returncode != 0 and "not supported by atropos-slot" in done.stdout + done.stderr, (
        done.stdout[-2000:],
        done.stderr[-2000:],
    )
