"""A SWE-ReX deployment that runs SWE-ReX's server in an Apptainer (or Singularity) image.

SWE-ReX ships local, Docker, Modal and Fargate deployments; HPC clusters usually have none of
Docker, root or CNI networking, but do have Apptainer. `ApptainerDeployment` implements SWE-ReX's
`AbstractDeployment` on top of `atropos.images`:

- the image is a SIF path or a reference (`docker://...`, `python:3.11`) resolved through the SIF
  cache with the pull policies `never | always | missing`;
- the server runs under `apptainer exec --containall` on the host network (no `--net`/portmap,
  which need root-only CNI), bound to 127.0.0.1 on a chosen or free port;
- the auth token reaches it through `APPTAINERENV_*` in the apptainer process's environment and a
  tiny bootstrap hands it to SWE-ReX's argument parser in memory, so it is on no command line that
  `ps` shows, and it is removed from the environment the agent's commands inherit;
- `stop()` ends the whole process tree and, with `remove_images`, deletes the SIF it pulled.

Needs the `swerex` extra (`pip install 'atropos-sandbox[swerex]'`) on the host, and swe-rex in the
image's Python (the project's air-gapped SIF has it) or a standalone Python given as
`python_standalone_dir`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator
from swerex.deployment.abstract import AbstractDeployment
from swerex.deployment.hooks.abstract import CombinedDeploymentHook, DeploymentHook
from swerex.exceptions import DeploymentNotStartedError
from swerex.runtime.abstract import IsAliveResponse
from swerex.runtime.config import RemoteRuntimeConfig
from swerex.runtime.remote import RemoteRuntime
from swerex.utils.log import get_logger

from atropos.images.apptainer import apptainer_secret_env, build_apptainer_exec_argv
from atropos.images.cache import (
    PullPolicy,
    cached_image_path,
    pull_image,
    resolve_singularity_image,
)
from atropos.images.errors import ImageError
from atropos.images.references import normalize_reference
from atropos.images.runtime import ApptainerRuntime, find_runtime
from atropos.integrations.swerex.errors import ApptainerDeploymentError, StartupTimeoutError, as_startup_error
from atropos.integrations.swerex.image import names_a_pull, platform_cache_dir, platform_pull_args, standalone_prefix
from atropos.integrations.swerex.server_process import (
    BOOTSTRAP,
    HOST,
    TOKEN_VAR,
    claim_port,
    diagnosis,
    end_process_tree,
    read_tail,
    spawn,
)

__all__ = ["ApptainerDeployment", "ApptainerDeploymentConfig"]

_CALLER_TERMINAL = ("TERM", "COLUMNS", "LINES", "TERMCAP")
_PROBE_TIMEOUT = 2.0  # per /is_alive attempt while starting; a loaded node may answer slowly
_RUNTIME_TIMEOUT = 10.0  # RemoteRuntime's default for later is_alive() calls
_POLL_SECONDS = 0.2
_PROGRESS_SECONDS = 15.0
_CLOSE_TIMEOUT = 5.0


class ApptainerDeploymentConfig(BaseModel):
    """Configuration for running SWE-ReX's server in an Apptainer/Singularity image (no root needed)."""

    image: str
    """A SIF file (or sandbox directory), or an image reference: `docker://python:3.11`, `python:3.11`,
    `library://...`, `oras://...`. References are pulled into the SIF cache (`ATROPOS_SIF_CACHE`,
    else `APPTAINER_CACHEDIR/sif`, else `~/.cache/atropos-sandbox/sif`)."""
    port: int | None = None
    """The host port the server listens on (127.0.0.1; Apptainer shares the host network). None: a free one."""
    apptainer_args: list[str] = []
    """Extra `apptainer exec` options placed before the image, e.g. `["--nv"]` or `["--bind", "/scratch"]`."""
    writable_tmpfs: bool = True
    """Pass `--writable-tmpfs`, so the agent can change files anywhere in the read-only SIF (changes
    are lost on stop; Apptainer limits them to its session size, 64 MiB by default)."""
    startup_timeout: float = 180.0
    """Seconds to wait for the server to answer."""
    pull: PullPolicy = "missing"
    """When to pull a reference: `never` (must be in the cache), `always`, or `missing`."""
    remove_images: bool = False
    """Delete the SIF on stop, if this deployment pulled it (an image it found in the cache stays)."""
    python_standalone_dir: str | None = None
    """A host directory holding a standalone Python with swe-rex installed, for images without one:
    laid out like SWE-ReX's Docker deployment (`DIR/python3.11/bin/python3`) or as a plain prefix
    (`DIR/bin/python3`). It is bound read-only at the same path inside the container."""
    platform: str | None = None
    """The platform of a pulled image, Docker style (`linux/amd64`, `linux/arm64`, `linux/arm/v7`);
    it becomes `apptainer pull --arch/--arch-variant`, and such images get their own cache directory."""

    type: Literal["apptainer"] = "apptainer"
    """Discriminator for (de)serialization/CLI. Do not change."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("platform")
    @classmethod
    def _platform_is_docker_style(cls, value: str | None) -> str | None:
        platform_pull_args(value)  # raises ValueError with the expected shape
        return value

    def get_deployment(self) -> ApptainerDeployment:
        return ApptainerDeployment.from_config(self)


class ApptainerDeployment(AbstractDeployment):
    def __init__(self, *, logger: logging.Logger | None = None, **kwargs: Any) -> None:
        """Deployment of SWE-ReX's server in an Apptainer image on this host.

        Args:
            **kwargs: Keyword arguments (see `ApptainerDeploymentConfig` for details).
        """
        self._config = ApptainerDeploymentConfig(**kwargs)
        self.logger = logger or get_logger("rex-deploy")
        self._hooks = CombinedDeploymentHook()
        self._runtime: RemoteRuntime | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._scratch: Path | None = None  # apptainer's --workdir and the server's log
        self._pulled: Path | None = None  # the SIF this deployment pulled, for remove_images
        self._port: int | None = None
        self._sif: Path | None = None

    @classmethod
    def from_config(cls, config: ApptainerDeploymentConfig) -> ApptainerDeployment:
        return cls(**config.model_dump())

    def add_hook(self, hook: DeploymentHook) -> None:
        self._hooks.add_hook(hook)

    @property
    def port(self) -> int | None:
        """The host port of the running server."""
        return self._port

    @property
    def sif(self) -> Path | None:
        """The image the server runs from."""
        return self._sif

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The `apptainer exec` process (leader of its own process group)."""
        return self._process

    @property
    def runtime(self) -> RemoteRuntime:
        """SWE-ReX's client of the server; raises `DeploymentNotStartedError` before `start()`."""
        if self._runtime is None:
            raise _not_started()
        return self._runtime

    async def is_alive(self, *, timeout: float | None = None) -> IsAliveResponse:
        if self._runtime is None or self._process is None:
            raise _not_started()
        code = self._process.poll()
        if code is not None:
            return IsAliveResponse(is_alive=False, message=self._exit_message(code))
        return await self._runtime.is_alive(timeout=timeout)

    async def start(self) -> None:
        """Resolve the image, start the server and wait until it answers."""
        if self._process is not None:
            raise RuntimeError("this deployment is already started; stop() it first")
        try:
            runtime = await asyncio.to_thread(find_runtime)
        except ImageError as exc:
            raise as_startup_error(exc) from None
        started = time.monotonic()
        try:
            await self._launch(runtime)
            await self._wait_until_alive(self._config.startup_timeout)
        except ImageError as exc:
            await self.stop()  # nothing half-started stays behind (process, scratch dir, pulled SIF)
            raise as_startup_error(exc) from None
        except BaseException:
            await self.stop()
            raise
        self.logger.info(f"Runtime started in {time.monotonic() - started:.2f}s")

    async def _launch(self, runtime: ApptainerRuntime) -> None:
        """Resolve the image and spawn `apptainer exec` running SWE-ReX's server."""
        self._hooks.on_custom_step("Resolving Apptainer image")
        sif, self._pulled = await asyncio.to_thread(self._resolve_image, runtime)
        self._sif = sif
        self._port = claim_port(self._config.port)
        token = secrets.token_urlsafe(32)
        self._scratch = Path(tempfile.mkdtemp(prefix="swerex-apptainer-"))
        argv = self._exec_argv(runtime, sif, self._port, self._scratch)
        # apptainer passes the caller's TERM into the container even under --containall: a login
        # shell's xterm-256color makes SWE-ReX's sessions answer with terminal escapes ('\r\nhi\n\r\n');
        # SWE-ReX's Docker deployment has none, so neither has this one
        env = {k: v for k, v in os.environ.items() if k not in _CALLER_TERMINAL}
        env.update(apptainer_secret_env(runtime.binary, {TOKEN_VAR: token}))
        self._hooks.on_custom_step("Starting runtime")
        self.logger.info(f"Starting SWE-ReX in {sif} with {runtime.describe()} on port {self._port}")
        self._process = spawn(argv, env, self._scratch / "server.log")
        self._runtime = RemoteRuntime.from_config(
            RemoteRuntimeConfig(host=f"http://{HOST}", port=self._port, timeout=_RUNTIME_TIMEOUT, auth_token=token)
        )

    async def stop(self) -> None:
        """Stop the server and everything it started; safe to call more than once."""
        if self._runtime is not None:
            await _close_quietly(self._runtime, self.logger)
            self._runtime = None
        if self._process is not None:
            await asyncio.to_thread(end_process_tree, self._process)
            self._process = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        if self._config.remove_images and self._pulled is not None:
            self.logger.info(f"Removing image {self._pulled}")
            # only this deployment's pull: atropos.images.remove_images() would drop every image
            # this process pulled, including those other deployments are still using
            self._pulled.unlink(missing_ok=True)
            self._pulled = None

    def _resolve_image(self, runtime: ApptainerRuntime) -> tuple[Path, Path | None]:
        """The SIF to run, and the same path again when this call pulled it (else None)."""
        image = self._config.image.strip()
        if not names_a_pull(image):
            return resolve_singularity_image(image, "never", runtime=runtime), None
        reference = normalize_reference(image)
        cache_dir = platform_cache_dir(self._config.platform)
        policy = self._config.pull
        # `always` pulls every time, `missing` only what is absent, `never` nothing
        pulls = policy == "always" or not cached_image_path(reference, cache_dir).is_file()
        if pulls and policy != "never":
            self._hooks.on_custom_step("Pulling container image")
        sif = pull_image(
            reference,
            policy,
            cache_dir,
            runtime,
            progress=self.logger.info,
            pull_args=platform_pull_args(self._config.platform),
        )
        return sif, (sif if pulls else None)

    def _exec_argv(self, runtime: ApptainerRuntime, sif: Path, port: int, scratch: Path) -> list[str]:
        python, python_args, env = self._python_in_image()
        extra = ["--writable-tmpfs"] if self._config.writable_tmpfs else []
        work = scratch / "work"
        work.mkdir()
        return build_apptainer_exec_argv(
            runtime.binary,
            str(sif),
            env=env,
            extra_args=[*extra, *python_args, *self._config.apptainer_args],
            workdir=str(work),
            command=[python, "-c", BOOTSTRAP],
            server_args=["--host", HOST, "--port", str(port)],
        )

    def _python_in_image(self) -> tuple[str, list[str], dict[str, str]]:
        """The interpreter to run the server with, the apptainer options and settings it needs."""
        root = self._config.python_standalone_dir
        if root is None:
            return "python3", [], {}
        prefix = standalone_prefix(Path(root).expanduser().absolute())
        # read-only (build_apptainer_exec_argv's binds are writable): the agent must not alter the
        # host's Python that the next server runs with
        bind = ["--bind", f"{prefix}:{prefix}:ro"]
        # mirrors SWE-ReX's Docker deployment, which sets LD_LIBRARY_PATH to the standalone's lib
        env = {"LD_LIBRARY_PATH": str(prefix / "lib")}
        return str(prefix / "bin" / "python3"), bind, env

    async def _wait_until_alive(self, timeout: float) -> None:
        """Poll /is_alive; fail at once when the process exits, with its output, or after `timeout`."""
        assert self._process is not None and self._runtime is not None
        started = time.monotonic()
        next_note = started + _PROGRESS_SECONDS
        while True:
            code = self._process.poll()
            if code is not None:
                raise ApptainerDeploymentError(self._exit_message(code))
            response = await self._runtime.is_alive(timeout=_PROBE_TIMEOUT)
            if response.is_alive:
                return
            now = time.monotonic()
            if now - started >= timeout:
                raise StartupTimeoutError(
                    f"SWE-ReX in {self._sif} did not answer on {HOST}:{self._port} within {timeout:.0f} s "
                    f"(raise startup_timeout on a slow node); last probe: {response.message.strip()[-300:]}\n"
                    f"server output (tail):\n{self._output_tail()}"
                )
            if now >= next_note:
                self.logger.info(f"Waiting for SWE-ReX in {self._sif}: {now - started:.0f} s of {timeout:.0f} s")
                next_note += _PROGRESS_SECONDS
            await asyncio.sleep(_POLL_SECONDS)

    def _exit_message(self, code: int) -> str:
        tail = self._output_tail()
        return (
            f"apptainer running SWE-ReX from {self._sif} exited with status {code} "
            f"(port {self._port}){diagnosis(tail)}\nserver output (tail):\n{tail}"
        )

    def _output_tail(self) -> str:
        if self._scratch is None:
            return "(no output)"
        return read_tail(self._scratch / "server.log") or "(no output)"


def _not_started() -> DeploymentNotStartedError:
    return DeploymentNotStartedError()  # type: ignore[no-untyped-call]  # swerex leaves it unannotated


async def _close_quietly(runtime: RemoteRuntime, logger: logging.Logger) -> None:
    """Ask the server to close its sessions; a dead or hung server must not block stop()."""
    try:
        await asyncio.wait_for(runtime.close(), _CLOSE_TIMEOUT)
    except Exception as exc:  # the process is ended next either way
        logger.debug(f"closing the SWE-ReX runtime failed: {exc!r}")
