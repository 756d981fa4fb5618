"""Local backend: sandbox servers as child processes on this machine, no Nomad.

Drivers: `process` (the server itself), `singularity` (`apptainer exec <sif> atropos-sandbox
server ...`, host networking, the server's data dir bound to /data) and `docker` (`docker run`
with the port published on loopback). Every server gets a free port (it binds port 0 and reports
it) and a fresh token, and is stopped with its whole process tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from atropos import logtail
from atropos.backends.base import SandboxBackend, ServerInfo, ServerSpec
from atropos.backends.launchers import launcher_for
from atropos.backends.reaping import ServerRecord, reap_dead_owners
from atropos.errors import BackendError
from atropos.host import die_with_owner, kill_child_tree
from atropos.host.background import Background
from atropos.progress import Progress, no_progress
from atropos.sandbox.settings import READY_PREFIX

log = logging.getLogger("atropos.backends.local")

_STOP_GRACE = 10.0


@dataclass
class _LocalServer:
    info: ServerInfo
    proc: asyncio.subprocess.Process
    data_dir: str
    record: ServerRecord
    container: str | None = None
    exited: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class LocalBackendConfig(BaseModel):
    """Servers as child processes of this one, on this machine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["local"] = "local"
    workdir: str | None = Field(
        default=None,
        description="where the servers' data dirs and logs go; "
        "None: a fresh temporary directory, removed when the pool closes",
    )

    def build(self, spec: ServerSpec) -> LocalBackend:
        return LocalBackend(spec, self)


