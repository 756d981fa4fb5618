"""Against a real Apptainer: build the air-gapped SIF, run the server from it, run a command in a slot.

Skipped (marker `apptainer`) when no real apptainer/singularity is on PATH. Building needs
debootstrap and network access to a Debian mirror and to PyPI (for the wheelhouse); set
ATROPOS_TEST_SIF=/path/to/atropos-sandbox.sif to reuse an image built earlier instead, and
ATROPOS_TEST_SIF_BUILD_FLAGS (e.g. `--fakeroot`) to add options to scripts/build-sif.sh (root in a
container without every capability needs `--fakeroot`). Figures (build time, SIF size, health)
are printed in the terminal summary.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from atropos.images.apptainer import (
    apptainer_secret_env,
    build_apptainer_exec_argv,
)
from atropos.images.staging import is_sif
from atropos.sandbox.settings import TOKEN_ENV, ServerSettings
from atropos.units import format_size
from tests.server_process import wait_ready

if TYPE_CHECKING:
    from atropos.images.runtime import ApptainerRuntime

pytestmark = [pytest.mark.apptainer, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def airgapped_sif(real_runtime: ApptainerRuntime, tmp_path_factory: pytest.TempPathFactory, figures: list[str]) -> Path:
    given = os.environ.get("ATROPOS_TEST_SIF")
    if given:
        return Path(given)
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed: cannot build the air-gapped image")
    out = tmp_path_factory.mktemp("sif") / "atropos-sandbox.sif"
    command = [str(REPO / "scripts" / "build-sif.sh"), "--from", "airgapped", "-o", str(out)]
    command += os.environ.get("ATROPOS_TEST_SIF_BUILD_FLAGS", "").split()
    if os.geteuid() != 0 and "--fakeroot" not in command:
        command.append("--fakeroot")
    env = {**os.environ, "APPTAINER": real_runtime.binary}
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-4000:]
    figures.append(f"{real_runtime.describe()}: built {out.name} from the air-gapped definition "
                    f"in {seconds:.0f} s, {format_size(out.stat().st_size)} ({out.stat().st_size} bytes)")  # fmt: skip
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def sif_server(
    real_runtime: ApptainerRuntime, airgapped_sif: Path, tmp_path: Path, figures: list[str]
) -> Iterator[tuple[str, str, subprocess.Popen[str]]]:
    # as a user runs it: apptainer as root would make the server root in the container (with whatever
    # capabilities apptainer.conf grants root); as root here, it runs as nobody, as the pool's launcher does
    as_nobody = os.geteuid() == 0
    if as_nobody:
        tmp_path = Path(tempfile.mkdtemp(prefix="atropos-sif-test-"))
        os.chmod(tmp_path, 0o711)
    data = tmp_path / "data"
    work = tmp_path / "work"
    data.mkdir()
    work.mkdir()
    if as_nobody:
        for d in (data, work):
            os.chown(d, 65534, 65534)
    token = secrets.token_urlsafe(24)
    argv = build_apptainer_exec_argv(
        real_runtime.binary,
        str(airgapped_sif),
        binds=[(str(data), "/data")],
        workdir=str(work),
        server_args=ServerSettings(host="127.0.0.1", port=free_port(), slots=2, data_dir="/data").to_args(),
    )
    env = {**os.environ, **apptainer_secret_env(real_runtime.binary, {TOKEN_ENV: token})}
    env.pop(TOKEN_ENV, None)
    if as_nobody:
        argv = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--", *argv]
    started = time.monotonic()
    pipe = subprocess.PIPE
    with subprocess.Popen(argv, env=env, stdout=pipe, stderr=pipe, text=True, start_new_session=True) as proc:
        try:
            url = wait_ready(proc, "the server in the SIF", timeout=300)
            figures.append(f"server in the SIF ready in {time.monotonic() - started:.1f} s at {url}")
            yield url, token, proc
        finally:
            # apptainer forwards SIGTERM; its PID-namespace init then ends everything inside
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_real_runtime_reports_a_version(real_runtime: ApptainerRuntime) -> None:
    major = real_runtime.version.split(".")[0]
    assert major.isdigit() and int(major) >= 1, real_runtime.describe()


def test_airgapped_sif_is_a_sif(airgapped_sif: Path) -> None:
    assert is_sif(airgapped_sif)


def test_server_from_the_sif_runs_a_command_in_a_slot(
    sif_server: tuple[str, str, subprocess.Popen[str]], figures: list[str]
) -> None:
    url, token, proc = sif_server
    with open(f"/proc/{proc.pid}/cmdline", "rb") as handle:
        assert token.encode() not in handle.read()  # the token is never on the command line
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["slots"] == 2
        figures.append(f"health from the SIF: {health}")
        body = {"slot": 1, "tool": "bash", "args": {"command": "echo hello-from-sif; cat /etc/debian_version"}}
        result = client.post("/execute", json=body).json()
        assert result["ok"], result
        assert "hello-from-sif" in result["output"]
        denied = httpx.get(f"{url}/health", timeout=30)
        assert denied.status_code == 200  # /health needs no token; everything else does
        assert httpx.post(f"{url}/execute", json=body, timeout=30).status_code == 401
