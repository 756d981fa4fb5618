"""The SWE-ReX Apptainer deployment, driven through SWE-ReX's own client (RemoteRuntime).

Against the apptainer stand-in (tests/bin/apptainer runs the image's command under bubblewrap;
pulls write a fake SIF) always, and against a real apptainer (marker `apptainer`) with a SIF built
from images/atropos-sandbox-airgapped.def named by ATROPOS_TEST_SIF.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

pytest.importorskip("swerex", reason="swe-rex comes with the `swerex` extra (CI installs it)")

from pydantic import ValidationError
from swerex.deployment.abstract import AbstractDeployment
from swerex.deployment.hooks.abstract import DeploymentHook
from swerex.exceptions import DeploymentNotStartedError, DeploymentStartupError
from swerex.runtime.abstract import (
    BashAction,
    Command,
    CreateBashSessionRequest,
    ReadFileRequest,
    WriteFileRequest,
)

from atropos.images import cache
from atropos.images.errors import ApptainerNotFoundError, ImageNotFoundError, ImagePullError
from atropos.integrations.swerex import (
    ApptainerDeployment,
    ApptainerDeploymentConfig,
    ApptainerDeploymentError,
    PortInUseError,
    StartupTimeoutError,
)
from tests.swerex_helpers import (
    HOST_PYTHON_PREFIX,
    cmdlines,
    deployed,
    process_tree,
    processes_with_args,
    survivors,
)

if TYPE_CHECKING:
    from atropos.images.runtime import ApptainerRuntime
    from tests.swerex_fixtures import ApptainerEnv


TESTS_DIR = str(Path(__file__).resolve().parent)

REFERENCE = "docker://registry.example.org/swe/python:3.11"
# the pulled (fake) SIF holds no Python: the deployment binds this interpreter's venv in as the
# standalone Python, and its base installation so the venv's interpreter resolves
PULLED_IMAGE_ARGS = {
    "python_standalone_dir": HOST_PYTHON_PREFIX,
    "apptainer_args": ["--bind", sys.base_prefix],
}


class Steps(DeploymentHook):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_custom_step(self, message: str) -> None:
        self.seen.append(message)


def sleeper(marker: str) -> str:
    """A command line `sleep` that is easy to find in /proc: `sleep <marker>`."""
    return f"sleep {marker}"


# ---- the configuration ----------------------------------------------------------------------------


def test_config_is_shaped_like_swerex_deployment_configs() -> None:
    config = ApptainerDeploymentConfig(image="python:3.11")
    assert config.type == "apptainer" and config.pull == "missing" and config.port is None
    assert config.apptainer_args == [] and config.remove_images is False and config.startup_timeout == 180.0
    assert config.python_standalone_dir is None and config.platform is None
    assert ApptainerDeploymentConfig.model_validate(config.model_dump()) == config
    assert isinstance(config.get_deployment(), ApptainerDeployment)
    assert isinstance(config.get_deployment(), AbstractDeployment)
    with pytest.raises(ValidationError):
        ApptainerDeploymentConfig(image="x", pull="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ApptainerDeploymentConfig(image="x", docker_args=[])  # type: ignore[call-arg]


async def test_runtime_and_is_alive_before_start_raise_not_started() -> None:
    deployment = ApptainerDeploymentConfig(image="python:3.11").get_deployment()
    with pytest.raises(DeploymentNotStartedError):
        _ = deployment.runtime
    with pytest.raises(DeploymentNotStartedError):
        await deployment.is_alive()
    await deployment.stop()  # stopping what never started is harmless


# ---- start, use through RemoteRuntime, stop ------------------------------------------------------


async def test_start_run_commands_sessions_and_files_then_stop_leaves_nothing(apptainer_env: ApptainerEnv) -> None:
    steps = Steps()
    deployment = ApptainerDeploymentConfig(image=str(apptainer_env.image), startup_timeout=60).get_deployment()
    deployment.add_hook(steps)
    await deployment.start()
    try:
        assert await deployment.is_alive()
        runtime = deployment.runtime
        assert steps.seen == ["Resolving Apptainer image", "Starting runtime"]

        done = await runtime.execute(Command(command="echo one-shot; echo $APPTAINER_CONTAINER", shell=True))
        assert done.exit_code == 0 and done.stdout.split() == ["one-shot", str(apptainer_env.image)]

        await runtime.create_session(CreateBashSessionRequest(session="agent"))
        await runtime.run_in_session(BashAction(session="agent", command="cd /tmp && export GREETING=hi"))
        seen = await runtime.run_in_session(BashAction(session="agent", command="pwd; echo $GREETING"))
        assert seen.exit_code == 0 and seen.output.split() == ["/tmp", "hi"]
        leaked = await runtime.run_in_session(BashAction(session="agent", command="env | grep -c AUTH_TOKEN || true"))
        assert leaked.output.strip() == "0"  # the agent's shell never sees the server's token

        await runtime.write_file(WriteFileRequest(path="/tmp/notes/a.txt", content="written by the agent\n"))
        read = await runtime.read_file(ReadFileRequest(path="/tmp/notes/a.txt"))
        assert read.content == "written by the agent\n"
        cat = await runtime.run_in_session(BashAction(session="agent", command="cat notes/a.txt"))
        assert cat.output.strip() == "written by the agent"

        # a background process that left the process group (SWE-ReX's shells call setsid too)
        marker = f"{os.getpid()}.{time.monotonic_ns() % 10**6}"
        await runtime.run_in_session(BashAction(session="agent", command=f"setsid {sleeper(marker)} >/dev/null 2>&1 &"))
        await _until(lambda: bool(processes_with_args("sleep", marker)))

        assert deployment.process is not None and deployment.port is not None
        tree = process_tree(deployment.process.pid)
        assert len(tree) >= 3  # apptainer, the sandbox, the server and its shells
        token = runtime._config.auth_token
        assert all(token.encode() not in line for line in cmdlines(list(tree)))  # never on a command line
        argv = apptainer_env.execs()[-1]
        assert argv[:2] == ["exec", "--containall"] and "--writable-tmpfs" in argv
        assert not any(flag.startswith(("--net", "--network")) for flag in argv)
        assert argv[argv.index("--port") + 1] == str(deployment.port)
        port = deployment.port
    finally:
        await deployment.stop()
    assert survivors(tree) == []
    assert processes_with_args("sleep", marker) == []
    assert not _listening(port)
    with pytest.raises(DeploymentNotStartedError):
        _ = deployment.runtime
    await deployment.stop()  # a second stop is harmless


async def test_commands_fail_as_results_not_as_deployment_errors(apptainer_env: ApptainerEnv) -> None:
    async with deployed(ApptainerDeploymentConfig(image=str(apptainer_env.image))) as deployment:
        failed = await deployment.runtime.execute(Command(command="echo oops >&2; exit 7", shell=True))
        assert failed.exit_code == 7 and "oops" in failed.stderr
        assert await deployment.is_alive()


async def test_a_chosen_port_is_used(apptainer_env: ApptainerEnv) -> None:
    port = _free_port()
    async with deployed(ApptainerDeploymentConfig(image=str(apptainer_env.image), port=port)) as deployment:
        assert deployment.port == port and _listening(port)


async def test_is_alive_turns_false_when_the_server_dies(apptainer_env: ApptainerEnv) -> None:
    async with deployed(ApptainerDeploymentConfig(image=str(apptainer_env.image))) as deployment:
        assert deployment.process is not None
        deployment.process.kill()
        deployment.process.wait()
        alive = await deployment.is_alive()
        assert not alive and "exited with status" in alive.message


# ---- clear errors --------------------------------------------------------------------------------


def _fake_python(root: Path, body: str) -> Path:
    """A `python_standalone_dir` whose python3 is a shell script."""
    bindir = root / "bin"
    bindir.mkdir(parents=True)
    script = bindir / "python3"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return root


async def test_a_server_that_exits_fails_fast_with_its_output(apptainer_env: ApptainerEnv) -> None:
    body = "echo \"ModuleNotFoundError: No module named 'swerex'\" >&2; exit 3"
    standalone = _fake_python(apptainer_env.tmp / "py", body)
    config = ApptainerDeploymentConfig(image=str(apptainer_env.image), python_standalone_dir=str(standalone))
    deployment = config.get_deployment()
    started = time.monotonic()
    with pytest.raises(ApptainerDeploymentError) as caught:
        await deployment.start()
    assert time.monotonic() - started < 30  # not the 180 s startup timeout
    message = str(caught.value)
    assert "exited with status 3" in message and "No module named 'swerex'" in message
    assert "python_standalone_dir" in message  # the hint: what to do about it
    assert isinstance(caught.value, DeploymentStartupError)
    with pytest.raises(DeploymentNotStartedError):
        _ = deployment.runtime


async def test_startup_timeout_says_so_and_ends_the_process_tree(apptainer_env: ApptainerEnv) -> None:
    marker = f"{os.getpid()}.{time.monotonic_ns() % 10**6}1"
    body = f'echo "starting slowly" >&2; exec {sleeper(marker)}'
    standalone = _fake_python(apptainer_env.tmp / "py", body)
    config = ApptainerDeploymentConfig(
        image=str(apptainer_env.image), python_standalone_dir=str(standalone), startup_timeout=1.5
    )
    with pytest.raises(StartupTimeoutError) as caught:
        await config.get_deployment().start()
    message = str(caught.value)
    assert "did not answer" in message and "within 2 s" in message and "starting slowly" in message
    assert isinstance(caught.value, TimeoutError)
    assert processes_with_args("sleep", marker) == []


async def test_a_busy_port_is_refused_before_anything_starts(apptainer_env: ApptainerEnv) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = ApptainerDeploymentConfig(image=str(apptainer_env.image), port=port)
        with pytest.raises(PortInUseError, match=f"port {port} is already in use"):
            await config.get_deployment().start()
    assert apptainer_env.execs() == []


async def test_no_apptainer_on_path(apptainer_env: ApptainerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(apptainer_env.tmp / "empty"))
    with pytest.raises(ApptainerNotFoundError, match="neither apptainer nor singularity"):
        await ApptainerDeploymentConfig(image=str(apptainer_env.image)).get_deployment().start()


async def test_a_missing_sif_path(apptainer_env: ApptainerEnv) -> None:
    missing = apptainer_env.tmp / "nowhere" / "image.sif"
    with pytest.raises(ImageNotFoundError, match="does not exist"):
        await ApptainerDeploymentConfig(image=str(missing)).get_deployment().start()
    assert apptainer_env.pulls() == [] and apptainer_env.execs() == []


async def test_a_standalone_dir_without_python(apptainer_env: ApptainerEnv) -> None:
    empty = apptainer_env.tmp / "empty-python"
    empty.mkdir()
    config = ApptainerDeploymentConfig(image=str(apptainer_env.image), python_standalone_dir=str(empty))
    with pytest.raises(ApptainerDeploymentError, match="holds no Python"):
        await config.get_deployment().start()
    assert apptainer_env.execs() == []


# ---- pull policies and remove_images ---------------------------------------------------------------


async def test_never_with_the_image_missing_fails_clearly_without_pulling(apptainer_env: ApptainerEnv) -> None:
    config = ApptainerDeploymentConfig(image=REFERENCE, pull="never", **PULLED_IMAGE_ARGS)
    with pytest.raises(ImageNotFoundError, match="pull policy is 'never'"):
        await config.get_deployment().start()
    assert apptainer_env.pulls() == [] and apptainer_env.execs() == []


async def test_missing_pulls_once_then_runs_from_the_cache(apptainer_env: ApptainerEnv) -> None:
    steps = Steps()
    first = ApptainerDeploymentConfig(image=REFERENCE, pull="missing", **PULLED_IMAGE_ARGS).get_deployment()
    first.add_hook(steps)
    await first.start()
    try:
        sif = first.sif
        assert sif is not None and sif.parent == apptainer_env.cache and sif.is_file()
        assert "Pulling container image" in steps.seen
        where = await first.runtime.execute(Command(command="echo $APPTAINER_CONTAINER", shell=True))
        assert where.stdout.strip() == str(sif)  # the server runs from the pulled SIF
        probe = Path(HOST_PYTHON_PREFIX) / f"agent-was-here-{os.getpid()}"
        touched = await first.runtime.execute(Command(command=["touch", str(probe)]))
        assert touched.exit_code != 0 and not probe.exists()  # the standalone Python is bound read-only
    finally:
        await first.stop()
    assert [call[:2] for call in apptainer_env.pulls()] == [["pull", REFERENCE]]
    for policy in ("missing", "never"):
        config = ApptainerDeploymentConfig(image=REFERENCE, pull=policy, **PULLED_IMAGE_ARGS)
        async with deployed(config) as again:
            assert again.sif == sif
    assert len(apptainer_env.pulls()) == 1  # neither pulled again


async def test_always_pulls_again(apptainer_env: ApptainerEnv) -> None:
    async with deployed(ApptainerDeploymentConfig(image=REFERENCE, **PULLED_IMAGE_ARGS)) as first:
        assert first.sif is not None
        inode = first.sif.stat().st_ino
    async with deployed(ApptainerDeploymentConfig(image=REFERENCE, pull="always", **PULLED_IMAGE_ARGS)) as second:
        assert second.sif == first.sif and second.sif.stat().st_ino != inode
    assert [call[0] for call in apptainer_env.pulls()] == ["pull", "pull"]


async def test_remove_images_removes_only_what_this_deployment_pulled(apptainer_env: ApptainerEnv) -> None:
    config = ApptainerDeploymentConfig(image=REFERENCE, remove_images=True, **PULLED_IMAGE_ARGS)
    puller, reuser = config.get_deployment(), config.get_deployment()
    await puller.start()
    try:
        await reuser.start()  # found the SIF in the cache: not its to remove
        assert reuser.sif == puller.sif and puller.sif is not None
        await reuser.stop()
        assert puller.sif.is_file() and await puller.is_alive()
    finally:
        await reuser.stop()
        sif = puller.sif
        await puller.stop()
    assert sif is not None and not sif.exists()
    assert len(apptainer_env.pulls()) == 1
    async with deployed(config) as later:  # the next one pulls it again, and so removes it again
        assert later.sif == sif and sif.is_file()
    assert not sif.exists() and len(apptainer_env.pulls()) == 2
    # a SIF given as a path is never removed
    async with deployed(ApptainerDeploymentConfig(image=str(apptainer_env.image), remove_images=True)):
        pass
    assert apptainer_env.image.is_file()


async def test_platform_becomes_arch_options_and_its_own_cache_dir(
    apptainer_env: ApptainerEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a runtime that records its argv and fails the pull: enough to see what was asked for
    bindir = apptainer_env.tmp / "recording-bin"
    bindir.mkdir()
    argv_log = apptainer_env.tmp / "argv.log"
    recorder = bindir / "apptainer"
    recorder.write_text(
        f'#!/bin/sh\nif [ "$1" = --version ]; then echo "apptainer version 1.3.0"; exit 0; fi\n'
        f'echo "$@" >> {argv_log}\necho "FATAL: no network here" >&2\nexit 255\n'
    )
    recorder.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    config = ApptainerDeploymentConfig(image="python:3.11", platform="linux/arm/v7", **PULLED_IMAGE_ARGS)
    with pytest.raises(ImagePullError, match="no network here"):
        await config.get_deployment().start()
    words = argv_log.read_text().split()
    assert words[:5] == ["pull", "--arch", "arm", "--arch-variant", "7"]
    assert Path(words[5]).parent == apptainer_env.cache / "platform-linux_arm_v7"
    assert words[6] == "docker://python:3.11"
    with pytest.raises(ValidationError, match="platform must look like"):
        ApptainerDeploymentConfig(image="python:3.11", platform="arm64")


async def _until(condition: object, timeout: float = 10.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ---- a real apptainer ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_sif(real_runtime: ApptainerRuntime) -> Path:
    """The SIF named by ATROPOS_TEST_SIF, checked to have swe-rex in its Python."""
    given = os.environ.get("ATROPOS_TEST_SIF")
    if not given or not Path(given).is_file():
        pytest.skip("set ATROPOS_TEST_SIF to a SIF built by `scripts/build-sif.sh --from airgapped` (it has swe-rex)")
    probe = [real_runtime.binary, "exec", "--containall", given, "python3", "-c", "import swerex.server"]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        pytest.skip(f"{given} has no swe-rex (built before the definition installed it): {done.stderr[-300:]}")
    return Path(given)


@pytest.fixture
def real_env(real_runtime: ApptainerRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The real runtime first on PATH (no stand-in), and a private SIF cache; returns the cache."""
    entries = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if not entry.startswith(TESTS_DIR)]
    monkeypatch.setenv("PATH", os.pathsep.join([os.path.dirname(real_runtime.binary), *entries]))
    monkeypatch.setenv("ATROPOS_SIF_CACHE", str(tmp_path / "sif-cache"))
    monkeypatch.delenv("ATROPOS_APPTAINER", raising=False)
    monkeypatch.setattr(cache, "_pulled", set())
    return tmp_path / "sif-cache"


@pytest.mark.apptainer
@pytest.mark.timeout(900)
async def test_real_apptainer_runs_swerex_from_the_sif(real_sif: Path, real_env: Path, figures: list[str]) -> None:
    deployment = ApptainerDeploymentConfig(image=str(real_sif), startup_timeout=300).get_deployment()
    started = time.monotonic()
    await deployment.start()
    try:
        figures.append(f"SWE-ReX deployment from {real_sif.name} answered in {time.monotonic() - started:.1f} s")
        runtime = deployment.runtime
        done = await runtime.execute(Command(command="cat /etc/debian_version; echo $APPTAINER_CONTAINER", shell=True))
        assert done.exit_code == 0 and done.stdout.split()[1] == str(real_sif), done
        await runtime.create_session(CreateBashSessionRequest())
        await runtime.run_in_session(BashAction(command="mkdir -p /swe_repo && cd /swe_repo && export GREETING=hi"))
        seen = await runtime.run_in_session(BashAction(command="pwd; echo $GREETING; env | grep -c AUTH_TOKEN || true"))
        assert seen.output.split() == ["/swe_repo", "hi", "0"], seen
        # the SIF is read-only; --writable-tmpfs lets the agent change the repository anywhere
        await runtime.write_file(WriteFileRequest(path="/swe_repo/patch.py", content="print('patched')\n"))
        assert (await runtime.read_file(ReadFileRequest(path="/swe_repo/patch.py"))).content == "print('patched')\n"
        ran = await runtime.run_in_session(BashAction(command="python3 patch.py"))
        assert ran.output.strip() == "patched"
        marker = f"{os.getpid()}.{time.monotonic_ns() % 10**6}"
        await runtime.run_in_session(BashAction(command=f"setsid {sleeper(marker)} >/dev/null 2>&1 &"))
        await _until(lambda: bool(processes_with_args("sleep", marker)))
        assert deployment.process is not None and deployment.port is not None
        tree = process_tree(deployment.process.pid)
        assert all(runtime._config.auth_token.encode() not in line for line in cmdlines(list(tree)))
        port = deployment.port
    finally:
        stopping = time.monotonic()
        await deployment.stop()
        figures.append(f"SWE-ReX deployment stopped in {time.monotonic() - stopping:.1f} s")
    assert survivors(tree) == []
    assert processes_with_args("sleep", marker) == []
    assert not _listening(port)