class LocalBackend(SandboxBackend):
    name = "local"

    def __init__(self, spec: ServerSpec, config: LocalBackendConfig | None = None, workdir: str | None = None) -> None:
        self.spec = spec
        self.config = config or LocalBackendConfig()
        self.launcher = launcher_for(spec)
        workdir = workdir or self.config.workdir
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="atropos-pool-")
        self._servers: dict[str, _LocalServer] = {}
        self._ids = itertools.count()
        self._tasks = Background(log)  # each server's watcher and the reader of its stdout
        self._drains: dict[int, asyncio.Future[None]] = {}  # server pid -> reader of its stdout
        self._reaped = False
        self._stopping = Background(log)

    def command(self, name: str, data_dir: str, token: str) -> tuple[list[str], dict[str, str]]:
        """argv and environment of one server (see atropos.backends.launchers)."""
        return self.launcher.command(name, data_dir, token)

    # -- lifecycle -----------------------------------------------------------------------------

    async def add_servers(self, count: int, progress: Progress = no_progress) -> list[ServerInfo]:
        if not self._reaped:
            self._reaped = True
            for reaped in await asyncio.to_thread(reap_dead_owners):
                progress(f"cleaned up after a dead pool: {reaped.describe()}")
        await self.launcher.prepare(progress)
        started = await asyncio.gather(*(self._start_one(progress) for _ in range(count)), return_exceptions=True)
        infos = [s for s in started if isinstance(s, ServerInfo)]
        errors = [s for s in started if isinstance(s, BaseException)]
        if errors and not infos:
            raise errors[0]
        for exc in errors:
            log.error("event=server_start_failed error=%s", exc)
        return infos

    async def _start_one(self, progress: Progress) -> ServerInfo:
        server_id = f"local-{next(self._ids)}"
        name = f"atropos-{os.getpid()}-{server_id}"
        data_dir = os.path.join(self.workdir, server_id)
        os.makedirs(data_dir, exist_ok=True)
        self.launcher.hand_over(self.workdir, data_dir)
        token = secrets.token_urlsafe(32)
        argv, env = self.command(name, data_dir, token)
        log_path = os.path.join(self.workdir, f"{server_id}.log")
        log_file = await asyncio.to_thread(open, log_path, "ab")
        try:
            # the server dies with this process, however it ends (see reaping)
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_owner(),
            )
        except OSError as exc:
            raise BackendError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
        finally:
            log_file.close()  # the child has its own copy of the descriptor
        container = name if self.launcher.container_name else None
        record = ServerRecord.for_process(
            server_id,
            proc.pid,
            data_dir=data_dir,
            workdir=self.workdir,
            own_workdir=self._own_workdir,
            container=container,
        )
        await asyncio.to_thread(record.save)
        try:
            reported = await asyncio.wait_for(self._read_ready(proc), self.spec.start_timeout)
            url = await self.launcher.url(name, reported)
        except (asyncio.TimeoutError, BackendError) as exc:
            await self._kill(proc, container)
            record.delete()
            tail = logtail.tail(log_path, lines=15)
            why = "did not report ready" if isinstance(exc, asyncio.TimeoutError) else str(exc)
            raise BackendError(
                f"server {server_id} ({self.spec.driver.describe()}) {why}; log {log_path}:\n{tail}"
            ) from None
        except BaseException:  # cancelled (the pool closes while a server starts): leave nothing behind
            await asyncio.shield(self._kill(proc, container))
            record.delete()
            raise
        server = _LocalServer(
            ServerInfo(server_id, url, token, self.spec.settings.slots), proc, data_dir, record, container
        )
        self._servers[server_id] = server
        self._tasks.spawn(self._watch(server))
        progress(f"server {server_id} ready at {url} ({self.spec.settings.slots} slots)")
        return server.info

    async def _read_ready(self, proc: asyncio.subprocess.Process) -> str:
        assert proc.stdout is not None
        while True:
            line = (await proc.stdout.readline()).decode(errors="replace")
            if not line:
                await proc.wait()
                raise BackendError(f"exited with code {proc.returncode} before it was ready")
            if line.startswith(READY_PREFIX):
                self._drains[proc.pid] = self._tasks.spawn(_drain(proc.stdout))
                return line.split()[1]

    async def _watch(self, server: _LocalServer) -> None:
        await server.proc.wait()
        if not server.exited.done():
            server.exited.set_result(None)

    def pid(self, server_id: str) -> int:
        """The server's process (apptainer's or docker's client process for those drivers)."""
        return self._servers[server_id].proc.pid

    def data_dir(self, server_id: str) -> str:
        """Where the server keeps its slots and snapshots (DATA_DIR/slots/N, DATA_DIR/snapshots)."""
        return self._servers[server_id].data_dir

    def exited(self, server_id: str) -> asyncio.Future[None] | None:
        server = self._servers.get(server_id)
        return server.exited if server is not None else None

    async def _kill(self, proc: asyncio.subprocess.Process, container: str | None = None) -> None:
        if container is not None:
            stop = await asyncio.create_subprocess_exec(
                "docker",
                "stop",
                "-t",
                "5",
                container,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await stop.wait()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
                os.killpg(proc.pid, signal.SIGCONT)  # a stopped (hung) server must run to handle it
            try:
                await asyncio.wait_for(proc.wait(), _STOP_GRACE)
            except asyncio.TimeoutError:
                log.warning("event=server_kill pid=%d reason=no exit %ss after SIGTERM", proc.pid, _STOP_GRACE)
        # whatever is left of the tree (a hung server, apptainer's children) dies now
        await kill_child_tree(proc)
        # the stdout pipe reaches EOF now that its writers are dead; reading it to the end lets
        # asyncio close the process transport while the loop still runs
        drain = self._drains.pop(proc.pid, None)
        if drain is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(drain), _STOP_GRACE)

    async def remove_server(self, server_id: str) -> None:
        server = self._servers.pop(server_id, None)
        if server is None:
            return
        # shielded: a caller cancelled midway (the pool closing during a scale-down) must not
        # leave the server half stopped; close() waits for it
        await asyncio.shield(self._stopping.spawn(self._stop(server)))

    async def _stop(self, server: _LocalServer) -> None:
        await self._kill(server.proc, server.container)
        await asyncio.to_thread(shutil.rmtree, server.data_dir, True)
        server.record.delete()

    async def close(self) -> None:
        await asyncio.gather(*(self.remove_server(sid) for sid in list(self._servers)))
        await self._stopping.wait()
        if self._own_workdir:
            await asyncio.to_thread(shutil.rmtree, self.workdir, True)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass
