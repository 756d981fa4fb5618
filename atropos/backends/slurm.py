"""SLURM backend: each sandbox server is one SLURM job (`sbatch`), run directly or under `apptainer exec`.

Discovery without a secret on any command line: the pool makes a directory per server under
`pool_dir` (which the nodes must see: a shared file system), writes the server's token there (mode
0600), and the job's server reads it (`--token-file`) and prints its READY line into the job's
output file in the same directory, from which the pool learns the port. The node's address comes
from `scontrol show node` (NodeAddr), or is `host` where the pool runs on the node itself.

Lifecycle: jobs carry their owner (host, pid, start time) in their comment, so a pool whose process
died leaves jobs that the next pool cancels; a job that leaves the queue (failed, cancelled,
preempted, out of time) is a lost server, which the pool replaces; close() cancels every job.
A job with a time limit tells the pool its time left (squeue), so that the pool retires it ahead
of the limit (`SlotPoolConfig.retire_before`). A job pending for a reason that waiting never
clears (it asks for more than any node has, it is held) fails at once with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from atropos import logtail
from atropos.backends.base import SandboxBackend, ServerInfo, ServerSpec
from atropos.drivers import DockerDriver, SingularityDriver
from atropos.errors import BackendError, PoolConfigError
from atropos.host import OwnerMeta
from atropos.images.apptainer import CONTAINER_DATA_DIR, build_apptainer_exec_argv
from atropos.progress import Progress, no_progress
from atropos.sandbox.settings import READY_PREFIX, TUN_DEVICE
from atropos.slurm import BatchJob, cancel_dead_owner_jobs, hopeless, queue, run, seconds_of
from atropos.slurm.batch import OUTPUT, SCRIPT

log = logging.getLogger("atropos.backends.slurm")

_POLL = 0.5  # seconds between looks at the queue while a server starts (its pending reason)
# seconds between looks at the pool's running jobs, one squeue for all: a server that dies is
# mostly seen by the pool's health checks first (its connection refused); this catches the rest
# and keeps each job's time left, without asking the controller more often than a site likes
_WATCH = 2.0
# a job in any of these is no server any more (COMPLETING: SLURM is ending it, its calls will not finish)
_GONE = (
    "COMPLETING",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
)


class SlurmBackendConfig(BaseModel):
    """Servers as SLURM jobs; unset options take SLURM's own defaults (and `SBATCH_*`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["slurm"] = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: str | None = Field(default=None, description="sbatch --time, e.g. 4:00:00")
    cpus_per_server: int | None = Field(
        default=None, ge=1, description="sbatch --cpus-per-task; None: SLURM's default (1)"
    )
    memory_per_server: str | None = Field(default=None, description="sbatch --mem, e.g. 8G")
    constraint: str | None = None
    sbatch_args: list[str] = Field(default_factory=list, description="extra sbatch options")
    pool_dir: str | None = Field(
        default=None,
        description="a directory the pool and the nodes both see (tokens, addresses, job output); default "
        "~/.cache/atropos-sandbox/slurm",
    )
    host: str | None = Field(
        default=None,
        description="the address servers listen on and the pool connects to when the pool runs on the node "
        "itself (e.g. 127.0.0.1); None: servers listen on all addresses, reached at the node's NodeAddr",
    )
    job_name: str = "atropos-sandbox"

    def build(self, spec: ServerSpec) -> SlurmBackend:
        return SlurmBackend(spec, self)


class _Job:
    def __init__(self, server_id: str, job_id: str, directory: Path, token: str) -> None:
        self.server_id, self.job_id, self.directory, self.token = server_id, job_id, directory, token
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ends_at: float | None = None  # on the monotonic clock: its time limit, as squeue last said


