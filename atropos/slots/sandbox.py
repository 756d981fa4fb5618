"""One sandbox as an object: a leased slot with the calls an agent framework makes on it.

    async with pool.sandbox(image="docker-archive:/tasks/t1.tar", trajectory_id="t1") as sb:
        result = await sb.run("pytest -q", cwd="repo", env={"CI": "1"}, timeout=300)

`SlotPool.execute` stays what it was; this is a thin layer over it (and over `upload_tree`,
`download_tree`, `snapshot`, `fork`, `bridge`), for frameworks that hold a sandbox rather than a slot.
`atropos.slots.sync` is its synchronous twin.
"""

from __future__ import annotations

import asyncio
import base64
import os
from typing import TYPE_CHECKING, Any

from atropos.errors import InvalidToolCall
from atropos.sandbox.models import BridgeResponse, ExecuteResult, SnapshotInfo, UploadResult
from atropos.sandbox.tarsafe import Unpacked
from atropos.slots.leasing import Slot

if TYPE_CHECKING:
    from atropos.slots.pool import SlotPool

__all__ = ["Sandbox"]


class Sandbox:
    def __init__(self, pool: SlotPool, slot: Slot) -> None:
        self.pool = pool
        self.slot = slot
        self.closed = False

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def trajectory_id(self) -> str:
        return self.slot.trajectory_id

    async def run(
        self,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        user: str | None = None,
    ) -> ExecuteResult:
        """`bash -c command` in a fresh shell: `cwd` relative to the workspace (or absolute), `env`
        added for this command. `user`: a slot runs everything as its own unprivileged user; any
        other is refused rather than ignored."""
        return await self.pool.execute(self.slot, "bash", self._args(command, cwd, env, user), timeout)

    async def session(
        self, command: str, cwd: str | None = None, env: dict[str, str] | None = None, timeout: float | None = None
    ) -> ExecuteResult:
        """The command in the sandbox's persistent shell (its directory and variables last between
        calls; with `cwd` or `env`, in a subshell of it)."""
        return await self.pool.execute(self.slot, "bash_session", self._args(command, cwd, env, None), timeout)

    async def read(self, path: str, *, binary: bool = False) -> str | bytes:
        """A file of the workspace (relative path, or absolute inside it)."""
        args = {"path": path, "encoding": "base64" if binary else "text"}
        result = await self.pool.execute(self.slot, "read_file", args)
        if not result.ok:
            raise InvalidToolCall(f"read {path}: {result.error or result.output}")
        return base64.b64decode(result.output) if binary else result.output

    async def write(self, path: str, content: str | bytes, mode: int | None = None) -> None:
        """Write a file of the workspace (its directories made); `mode` e.g. 0o755."""
        args: dict[str, Any] = {"path": path}
        if isinstance(content, bytes):
            args.update(content=base64.b64encode(content).decode("ascii"), encoding="base64")
        else:
            args["content"] = content
        if mode is not None:
            args["mode"] = mode
        result = await self.pool.execute(self.slot, "write_file", args)
        if not result.ok:
            raise InvalidToolCall(f"write {path}: {result.error or result.output}")

    async def upload(self, source: str, path: str = ".") -> UploadResult | None:
        """A local file or directory into the workspace: a directory's tree into `path`, a file to `path`."""
        local = await asyncio.to_thread(_read_local, source)
        if local is None:
            return await self.pool.upload_tree(self.slot, source, path)
        await self.write(path, local[0], mode=local[1])
        return None

    async def download(self, path: str, dest: str, *, tree: bool = False) -> Unpacked | None:
        """A file of the workspace to the local file `dest`, or with `tree` a directory's tree into
        the local directory `dest`."""
        if tree:
            return await self.pool.download_tree(self.slot, path, dest)
        data = await self.read(path, binary=True)
        assert isinstance(data, bytes)
        await asyncio.to_thread(_write_local, dest, data)
        return None

    async def snapshot(self, name: str) -> SnapshotInfo:
        """Keep the workspace as it is now, as `name` (on this sandbox's server)."""
        return await self.pool.snapshot(self.slot, name)

    async def fork(self, name: str, trajectory_id: str | None = None) -> Sandbox:
        """A new sandbox starting from this one's snapshot `name`; close it as any other."""
        return Sandbox(self.pool, await self.pool.fork(self.slot, name, trajectory_id))

    async def bridge(self, to_port: int, to_host: str = "127.0.0.1", port: int = 0) -> BridgeResponse:
        """Let the sandbox reach the one service `to_host:to_port` (as its server's node reaches it)
        at the answer's `host:port`; see `SlotPool.bridge`. Closed with the sandbox."""
        return await self.pool.bridge(self.slot, to_port, to_host, port)

    async def close(self) -> None:
        """Give the slot back (it is reset before anyone else gets it); closing twice does nothing."""
        if not self.closed:
            self.closed = True
            self.pool.release(self.slot)

    def _args(self, command: str, cwd: str | None, env: dict[str, str] | None, user: str | None) -> dict[str, Any]:
        if user is not None:
            raise InvalidToolCall(
                f"user {user!r}: a sandbox runs every command as its own unprivileged user; pass user=None"
            )
        args: dict[str, Any] = {"command": command}
        if cwd is not None:
            args["cwd"] = cwd
        if env:
            args["env"] = dict(env)
        return args


def _read_local(source: str) -> tuple[bytes, int] | None:
    """A local file's bytes and mode; None for a directory."""
    if os.path.isdir(source):
        return None
    with open(source, "rb") as fh:
        return fh.read(), os.fstat(fh.fileno()).st_mode & 0o777


def _write_local(dest: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with open(dest, "wb") as fh:
        fh.write(data)
