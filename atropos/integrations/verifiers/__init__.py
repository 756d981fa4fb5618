"""verifiers (0.4, Prime Intellect's environments) in the pool's slots: a `verifiers.v1.Runtime`,

    async with SlotRuntime(pool, image="docker-archive:/tasks/t1.tar") as box:
        trace = await agent.run(task, runtime=box)

verifiers' agent program (its harness: the bash harness's chat loop, say) runs inside the box and
calls back to the trainer: to the model interception server verifiers opens on 127.0.0.1, and to
any tool servers. A slot reaches none of the node's loopback, so `prepare_execution`, which
verifiers calls with exactly those URLs before the program starts, opens a bridge for each
(`Sandbox.bridge`): the slot's own 127.0.0.1:PORT relays to the node's, for those ports alone.
The URLs stay as they are (`host_url` is the identity). A bridge reaches the loopback of the node
the slot's server runs on: the trainer's, on the local backend with the process or Apptainer driver;
elsewhere verifiers' own tunnel has to carry the callbacks.

The box runs commands as the slot's unprivileged user (`supports_user` is false: a task's
`agent_user` is refused by verifiers before anything starts), and offers no in-box service to the
host (`expose` says so). Its trace records it as verifiers' `docker` type, the closed list
verifiers can read back, with the id `atropos:SERVER/SLOT`.
"""

from __future__ import annotations

import posixpath
import secrets
import shlex
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

from atropos.errors import SlotPoolError
from atropos.integrations import missing_framework
from atropos.integrations.pools import on_pool, shared_pool
from atropos.sandbox.models import ExecuteResult
from atropos.slots import SlotPool, SyncSlotPool
from atropos.slots.sandbox import Sandbox

try:
    from verifiers.v1.errors import SandboxError
    from verifiers.v1.runtimes import ProgramResult, Runtime
    from verifiers.v1.runtimes.docker import DockerConfig, DockerRuntimeInfo
except ImportError as exc:  # pragma: no cover - the extra is installed where this is used
    raise missing_framework("verifiers", "verifiers", exc) from None

__all__ = ["SlotRuntime"]

T = TypeVar("T")

_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "localhost.")  # what a bridge's end in the slot answers
# files for paths outside the workspace pass through here (the workspace is what the pool's file
# calls reach); removed right after
_STAGING = ".atropos-verifiers"


