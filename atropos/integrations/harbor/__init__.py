"""Harbor (Terminal-Bench's framework, Python >= 3.12) in the pool's slots: an environment loaded by
import path,

    harbor run -p TASKS -a oracle -e atropos.integrations.harbor:SlotEnvironment \\
        --ek pool='{"slots_per_container": 8}'

Each trial's environment is a slot of a pool shared by this process (one per configuration: the
`pool` fields of SlotPoolConfig, and the network the task asks for), in the task's own image: its
`environment/Dockerfile` built by the local Docker engine (or its `docker_image`), handed to the
pool's servers as a `docker save` archive (`image_dir`, a directory the servers can read; a shared
one for cluster backends). A registry image the engine lacks goes to the servers as `docker://`.

- `exec` runs `bash -c` in the slot, in the task's working directory (`workdir`, else the image's
  WORKDIR), with Harbor's environment merged; a slot has one unprivileged user, which owns the
  image's files inside it: Harbor's `root` (and no user) run as that user, any other user is refused
  with the reason. A timeout raises RuntimeError, as Harbor's docker environment does. A command
  Harbor cancels runs on until its `timeout_sec` (for the agent: the same moment) or the trial's stop.
- Files go anywhere in the slot's root: through the workspace, then `cp` in the slot.
- Network: `public` runs in the pool's network mode (default `auto`), `no-network` in a pool whose
  slots have none (`deny`); an allowlist is not supported, and Harbor refuses such a task before it
  starts.
- `stop` gives the slot back (it is reset: every process killed, every file gone).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from atropos.integrations import missing_framework
from atropos.integrations.pools import on_pool, shared_pool
from atropos.sandbox.runner.pathsafe import WORKSPACE_ALIAS
from atropos.slots import Sandbox, SyncSlotPool

try:
    from harbor.environments.base import BaseEnvironment, ExecResult
    from harbor.environments.capabilities import EnvironmentCapabilities
    from harbor.environments.definition import require_agent_environment_definition
except ImportError as exc:  # pragma: no cover - the extra is installed where this is used
    raise missing_framework("harbor", "harbor", exc) from None

__all__ = ["SlotEnvironment"]

log = logging.getLogger("atropos.integrations.harbor")
T = TypeVar("T")

_NO_TIMEOUT = 86400.0  # Harbor's verifier passes none: its own timeout cancels the call
_STAGE = f"{WORKSPACE_ALIAS}/.atropos-harbor"  # where files pass through on their way in or out
_ROOT_USERS = (None, "root", 0, "0")


class SlotEnvironment(BaseEnvironment):
    def __init__(self, *args: Any, pool: dict[str, Any] | None = None, image_dir: str | None = None, **kwargs: Any):
        self._pool_fields = dict(pool or {})
        self._image_dir = image_dir
        self._pool: SyncSlotPool | None = None
        self._sandbox: Sandbox | None = None
        self._workdir: str | None = None
        super().__init__(*args, **kwargs)

    @staticmethod
    def type() -> str:
        return "atropos-slot"

    @property
    def capabilities(self) -> EnvironmentCapabilities:
        return EnvironmentCapabilities(disable_internet=True)

    def _validate_definition(self) -> None:
        require_agent_environment_definition(self.environment_dir, docker_image=self.task_env_config.docker_image)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self, force_build: bool) -> None:
        image, workdir = await asyncio.to_thread(
            task_image, Path(self.environment_dir), self.task_env_config.docker_image, self._image_dir, force_build
        )
        fields = dict(self._pool_fields)
        if self._network_disabled:
            fields["network"] = "deny"
        self._pool = await asyncio.to_thread(shared_pool, fields)
        self._sandbox = await self._on_pool(self._pool.pool.open_sandbox(trajectory_id=self.session_id, image=image))
        self._workdir = self.task_env_config.workdir or workdir
        if self._workdir:
            await self._shell(f"mkdir -p {shlex.quote(self._workdir)}")
        await self._upload_environment_dir_after_start()
        await self.ensure_dirs(self._mount_targets(writable_only=True))

    async def stop(self, delete: bool) -> None:
        sandbox, self._sandbox = self._sandbox, None
        if sandbox is not None:
            try:
                await self._on_pool(sandbox.close())
            except Exception as exc:  # Harbor calls this shielded, and it must not raise
                log.warning("trial %s: giving its slot back failed: %s", self.session_id, exc)

    # -- commands ----------------------------------------------------------------------------------

    async def exec(
        self,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_sec: int | None = None,
        user: str | int | None = None,
    ) -> ExecResult:
        who = self._resolve_user(user)
        if who not in _ROOT_USERS:
            raise ValueError(
                f"user {who!r}: a slot runs every command as its one unprivileged user (it owns the image's files "
                "in the slot, as root would); leave the task's agent and verifier user unset or root"
            )
        sandbox = self._started()
        timeout = float(timeout_sec) if timeout_sec else _NO_TIMEOUT
        run = sandbox.run(command, cwd=cwd or self._workdir, env=self._merge_env(env), timeout=timeout)
        result = await self._on_pool(run)
        if result.timed_out:
            raise RuntimeError(f"Command timed out after {timeout_sec} seconds")
        code = result.exit_code if result.exit_code is not None else -1
        return ExecResult(stdout=result.output, stderr=None, return_code=code)

    async def _shell(self, command: str) -> None:
        result = await self._on_pool(self._started().run(command, timeout=600.0))
        if not result.ok:
            raise RuntimeError(f"in the slot: {command!r} failed (exit {result.exit_code}): {result.output[-2000:]}")

    # -- files: through a staging dir of the workspace ------------------------------------------------

    async def upload_file(self, source_path: Path | str, target_path: str) -> None:
        stage = f"{_STAGE}/{uuid.uuid4().hex}"
        await self._on_pool(self._started().upload(str(source_path), stage))
        target = shlex.quote(target_path)
        await self._shell(f'mkdir -p "$(dirname {target})" && mv -f {stage} {target}')

    async def upload_dir(self, source_dir: Path | str, target_dir: str) -> None:
        stage = f"{_STAGE}/{uuid.uuid4().hex}"
        await self._on_pool(self._started().upload(str(source_dir), stage))
        target = shlex.quote(target_dir)
        await self._shell(f"mkdir -p {target} && cp -R {stage}/. {target}/ && rm -rf {stage}")

    async def download_file(self, source_path: str, target_path: Path | str) -> None:
        stage = f"{_STAGE}/{uuid.uuid4().hex}"
        await self._shell(f"mkdir -p {_STAGE} && cp {shlex.quote(source_path)} {stage}")
        try:
            await self._on_pool(self._started().download(stage, str(target_path)))
        finally:
            await self._shell(f"rm -f {stage}")

    async def download_dir(self, source_dir: str, target_dir: Path | str) -> None:
        stage = f"{_STAGE}/{uuid.uuid4().hex}"
        await self._shell(f"mkdir -p {stage} && cp -R {shlex.quote(source_dir)}/. {stage}/")
        try:
            await self._on_pool(self._started().download(stage, str(target_dir), tree=True))
        finally:
            await self._shell(f"rm -rf {stage}")

    # -- the pool's loop ---------------------------------------------------------------------------

    def _started(self) -> Sandbox:
        if self._sandbox is None:
            raise RuntimeError(f"trial {self.session_id}: its environment is not started (or stopped)")
        return self._sandbox

    async def _on_pool(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._pool is not None
        return await on_pool(self._pool, coro)


def task_image(
    environment_dir: Path, docker_image: str | None, image_dir: str | None, force_build: bool
) -> tuple[str, str | None]:
    """The task's image as the pool's servers take it, and its working directory if known: its
    Dockerfile built (or its `docker_image` found) in the local engine and saved as an archive in
    `image_dir` (default: a directory of this process any user can read), or a registry reference."""
    if docker_image is None:
        digest = hashlib.sha256()
        for path in sorted(p for p in environment_dir.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(environment_dir)).encode() + b"\0" + path.read_bytes())
        tag = f"atropos-harbor/{environment_dir.parent.name.lower()}:{digest.hexdigest()[:16]}"
        build = ["docker", "build", "-q", "-t", tag, str(environment_dir)]
        if force_build or _docker("image", "inspect", tag).returncode != 0:
            done = _docker(*build[1:])
            if done.returncode != 0:
                raise RuntimeError(f"docker build of {environment_dir} failed: {done.stderr.strip()[-2000:]}")
        docker_image = tag
    elif _docker("image", "inspect", docker_image).returncode != 0:
        return f"docker://{docker_image}", None  # not here: the servers pull it (skopeo)
    inspect = _docker("image", "inspect", "--format", "{{.Id}} {{.Config.WorkingDir}}", docker_image)
    image_id, _, workdir = inspect.stdout.strip().partition(" ")
    archive = Path(image_dir or _archives()) / f"{image_id.partition(':')[2]}.tar"
    if not archive.is_file():
        partial = archive.with_name(f".{archive.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        done = _docker("save", "-o", str(partial), docker_image)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"docker save of {docker_image} failed: {done.stderr.strip()[-2000:]}")
        os.chmod(partial, 0o644)
        os.replace(partial, archive)
    return f"docker-archive:{archive}", workdir or None


_archive_dir: str | None = None


def _archives() -> str:
    global _archive_dir
    if _archive_dir is None:
        _archive_dir = tempfile.mkdtemp(prefix="atropos-harbor-images-")
        os.chmod(_archive_dir, 0o755)  # the servers may run as another user (`run_as`)
        atexit.register(shutil.rmtree, _archive_dir, True)  # the servers unpacked what they need
    return _archive_dir


def _docker(*args: str) -> subprocess.CompletedProcess[str]:
    with contextlib.suppress(FileNotFoundError):
        return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=3600, check=False)
    raise RuntimeError("Harbor tasks in slots need the `docker` command to build or find their image")
