"""HCL2 rendering: valid, round-trips to the same job, and (with a real agent) means the same to Nomad.
The rendered examples under nomad/jobs/ are checked against the current builder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from atropos.cli import main as cli_main
from atropos.nomad import SandboxJobSpec, create_sandbox_job
from atropos.nomad.hcl import HclError, format_duration, parse_duration, render_job_hcl
from tests.hcl_reader import parse_job_hcl
from tests.nomad_fixtures import REPO, TOKEN, RealAgent, job_shapes, shape_id

EXAMPLES = {
    "sandbox-singularity": ["--driver", "singularity", "--sif", "/shared/images/atropos-sandbox.sif"],
    "sandbox-docker": ["--driver", "docker"],
    "sandbox-process": ["--driver", "process"],
}


@pytest.mark.parametrize("spec", job_shapes(), ids=shape_id)
def test_hcl_round_trips_to_the_same_job(spec: SandboxJobSpec) -> None:
    job = create_sandbox_job(spec).to_json()
    assert parse_job_hcl(render_job_hcl(job)) == job


def test_strings_survive_hcl_quoting() -> None:
    tricky = 'quote " backslash \\ newline \n tab \t template %{ if } ref ${NOMAD_ALLOC_DIR} dollar $HOME'
    spec = SandboxJobSpec(token=TOKEN, meta={"note": tricky}, server_env={"X": tricky})
    job = create_sandbox_job(spec).to_json()
    text = render_job_hcl(job)
    assert "%%{ if }" in text  # HCL's template directive escaped
    assert parse_job_hcl(text) == job


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"),
        (5 * 10**9, "5s"),
        (300 * 10**9, "5m"),
        (3600 * 10**9, "1h"),
        (250 * 10**6, "250ms"),
        (1500, "1500ns"),
        (90 * 10**9, "90s"),
    ],
)
def test_durations_render_in_their_largest_exact_unit(ns: int, text: str) -> None:
    assert format_duration(ns) == text
    assert parse_duration(text) == ns


def test_go_duration_strings_parse() -> None:
    assert parse_duration("1h30m") == 5400 * 10**9
    assert parse_duration("1.5s") == 1_500_000_000
    with pytest.raises(HclError):
        parse_duration("soon")


def test_unknown_keys_cannot_be_rendered() -> None:
    job = create_sandbox_job(SandboxJobSpec(token=TOKEN)).to_json()
    job["TaskGroups"][0]["Affinities"] = []
    with pytest.raises(HclError, match="Affinities"):
        render_job_hcl(job)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("fmt", ["hcl", "json"])
def test_rendered_examples_are_in_sync(name: str, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["job", "render", *EXAMPLES[name], "--count", "2", "--format", fmt]
    assert cli_main(argv) == 0
    path = os.path.join(REPO, "nomad", "jobs", f"{name}.{fmt}")
    with open(path, encoding="utf-8") as f:
        assert capsys.readouterr().out == f.read(), (
            f"{path} is stale: regenerate with `atropos-sandbox {' '.join(argv)} > {path}`"
        )


def test_render_refuses_an_incomplete_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["job", "render", "--driver", "singularity"]) == 2
    assert "needs singularity_image" in capsys.readouterr().err


@pytest.mark.nomad
@pytest.mark.parametrize("spec", job_shapes(), ids=shape_id)
def test_real_nomad_reads_the_hcl_as_the_same_job(spec: SandboxJobSpec, real_agent: RealAgent) -> None:
    job = create_sandbox_job(spec).to_json()
    response = httpx.post(real_agent.address + "/v1/jobs/parse", json={"JobHCL": render_job_hcl(job)})
    assert response.status_code == 200, response.text
    assert _differences(job, response.json()) == []


@pytest.mark.nomad
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_real_nomad_validates_the_examples(name: str, real_agent: RealAgent) -> None:
    with open(os.path.join(REPO, "nomad", "jobs", f"{name}.json"), encoding="utf-8") as f:
        body = json.load(f)
    response = httpx.post(real_agent.address + "/v1/validate/job", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["ValidationErrors"] in (None, []), response.json()


@pytest.mark.nomad
@pytest.mark.parametrize("config", ["nomad-singularity.hcl", "nomad-docker.hcl"])
def test_real_nomad_accepts_the_agent_configs(config: str, tmp_path: Path) -> None:
    binary = shutil.which("nomad") or os.environ.get("ATROPOS_NOMAD_BINARY")
    if not binary:
        pytest.skip("no `nomad` binary on PATH")
    extra = tmp_path / "data-dir.hcl"
    extra.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    result = subprocess.run(
        [binary, "config", "validate", os.path.join(REPO, "nomad", config), str(extra)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _differences(ours: object, theirs: object, path: str = "") -> list[str]:
    """Where `theirs` (Nomad's fully populated job) disagrees with what we sent."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            return [f"{path}: {theirs!r} is not an object"]
        return [
            d
            for k, v in ours.items()
            for d in (_differences(v, theirs[k], f"{path}.{k}") if k in theirs else [f"{path}.{k} missing"])
        ]
    if isinstance(ours, list):
        if not isinstance(theirs, list) or len(ours) != len(theirs):
            return [f"{path}: {theirs!r} instead of {ours!r}"]
        pairs = enumerate(zip(ours, theirs, strict=True))
        return [d for i, (a, b) in pairs for d in _differences(a, b, f"{path}[{i}]")]
    return [] if ours == theirs else [f"{path}: {theirs!r} instead of {ours!r}"]


def test_the_nomad_folder_does_not_shadow_python_nomad() -> None:
    # nomad/ (agent configs and rendered jobs) has no __init__.py: a namespace portion, which loses
    # to the installed python-nomad package even where the repository root comes first on sys.path
    assert os.path.isdir(os.path.join(REPO, "nomad")) and not os.path.exists(os.path.join(REPO, "nomad", "__init__.py"))
    done = subprocess.run(
        [sys.executable, "-c", "import nomad, sys; print(nomad.__file__); print(hasattr(nomad, 'Nomad'))"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    where, has_client = done.stdout.split()
    assert has_client == "True" and not where.startswith(os.path.join(REPO, "nomad")), done.stdout
