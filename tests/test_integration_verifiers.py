"""The verifiers adapter, through verifiers' own agent: `verifiers.v1.Agent.run(task, runtime=
SlotRuntime(...))` with its bash harness, whose chat program runs inside the slot and calls back to
verifiers' interception server through the slot's bridge (tests/verifiers_rollout.py, run with
.venv-verifiers' Python: `scripts/verifiers-venv.sh` makes it, and fetches the wheels the chat
program needs into .cache/slot-wheels, which the task image here carries: no test reaches the
internet). Skipped with the reason where that virtualenv, those wheels or the Docker engine are
missing, except where $ATROPOS_REQUIRE_VERIFIERS=1 (CI): there that fails."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.attacks import file_probe, leaks, node_uids
from tests.images_fixtures import BASE_IMAGE, docker_unready

ROOT = Path(__file__).parent.parent
PYTHON = os.environ.get("ATROPOS_VERIFIERS_PYTHON_ENV") or str(ROOT / ".venv-verifiers" / "bin" / "python")
WHEELS = ROOT / ".cache" / "slot-wheels"
FIXTURES = ROOT / ".cache" / "verifiers-fixtures"  # verifiers' own, from its sdist
REQUIRED = os.environ.get("ATROPOS_REQUIRE_VERIFIERS") == "1"
_MARK = "atropos-verifiers-probe"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A task image with uv and the chat program's wheels (a PyPI of its own for uv), as an archive."""
    missing = docker_unready() or (None if os.access(PYTHON, os.X_OK) else f"no verifiers virtualenv at {PYTHON}")
    if missing is None and not any(WHEELS.glob("uv-*.whl")):
        missing = f"no wheels for slots in {WHEELS} (scripts/verifiers-venv.sh fetches them)"
    if missing is None and not (FIXTURES / "echo_tool_v1.py").is_file():
        missing = f"no verifiers fixtures in {FIXTURES} (scripts/verifiers-venv.sh fetches them)"
    if missing is not None:
        if REQUIRED:
            pytest.fail(f"ATROPOS_REQUIRE_VERIFIERS=1 but {missing}")
        pytest.skip(missing)
    context = tmp_path_factory.mktemp("vf-image")
    subprocess.run(["cp", "-r", str(WHEELS), str(context / "wheels")], check=True)
    (context / "Dockerfile").write_text(
        f"FROM {BASE_IMAGE}\n"
        "COPY wheels /opt/wheels\n"
        "RUN python3 -m venv /opt/uv && /opt/uv/bin/python -m pip install -q --no-index --find-links /opt/wheels uv"
        " && ln -s /opt/uv/bin/uv /usr/local/bin/uv\n"
        # the wheels found by link; the default index, PyPI, replaced by a directory that is none
        "ENV UV_FIND_LINKS=/opt/wheels UV_DEFAULT_INDEX=file:///opt/wheels UV_PYTHON_DOWNLOADS=never\n"
    )
    tag = f"atropos-test-verifiers:{os.getpid()}"
    subprocess.run(["docker", "build", "--pull=false", "-q", "-t", tag, str(context)], check=True, capture_output=True)
    # outside pytest's own 0700 tree: the pool's server drops root to run the slots, and reads it
    out = Path(tempfile.mkdtemp(prefix="atropos-test-vf-"))
    archive = out / "task.tar"
    try:
        subprocess.run(["docker", "save", "-o", str(archive), tag], check=True, capture_output=True)
        out.chmod(0o755)
        archive.chmod(0o644)
        yield f"docker-archive:{archive}"
    finally:
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True)


def _rollouts(tmp_path: Path, image: str, rollouts: list[dict[str, str]]) -> dict[str, dict[str, object]]:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"image": image, "rollouts": rollouts, "fixtures": str(FIXTURES)}))
    done = subprocess.run(
        [PYTHON, str(ROOT / "tests" / "verifiers_rollout.py"), str(spec)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {str(r["name"]): r for r in results}


def test_verifiers_rollouts_run_in_slots_scoring_a_right_answer_1_a_wrong_one_0_and_its_tool_fixture_1(
    tmp_path: Path, image: str
) -> None:
    secret = secrets.token_hex(12)
    # while `right` holds a secret in its workspace, `wrong` looks for it everywhere a slot might
    # see another's files; `right`'s marked sleep shows the node its processes' uid
    right = f"printf 42 > answer.txt; echo {secret} > mine.txt; (exec -a {_MARK} sleep 4); id -u"
    probe = file_probe(["/workspace/../*/mine.txt", "/proc/[0-9]*/cwd/mine.txt", "/proc/[0-9]*/root/*/mine.txt",
                        "/tmp/*/mine.txt", "/data/slots/*/mine.txt"], secret)  # fmt: skip
    wrong = f"printf 41 > answer.txt; sleep 2; {probe}; echo probed"
    with node_uids(_MARK) as uids:
        results = _rollouts(
            tmp_path,
            image,
            [
                {"name": "right", "command": right, "file": "answer.txt", "expect": "42"},
                {"name": "wrong", "command": wrong, "file": "answer.txt", "expect": "42"},
            ],
        )
    assert {name: r["errors"] for name, r in results.items()} == {"right": [], "wrong": [], "echo_tool": []}, results
    assert (results["right"]["reward"], results["wrong"]["reward"]) == (1.0, 0.0), results
    # verifiers' own fixture: its MCP tool server on this machine, called from the slot, scored by its reward
    assert results["echo_tool"]["reward"] == 1.0, results["echo_tool"]
    right_out, wrong_out = (str(results[n]["tool_outputs"]) for n in ("right", "wrong"))
    assert "probed" in wrong_out and leaks("\n".join(map(str, results["wrong"]["tool_outputs"]))) == []
    assert secret not in wrong_out
    assert uids and 0 not in uids, uids  # the node saw the agent's command, never as root
    assert "0\n" not in results["right"]["tool_outputs"], right_out  # nor root inside the slot
    assert results["right"]["runtime"] != results["wrong"]["runtime"]
    assert str(results["right"]["runtime"]).startswith("atropos:"), results


def test_without_verifiers_the_adapter_says_which_extra_to_install() -> None:
    code = "import sys; sys.modules['verifiers'] = None; import atropos.integrations.verifiers"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0
    assert last.startswith("ImportError: verifiers is not installed (verifiers"), last
    assert last.endswith("): pip install 'atropos-sandbox[verifiers]'"), last
