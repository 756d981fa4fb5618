"""mini-swe-agent through its own code path: its environment loader finds our SlotEnvironment by
class path, its DefaultAgent with its DeterministicModel solves a small task end to end in a slot,
and two environments never share files."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm must not fetch prices from the internet
if os.environ.get("ATROPOS_REQUIRE_MINISWEAGENT") == "1":  # CI: missing, it fails instead of skipping
    import minisweagent
else:
    minisweagent = pytest.importorskip("minisweagent", reason="mini-swe-agent is not installed (extra mini-swe-agent)")

import yaml
from minisweagent.agents.default import DefaultAgent
from minisweagent.config import get_config_path
from minisweagent.environments import get_environment
from minisweagent.models.test_models import DeterministicModel, make_output

POOL = {"slots_per_container": 2, "min_containers": 1, "max_containers": 1}
ENVIRONMENT = {"environment_class": "atropos.integrations.minisweagent.SlotEnvironment", "pool": POOL}


def _agent_config() -> dict[str, object]:
    config = yaml.safe_load(get_config_path("default").read_text())
    return dict(config["agent"])


def test_default_agent_solves_a_task_in_a_slot() -> None:
    env = get_environment(ENVIRONMENT)
    model = DeterministicModel(
        outputs=[
            make_output("write it", [{"command": "printf 'def double(x):\\n    return 2 * x\\n' > double.py"}]),
            make_output("check it", [{"command": "python3 -c 'import double; print(double.double(21))'"}]),
            make_output("submit", [{"command": "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && cat double.py"}]),
        ]
    )
    agent = DefaultAgent(model, env, **_agent_config())
    result = agent.run("write double.py with a function double(x) returning 2 * x")
    assert result["exit_status"] == "Submitted", result
    assert "return 2 * x" in result["submission"]
    observations = [str(m.get("content")) for m in agent.messages if m.get("role") in ("user", "tool")]
    assert any("42" in text for text in observations), observations
    # the 1.x form, and the command ran as the slot's unprivileged user, in its workspace
    out = env.execute("id -u; pwd", "")
    assert out["returncode"] == 0 and out["output"].splitlines()[0] != "0", out
    env.cleanup()


def test_two_environments_never_share_files() -> None:
    first, second = get_environment(ENVIRONMENT), get_environment(ENVIRONMENT)
    assert first.execute({"command": "echo mine > secret.txt"})["returncode"] == 0
    probe = second.execute({"command": "cat secret.txt ../*/secret.txt /workspace/../*/secret.txt 2>&1; true"})
    assert "mine" not in probe["output"], probe
    timed = first.execute({"command": "sleep 5"}, timeout=1)
    assert timed["exception_info"] and timed["returncode"] != 0, timed
    first.cleanup()
    second.cleanup()


def test_without_the_framework_the_adapter_names_the_extra() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['minisweagent'] = None\n"
        "try:\n    import atropos.integrations.minisweagent\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip().endswith("pip install 'atropos-sandbox[mini-swe-agent]'"), done.stdout
    assert done.stdout.count("\n") == 1, done.stdout