class SlurmBackend(SandboxBackend):
    name = "slurm"

    def __init__(self, spec: ServerSpec, config: SlurmBackendConfig | None = None) -> None:
        if isinstance(spec.driver, DockerDriver):
            raise PoolConfigError("backend slurm runs drivers process and singularity (no Docker on SLURM nodes)")
        self.spec = spec
        self.config = config or SlurmBackendConfig()
        base = Path(self.config.pool_dir or Path.home() / ".cache" / "atropos-sandbox" / "slurm").expanduser()
        self.pool_dir = base.absolute() / f"pool-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._jobs: dict[str, _Job] = {}
        self._ids = 0
        self._owner = json.dumps(OwnerMeta.current().to_meta(), separators=(",", ":"))
        self._watcher: asyncio.Task[None] | None = None
        self._cleaned = False

    # -- the job ----------------------------------------------------------------------------------

    def _server_argv(self, directory: Path) -> list[str]:
        host = self.config.host or "0.0.0.0"
        driver = self.spec.driver
        if isinstance(driver, SingularityDriver):
            return build_apptainer_exec_argv(
                driver.apptainer_binary or "apptainer", driver.image,
                binds=[(str(directory / "data"), CONTAINER_DATA_DIR), (str(directory), "/run/atropos")],
                tun=os.path.exists(TUN_DEVICE),
                server_args=self.spec.server_args(host=host, port=0, data_dir=CONTAINER_DATA_DIR,
                                                  token_file="/run/atropos/token"),
                mounts=self.spec.settings.mounts,
            )  # fmt: skip
        # this Python, which the nodes must see (a shared file system or the same image), as the
        # local backend runs it
        return [sys.executable, "-m", "atropos.sandbox.server", *self.spec.server_args(
            host=host, port=0, data_dir=str(directory / "data"), token_file=str(directory / "token"))]  # fmt: skip

    def batch_job(self, directory: Path, *, owned: bool = True) -> BatchJob:
        """The job of the server whose directory is `directory` (`owned`: carrying this pool as its
        owner, which a job rendered for a person does not)."""
        c = self.config
        options = {
            "--partition": c.partition, "--account": c.account, "--qos": c.qos, "--time": c.time_limit,
            "--cpus-per-task": str(c.cpus_per_server) if c.cpus_per_server else None,
            "--mem": c.memory_per_server, "--constraint": c.constraint,
        }  # fmt: skip
        return BatchJob(
            command=self._server_argv(directory),
            directory=directory,
            job_name=c.job_name,
            options=options,
            extra=list(c.sbatch_args),
            comment=self._owner if owned else None,
        )

    def _check_pool_dir(self) -> None:
        """The pool dir must be a directory this process can write (and the nodes see: that shows
        when a job runs, see `_ended`)."""
        try:
            self.pool_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
            probe = self.pool_dir / ".writable"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise PoolConfigError(
                f"slurm pool_dir {self.pool_dir.parent}: cannot write there ({exc.strerror or exc}); give a "
                "directory this process can write and the nodes see (a shared file system)"
            ) from None

    def _write_server_dir(self, job: BatchJob, token: str) -> None:
        (job.directory / "data").mkdir(parents=True, mode=0o700)
        token_file = job.directory / "token"
        token_file.touch(mode=0o600)
        token_file.write_text(token + "\n")
        (job.directory / SCRIPT).write_text(job.script())

    async def _submit(self) -> _Job:
        self._ids += 1
        server_id = f"slurm-{self._ids}"
        batch = self.batch_job(self.pool_dir / server_id)
        token = secrets.token_urlsafe(32)
        # a shared file system may be slow: its I/O never runs on the event loop
        await asyncio.to_thread(self._write_server_dir, batch, token)
        job_id = (await run(*batch.sbatch_argv())).strip().split(";")[0]
        job = _Job(server_id, job_id, batch.directory, token)
        self._jobs[server_id] = job
        return job

    async def _ready(self, job: _Job, progress: Progress) -> ServerInfo:
        """Wait for the job's READY line; say why it waits (SLURM's pending reason) meanwhile."""
        said = ""
        deadline = asyncio.get_running_loop().time() + self.spec.start_timeout
        while True:
            text = await asyncio.to_thread(_read_if_there, job.directory / OUTPUT)
            for line in text.splitlines():
                if line.startswith(READY_PREFIX):
                    port = line.split()[1].rsplit(":", 1)[1]
                    host = self.config.host or await self._node_address(job)
                    return ServerInfo(job.server_id, f"http://{host}:{port}", job.token, self.spec.settings.slots)
            state = (await queue([job.job_id])).get(job.job_id)
            if state is None:
                raise BackendError(await asyncio.to_thread(self._ended, job))
            news = f"slurm job {job.job_id}: {state.state.lower()}" + (
                f" ({state.reason})" if state.reason not in ("None", "") else ""
            )
            never = hopeless(state.reason) if state.state == "PENDING" else None
            if never is not None:
                raise BackendError(f"{news}: it will not start: {never}")
            if news != said:
                progress(news)
                said = news
            if asyncio.get_running_loop().time() > deadline:
                raise BackendError(f"{news}: not ready within start_timeout={self.spec.start_timeout:.0f}s")
            await asyncio.sleep(_POLL)

    def _ended(self, job: _Job) -> str:
        """Why a job that left the queue before its server was ready did so, from its output."""
        output = job.directory / OUTPUT
        if not output.exists():  # SLURM writes it from the node as the job starts
            return (
                f"slurm job {job.job_id} ({job.server_id}) ended without writing {output}: the node it ran on "
                f"does not see the pool dir {self.pool_dir.parent}, which must be on a file system the pool and "
                "the nodes share (slurm pool_dir)"
            )
        tail = logtail.tail(output, lines=15).rstrip("\n")
        return f"slurm job {job.job_id} ({job.server_id}) ended before its server was ready:\n{tail}"

    async def _node_address(self, job: _Job) -> str:
        found = (await queue([job.job_id])).get(job.job_id)
        node = found.node if found is not None else ""
        for field in (await run("scontrol", "show", "node", node)).split():
            if field.startswith("NodeAddr="):
                return field.split("=", 1)[1]
        return node

    # -- the backend's contract ---------------------------------------------------------------------

    async def add_servers(self, count: int, progress: Progress = no_progress) -> list[ServerInfo]:
        if not self._cleaned:
            await asyncio.to_thread(self._check_pool_dir)
            self._cleaned = True
            stale = await cancel_dead_owner_jobs(self.config.job_name)
            if stale:
                progress(f"cancelled {len(stale)} slurm job(s) left by dead pools: {', '.join(stale)}")
        jobs = [await self._submit() for _ in range(count)]
        progress(f"submitted {count} slurm job(s): {', '.join(j.job_id for j in jobs)}")
        started = await asyncio.gather(*(self._ready(j, progress) for j in jobs), return_exceptions=True)
        infos = [s for s in started if isinstance(s, ServerInfo)]
        for job, outcome in zip(jobs, started, strict=True):
            if not isinstance(outcome, ServerInfo):
                await self.remove_server(job.server_id)
        errors = [s for s in started if isinstance(s, BaseException)]
        if errors and not infos:
            raise errors[0]
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch())
        return infos

    async def _watch(self) -> None:
        """A job that left the queue is a server that is gone (the pool replaces it)."""
        while True:
            await asyncio.sleep(_WATCH)
            running = [j for j in self._jobs.values() if not j.exited.done()]
            if not running:
                continue
            with contextlib.suppress(BackendError):  # a slow controller: look again
                present = await queue([j.job_id for j in running])
                now = time.monotonic()
                for job in running:
                    found = present.get(job.job_id)
                    if found is None or found.state in _GONE:
                        job.exited.set_result(None)
                    elif found.state == "RUNNING":
                        left = seconds_of(found.time_left)
                        job.ends_at = None if left is None else now + left

    def job_id(self, server_id: str) -> str | None:
        """The SLURM job of a server of this pool (for a person, or a test, to act on)."""
        job = self._jobs.get(server_id)
        return job.job_id if job is not None else None

    def ends_in(self, server_id: str) -> float | None:
        job = self._jobs.get(server_id)
        if job is None or job.ends_at is None:
            return None
        return job.ends_at - time.monotonic()

    def exited(self, server_id: str) -> asyncio.Future[None] | None:
        job = self._jobs.get(server_id)
        return job.exited if job is not None else None

    async def remove_server(self, server_id: str) -> None:
        job = self._jobs.pop(server_id, None)
        if job is None:
            return
        with contextlib.suppress(BackendError):
            await run("scancel", job.job_id)
        await asyncio.to_thread(shutil.rmtree, job.directory, True)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        for server_id in list(self._jobs):
            await self.remove_server(server_id)
        await asyncio.to_thread(shutil.rmtree, self.pool_dir, True)


def _read_if_there(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
