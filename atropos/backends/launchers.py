"""How the local backend starts one server of each driver: its command line, environment and URL.

The token travels in the environment, never in argv. Started as root, every launcher makes sure
no slot runs as root: the `process` server gives root up itself (`--run-as`), `apptainer` is run
unprivileged (`setpriv`), and the docker container gives root up once its sandboxes exist.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys

from atropos.backends.base import ServerSpec
from atropos.drivers import DockerDriver, DriverConfig, ProcessDriver, SingularityDriver
from atropos.errors import BackendError
from atropos.images.apptainer import CONTAINER_DATA_DIR, apptainer_secret_env, build_apptainer_exec_argv
from atropos.images.docker_security import docker_run_options, volume
from atropos.progress import Progress
from atropos.sandbox.server.privileges import Identity, PrivilegeError, resolve_identity
from atropos.sandbox.settings import TOKEN_ENV, TUN_DEVICE

Command = tuple[list[str], dict[str, str]]


class Launcher:
    """One driver's way of starting a server on this machine."""

    container_name: bool = False
    """The server runs in a named container (`docker`), which stopping the process does not stop."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.run_as = spec.run_as if os.geteuid() == 0 else None

    async def prepare(self, progress: Progress) -> None:
        """Once, before the first server: find binaries, resolve images."""

    def hand_over(self, workdir: str, data_dir: str) -> None:
        """Give the server's user what it needs of the pool's work dir (nothing unless it changes user)."""

    def command(self, name: str, data_dir: str, token: str) -> Command:
        """argv and environment of the server called `name`, keeping its data in `data_dir`."""
        raise NotImplementedError

    async def url(self, name: str, reported: str) -> str:
        """Where the pool reaches the server that reported `reported` as its address."""
        return reported

    @staticmethod
    def environment(token: str, secret: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        return {**env, **(secret if secret is not None else {TOKEN_ENV: token})}


class ProcessLauncher(Launcher):
    def command(self, name: str, data_dir: str, token: str) -> Command:
        # started as root, the server gives root up itself (it also makes its Python reachable)
        argv = [
            sys.executable,
            "-m",
            "atropos.sandbox.server",
            *self.spec.server_args(host="127.0.0.1", port=0, data_dir=data_dir),
            *(["--run-as", self.run_as] if self.run_as else []),
        ]
        return argv, self.environment(token)


class ApptainerLauncher(Launcher):
    def __init__(self, spec: ServerSpec, driver: SingularityDriver) -> None:
        super().__init__(spec)
        self.driver = driver
        self.sif: str | None = None
        self.binary: str | None = None

    async def prepare(self, progress: Progress) -> None:
        if self.sif is not None:
            return
        from atropos.images.cache import resolve_singularity_image
        from atropos.images.errors import ImageError
        from atropos.images.runtime import find_runtime

        d = self.driver
        progress(f"image: resolving {d.image} (pull policy {d.pull_policy})")
        try:
            runtime = await asyncio.to_thread(find_runtime, d.apptainer_binary)
            sif = await asyncio.to_thread(
                resolve_singularity_image, d.image, d.pull_policy, runtime=runtime, progress=progress
            )
        except ImageError as exc:
            raise BackendError(str(exc)) from None
        self.binary, self.sif = str(runtime.binary), str(sif)

    def hand_over(self, workdir: str, data_dir: str) -> None:
        """apptainer runs as `run_as` (we are root): it gets the data dir, and a way through the work dir."""
        if self.run_as:
            who = _identity(self.run_as)
            os.chmod(workdir, 0o711)
            os.chown(data_dir, who.uid, who.gid)

    def command(self, name: str, data_dir: str, token: str) -> Command:
        assert self.sif is not None and self.binary is not None, "prepare() first"
        argv = build_apptainer_exec_argv(
            self.binary,
            self.sif,
            binds=[(data_dir, CONTAINER_DATA_DIR)],
            tun=os.path.exists(TUN_DEVICE),
            server_args=self.spec.server_args(host="127.0.0.1", port=0, data_dir=CONTAINER_DATA_DIR),
            mounts=self.spec.settings.mounts,
        )
        if self.run_as:  # apptainer as root would make the server root in the container: run it unprivileged
            argv = _unprivileged(self.run_as) + argv
        return argv, self.environment(token, apptainer_secret_env(self.binary, {TOKEN_ENV: token}))


class DockerLauncher(Launcher):
    container_name = True

    def __init__(self, spec: ServerSpec, driver: DockerDriver) -> None:
        super().__init__(spec)
        self.driver = driver

    async def prepare(self, progress: Progress) -> None:
        if shutil.which("docker") is None:
            raise BackendError("driver 'docker' needs the docker CLI on PATH and a running Docker engine")

    def command(self, name: str, data_dir: str, token: str) -> Command:
        # root in the container only until the server has set up the slots' sandboxes and given root
        # up (atropos.images.docker_security says what each option is for); then it runs as our uid, so
        # the bind-mounted data dir stays ours, or as the image's unprivileged user when we are root
        owner = [] if os.getuid() == 0 else ["--run-as", f"{os.getuid()}:{os.getgid()}"]
        port = self.driver.container_port
        argv = [
            "docker",
            "run",
            "--rm",
            "--pull",
            "never",
            "--name",
            name,
            *docker_run_options(),
            "-p",
            f"127.0.0.1::{port}",
            "-v",
            f"{data_dir}:{CONTAINER_DATA_DIR}",
            *[w for path, rw in self.spec.settings.mounts for w in ("-v", volume(path, rw))],
            "-e",
            TOKEN_ENV,
            self.driver.image,
            "atropos-sandbox",
            "server",
            *self.spec.server_args(host="0.0.0.0", port=port, data_dir=CONTAINER_DATA_DIR),
            *owner,
        ]
        return argv, self.environment(token)

    async def url(self, name: str, reported: str) -> str:
        """The container's port as published on loopback (what the server reported is inside)."""
        proc = await asyncio.create_subprocess_exec(
            "docker",
            "port",
            name,
            f"{self.driver.container_port}/tcp",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0 or not out.strip():
            raise BackendError(f"docker port {name}: {err.decode(errors='replace').strip()}")
        return "http://" + out.decode().splitlines()[0].strip()


def launcher_for(spec: ServerSpec) -> Launcher:
    driver: DriverConfig = spec.driver
    if isinstance(driver, SingularityDriver):
        return ApptainerLauncher(spec, driver)
    if isinstance(driver, DockerDriver):
        return DockerLauncher(spec, driver)
    assert isinstance(driver, ProcessDriver)
    return ProcessLauncher(spec)


def _unprivileged(user: str) -> list[str]:
    """`setpriv` to `user`; the parent-death signal is set after the switch, which would clear it."""
    who = _identity(user)
    if shutil.which("setpriv") is None:
        raise BackendError(f"running apptainer as {who.name} needs setpriv (util-linux); or set run_as=None")
    return ["setpriv", "--reuid", str(who.uid), "--regid", str(who.gid), "--clear-groups", "--pdeathsig", "KILL", "--"]


def _identity(user: str) -> Identity:
    try:
        return resolve_identity(user)
    except PrivilegeError as exc:
        raise BackendError(f"run_as: {exc}") from None
