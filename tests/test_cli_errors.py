"""Bad input on the command line ends in one line naming the problem, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "atropos.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        ("file", "it is a file, not a directory"),
        ("under-proc", "No such file or directory"),
    ],
)
def test_server_data_dir_that_cannot_be_one(tmp_path: str, make: str, expect: str) -> None:
    if make == "file":
        path = os.path.join(str(tmp_path), "a-file")
        open(path, "w").close()
    else:
        path = "/proc/atropos-no-such-dir"
    proc = run_cli("server", "--port", "0", "--data-dir", path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"atropos-sandbox server: error: --data-dir {path}: cannot use it as the data dir: {expect}"
    )


def test_image_pull_of_something_that_is_no_reference() -> None:
    proc = run_cli("image", "pull", "not a ref!!")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (
        "atropos-sandbox image: error: 'not a ref!!' is not an image reference (e.g. docker://python:3.11)"
    )


def test_cleanup_of_nomad_without_an_agent_is_one_line() -> None:
    import socket

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = run_cli("cleanup", "--nomad", "--nomad-address", f"http://127.0.0.1:{port}")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"atropos-sandbox cleanup: error: no Nomad agent answers at http://127.0.0.1:{port} (--nomad-address)"
    )


def test_cleanup_dry_run_says_would_be_removed(tmp_path: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "atropos.cli", "cleanup", "--local", "--dry-run"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "ATROPOS_SANDBOX_STATE_DIR": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "local: 0 server(s) of dead pools would be removed"


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        (["--slots", "-3"], "--slots: Input should be greater than or equal to 1"),
        (["--count", "0"], "--count 0: a rendered job needs at least one container"),
        (["--driver", "singularity", "--singularity-image", "images/x.sif"], "images/x.sif: a relative path"),
        (["--driver", "singularity"], "needs singularity_image (--singularity-image"),
        (["--backend", "slurm", "--driver", "docker"], "--backend slurm runs drivers process and singularity"),
        (["--backend", "slurm", "--slots", "0"], "--slots: Input should be greater than or equal to 1"),
        (["--backend", "slurm", "--cpus-per-server", "0"], "--cpus-per-server: Input should be greater than or"),
        (["--backend", "slurm", "--driver", "singularity", "--sif", "x.sif"], "x.sif: a relative path"),
        (["--backend", "slurm", "--driver", "singularity"], "--driver singularity needs --singularity-image"),
    ],
)
def test_job_render_names_the_flag_that_is_wrong(flags: list[str], expect: str) -> None:
    base = [] if "--driver" in flags else ["--driver", "process"]
    proc = run_cli("job", "render", *base, *flags)
    assert proc.returncode == 2 and expect in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


def test_job_render_for_slurm_prints_the_script_and_its_sbatch_command(tmp_path: str) -> None:
    flags = ["--partition", "cpu", "--time", "4:00:00", "--mem", "8G", "--sbatch-arg=--exclusive", "--slots", "3"]
    proc = run_cli("job", "render", "--backend", "slurm", "--driver", "process", "--pool-dir", str(tmp_path), *flags)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "#!/bin/sh" and lines[-1].startswith("exec ") and "--slots 3" in lines[-1], proc.stdout
    job = os.path.join(str(tmp_path), "slurm-1")
    assert (
        f"#   sbatch --parsable --job-name=atropos-sandbox --output={job}/server.out --chdir={job} --partition=cpu "
        f"--time=4:00:00 --mem=8G --exclusive {job}/job.sh" in lines
    ), proc.stdout
    assert "--comment" not in proc.stdout  # a job submitted by hand has no owner pool to outlive
    assert f"--token-file {job}/token" in lines[-1] and "openssl rand" in proc.stderr


def test_a_command_line_imports_only_the_command_it_names() -> None:
    """`atropos-sandbox server` (every container and job) pays for the server's imports alone; each
    command still parses (its module registers it); without a command, all are listed."""
    modules = {
        "server": "atropos.sandbox.server.main",
        "bench": "atropos.bench.cli",
        "demo": "atropos.demo",
        "image": "atropos.images.cli",
        "job": "atropos.backends.job_cli",
    }
    probe = "import sys; from atropos import cli; cli.build_parser(sys.argv[1:]); print(*sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe, "server"], capture_output=True, text=True, check=True)
    assert [m for m in modules.values() if m in loaded.stdout.split()] == [modules["server"]], loaded.stdout
    for command in ("server", "status", "job", "image", "demo", "bench", "cleanup"):
        assert run_cli(command, "--help").returncode == 0, command
    listed = run_cli("--help").stdout
    assert all(command in listed for command in ("server", "status", "job", "image", "demo", "bench", "cleanup"))
