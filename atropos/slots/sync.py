"""The pool and its sandboxes for synchronous code (mini-swe-agent, a thread per rollout).

    with SyncSlotPool(SlotPoolConfig(...)) as pool:
        with pool.sandbox(trajectory_id="t1") as sb:
            print(sb.run("echo hi").output)

The pool lives on an event loop of its own, in a thread the twin starts; every method hands its
coroutine to that loop and waits for the answer. Any number of threads may call at once, and a
caller that runs an event loop itself (a notebook, an async framework calling synchronous code) is
never asked to nest one: its thread only waits. A call from the pool's own loop thread would wait
for itself, and is refused.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from atropos.progress import Progress, no_progress
from atropos.sandbox.models import BridgeResponse, ExecuteResult, SnapshotInfo, UploadResult
from atropos.sandbox.tarsafe import Unpacked
from atropos.slots.config import SlotPoolConfig
from atropos.slots.pool import SlotPool
from atropos.slots.sandbox import Sandbox
from atropos.slots.stats import PoolStats

__all__ = ["SyncSandbox", "SyncSlotPool"]

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        # its own thread pool (the pool's blocking work: files, killing process trees); importing
        # concurrent.futures here also registers the interpreter's exit hook for thread pools before
        # any hook that closes a pool at exit, so that one runs first (hooks run newest first)
        self.loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="atropos-pool"))
        self.thread = threading.Thread(target=self.loop.run_forever, name="atropos-pool-loop", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError(
                "a synchronous pool method was called on the pool's own loop (its thread): await the async one"
            )
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        if not self.thread.is_alive():
            self.loop.close()


class SyncSlotPool:
    def __init__(self, config: SlotPoolConfig | None = None, *, progress: Progress = no_progress) -> None:
        self._runner = _LoopThread()

        async def make() -> SlotPool:
            return SlotPool(config, progress=progress)

        self.pool = self._runner.call(make())  # made on its loop: its locks and tasks belong there

    def __enter__(self) -> SyncSlotPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The pool's own event loop, running in its thread (for awaiting the async API there)."""
        return self._runner.loop

    def start(self) -> None:
        self._runner.call(self.pool.start())

    def close(self) -> None:
        """Close the pool (every server stopped) and end its loop thread; closing twice does nothing."""
        if self._runner.thread.is_alive():
            try:
                self._runner.call(self.pool.close())
            finally:
                self._runner.stop()

    def open_sandbox(
        self,
        trajectory_id: str | None = None,
        timeout: float | None = None,
        *,
        image: str | None = None,
        from_snapshot: str | None = None,
    ) -> SyncSandbox:
        opened = self.pool.open_sandbox(trajectory_id, timeout, image=image, from_snapshot=from_snapshot)
        return SyncSandbox(self._runner, self._runner.call(opened))

    @contextmanager
    def sandbox(
        self,
        trajectory_id: str | None = None,
        timeout: float | None = None,
        *,
        image: str | None = None,
        from_snapshot: str | None = None,
    ) -> Iterator[SyncSandbox]:
        sandbox = self.open_sandbox(trajectory_id, timeout, image=image, from_snapshot=from_snapshot)
        try:
            yield sandbox
        finally:
            sandbox.close()

    def stats(self) -> PoolStats:
        return self.pool.stats()


class SyncSandbox:
    """`atropos.slots.sandbox.Sandbox`, each method waiting for its answer."""

    def __init__(self, runner: _LoopThread, sandbox: Sandbox) -> None:
        self._runner = runner
        self.sandbox = sandbox

    def __enter__(self) -> SyncSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def trajectory_id(self) -> str:
        return self.sandbox.trajectory_id

    def run(
        self,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        user: str | None = None,
    ) -> ExecuteResult:
        return self._runner.call(self.sandbox.run(command, cwd, env, timeout, user))

    def session(
        self, command: str, cwd: str | None = None, env: dict[str, str] | None = None, timeout: float | None = None
    ) -> ExecuteResult:
        return self._runner.call(self.sandbox.session(command, cwd, env, timeout))

    def read(self, path: str, *, binary: bool = False) -> str | bytes:
        return self._runner.call(self.sandbox.read(path, binary=binary))

    def write(self, path: str, content: str | bytes, mode: int | None = None) -> None:
        self._runner.call(self.sandbox.write(path, content, mode))

    def upload(self, source: str, path: str = ".") -> UploadResult | None:
        return self._runner.call(self.sandbox.upload(source, path))

    def download(self, path: str, dest: str, *, tree: bool = False) -> Unpacked | None:
        return self._runner.call(self.sandbox.download(path, dest, tree=tree))

    def snapshot(self, name: str) -> SnapshotInfo:
        return self._runner.call(self.sandbox.snapshot(name))

    def fork(self, name: str, trajectory_id: str | None = None) -> SyncSandbox:
        return SyncSandbox(self._runner, self._runner.call(self.sandbox.fork(name, trajectory_id)))

    def bridge(self, to_port: int, to_host: str = "127.0.0.1", port: int = 0) -> BridgeResponse:
        return self._runner.call(self.sandbox.bridge(to_port, to_host, port))

    def close(self) -> None:
        self._runner.call(self.sandbox.close())