class SlotRuntime(Runtime):
    """One slot of a pool as a verifiers runtime: leased at `start()`, given back at `stop()`.

    `pool`: a SlotPool on the caller's event loop, a SyncSlotPool, or the fields of a SlotPoolConfig
    (a pool shared by every runtime of this process with those fields; None: the defaults).
    `image`: the task's image (see SlotPool.acquire); `workdir`: where commands run and relative
    paths resolve (default: the slot's workspace); `timeout`: the longest one command may run,
    the agent program included, in seconds."""

    is_local = True  # the callbacks go through bridges, not a public tunnel

    def __init__(
        self,
        pool: SlotPool | SyncSlotPool | dict[str, Any] | None = None,
        *,
        image: str | None = None,
        workdir: str | None = None,
        timeout: float = 3600.0,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self._pool = shared_pool(pool or {}) if pool is None or isinstance(pool, dict) else pool
        self.image = image
        self.workdir = workdir
        self.timeout = timeout
        self.config = DockerConfig(image=image or "atropos-slot", workdir=workdir)
        self.info = DockerRuntimeInfo(**self.config.model_dump())
        self._sandbox: Sandbox | None = None
        self._bridged: set[int] = set()

    async def __aenter__(self) -> SlotRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _on_pool(self, coro: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]:
        """`coro`, from the pool's API, made awaitable on the caller's loop."""
        return on_pool(self._pool, coro) if isinstance(self._pool, SyncSlotPool) else coro

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            raise SandboxError(f"runtime {self.name}: not started, or stopped")
        return self._sandbox

    async def start(self) -> None:
        pool = self._pool.pool if isinstance(self._pool, SyncSlotPool) else self._pool
        try:
            self._sandbox = await self._on_pool(pool.open_sandbox(self.name, image=self.image))
        except SlotPoolError as exc:
            raise SandboxError(f"runtime {self.name}: no slot: {exc}") from exc
        slot = self._sandbox.slot
        self.info.id = f"atropos:{slot.server_id}/{slot.index}"

    async def teardown(self) -> None:
        sandbox, self._sandbox = self._sandbox, None
        self._bridged.clear()
        if sandbox is not None:
            await self._on_pool(sandbox.close())

    # -- commands ---------------------------------------------------------------------------------

    async def _run(self, command: str, env: dict[str, str] | None = None) -> ExecuteResult:
        try:
            return await self._on_pool(self.sandbox.run(command, cwd=self.workdir, env=env, timeout=self.timeout))
        except SlotPoolError as exc:
            raise SandboxError(f"runtime {self.name}: {exc}") from exc

    async def run(self, argv: list[str], env: dict[str, str]) -> ProgramResult:
        result = await self._run(shlex.join(argv), self.process_env(env))
        if result.timed_out:
            raise SandboxError(f"runtime {self.name}: {argv[0]} ran past {self.timeout:.0f} s and was killed")
        exit_code = result.exit_code if result.exit_code is not None else -1
        return ProgramResult(exit_code=exit_code, stdout=result.stdout, stderr=result.stderr or (result.error or ""))

    async def run_background(self, argv: list[str], env: dict[str, str], log: str) -> None:
        """Started from the slot's session, whose background jobs live until the box stops."""
        exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in self.process_env(env).items())
        where = f"cd {shlex.quote(self.workdir)} && " if self.workdir else ""
        line = f"({where}{exports}exec {shlex.join(argv)}) > {shlex.quote(log)} 2>&1 < /dev/null &"
        try:
            result = await self._on_pool(self.sandbox.session(line, timeout=60))
        except SlotPoolError as exc:
            raise SandboxError(f"runtime {self.name}: {exc}") from exc
        if not result.ok:
            raise SandboxError(f"runtime {self.name}: cannot start {argv[0]}: {result.output.strip()[-500:]}")

    # -- files --------------------------------------------------------------------------------------

    def _place(self, path: str) -> str:
        """`path` relative to the workspace (the pool's file calls take that), or absolute."""
        if self.workdir is not None and not posixpath.isabs(path):
            return posixpath.join(self.workdir, path)
        return path

    async def _read(self, path: str, max_bytes: int | None = None) -> bytes:
        path = self._place(path)
        if max_bytes is None and not posixpath.isabs(path):
            return await self._read_workspace(path)
        # elsewhere in the box (or capped at the source): a copy into the workspace first
        staged = f"{_STAGING}/{secrets.token_hex(8)}"
        take = f"head -c {max_bytes} -- {shlex.quote(path)}" if max_bytes is not None else f"cat -- {shlex.quote(path)}"
        copied = await self._run(f"mkdir -p {_STAGING} && {take} > {staged}")
        try:
            if not copied.ok:
                raise SandboxError(f"read {path!r}: {(copied.stderr or copied.output).strip()[-500:]}")
            return await self._read_workspace(staged)
        finally:
            await self._run(f"rm -f -- {staged}")

    async def _read_workspace(self, path: str) -> bytes:
        try:
            data = await self._on_pool(self.sandbox.read(path, binary=True))
        except SlotPoolError as exc:
            raise SandboxError(f"read {path!r}: {exc}") from exc
        assert isinstance(data, bytes)
        return data

    async def write(self, path: str, data: bytes) -> None:
        path = self._place(path)
        target = path if not posixpath.isabs(path) else f"{_STAGING}/{secrets.token_hex(8)}"
        try:
            await self._on_pool(self.sandbox.write(target, data))
        except SlotPoolError as exc:
            raise SandboxError(f"write {path!r}: {exc}") from exc
        if target != path:  # then moved where it belongs, its directories made
            moved = await self._run(
                f"mkdir -p -- {shlex.quote(posixpath.dirname(path))} && mv -f -- {target} {shlex.quote(path)}"
            )
            if not moved.ok:
                await self._run(f"rm -f -- {target}")
                raise SandboxError(f"write {path!r}: {(moved.stderr or moved.output).strip()[-500:]}")

    # -- the callbacks to the trainer -----------------------------------------------------------------

    async def prepare_execution(self, routes: list[str] | None) -> None:
        """Bridge each loopback URL verifiers hands over (its interception and tool servers) into the
        slot at the same port; URLs elsewhere stay under the slot's network policy."""
        for url in routes or []:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower()
            if host not in _LOOPBACK_NAMES:
                if host == "::1" or host.startswith("127."):
                    raise SandboxError(f"runtime {self.name}: {url}: a slot is bridged to 127.0.0.1 only")
                continue
            port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
            if port in self._bridged:
                continue
            try:
                await self._on_pool(self.sandbox.bridge(port, to_host="127.0.0.1", port=port))
            except SlotPoolError as exc:
                raise SandboxError(f"runtime {self.name}: cannot let the box reach {url}: {exc}") from exc
            self._bridged.add(port)

    async def expose(self, port: int) -> str:
        raise SandboxError(
            f"runtime {self.name}: a slot offers no service to the host (port {port}); "
            "host the tool server outside the box"
        )