@pytest.mark.apptainer
@pytest.mark.timeout(900)
async def test_real_apptainer_pulls_per_policy_and_removes_what_it_pulled(
    real_sif: Path, real_env: Path, figures: list[str]
) -> None:
    with _serving(real_sif.parent) as base:  # a real `apptainer pull` of http://, no registry needed
        reference = f"{base}/{real_sif.name}"
        never = ApptainerDeploymentConfig(image=reference, pull="never")
        with pytest.raises(ImageNotFoundError, match="pull policy is 'never'"):
            await never.get_deployment().start()
        config = ApptainerDeploymentConfig(image=reference, remove_images=True, startup_timeout=300)
        puller, reuser = config.get_deployment(), config.get_deployment()
        started = time.monotonic()
        await puller.start()
        try:
            figures.append(f"pulled {real_sif.name} over http and answered in {time.monotonic() - started:.1f} s")
            assert puller.sif is not None and puller.sif.parent == real_env and puller.sif.is_file()
            done = await puller.runtime.execute(Command(command="echo $APPTAINER_CONTAINER", shell=True))
            assert done.stdout.strip() == str(puller.sif)
            await reuser.start()
            assert reuser.sif == puller.sif
            await reuser.stop()
            assert puller.sif.is_file()  # the reuser did not pull it, so it does not remove it
        finally:
            await reuser.stop()
            sif = puller.sif
            await puller.stop()
        assert sif is not None and not sif.exists()
    assert real_sif.is_file()


@contextmanager
def _serving(directory: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("token", ["-starts-with-a-dash", "--looks-like-an-option", "plain_token"])
def test_bootstrap_hands_any_token_to_swerex_server(token: str) -> None:
    # token_urlsafe gives a leading '-' one time in 64: argparse must still read it as the token
    from atropos.integrations.swerex import server_process as ours

    probe = (
        "import uvicorn, swerex.server as s; "
        "uvicorn.run = lambda app, **kw: print('TOKEN=' + s.AUTH_TOKEN, 'PORT=' + str(kw['port'])); "
        f"exec({ours.BOOTSTRAP!r})"
    )
    env = {**os.environ, ours.TOKEN_VAR: token}
    done = subprocess.run(
        [sys.executable, "-c", probe, "--port", "4321"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"TOKEN={token}", "PORT=4321"]


async def test_the_callers_terminal_does_not_reach_the_agents_shells(
    apptainer_env: ApptainerEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    # started from a login node's terminal: apptainer would pass TERM through --containall
    monkeypatch.setenv("TERM", "xterm-256color")
    async with deployed(ApptainerDeploymentConfig(image=str(apptainer_env.image))) as deployment:
        runtime = deployment.runtime
        await runtime.create_session(CreateBashSessionRequest(session="term"))
        seen = await runtime.run_in_session(BashAction(session="term", command="echo term=${TERM:-unset}"))
    # what SWE-ReX's Docker deployment gives: its own default, never the caller's terminal
    assert seen.output.strip() in ("term=unset", "term=dumb"), repr(seen.output)


async def test_start_failures_are_swerex_startup_errors(
    apptainer_env: ApptainerEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = ApptainerDeploymentConfig(image=str(apptainer_env.tmp / "nowhere.sif"))
    uncached = ApptainerDeploymentConfig(image=REFERENCE, pull="never", **PULLED_IMAGE_ARGS)
    for config in (missing, uncached):
        with pytest.raises(DeploymentStartupError):
            await config.get_deployment().start()
    monkeypatch.setenv("PATH", str(apptainer_env.tmp / "empty"))
    with pytest.raises(DeploymentStartupError, match="neither apptainer nor singularity"):
        await missing.get_deployment().start()
