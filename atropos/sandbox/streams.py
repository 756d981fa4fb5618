"""Byte streams of the event loop (a request body, a response, a queue) as blocking `read(n)` and
`write(data)` for a worker thread that packs or unpacks a tar stream (atropos.sandbox.tarsafe).

Each read or write runs the loop's coroutine and waits for it, so the thread goes at the pace of
the network in both directions and nothing is buffered beyond one piece."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

PIECE = 256 * 1024


def _wait(loop: asyncio.AbstractEventLoop, awaitable: Awaitable[Any]) -> Any:
    async def run() -> Any:
        return await awaitable

    coro: Coroutine[Any, Any, Any] = run()
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


class LoopReader:
    """`read(n)` of `receive(n)`, a coroutine of `loop` that returns up to n bytes (b"" at the end)."""

    def __init__(self, receive: Callable[[int], Awaitable[bytes]], loop: asyncio.AbstractEventLoop) -> None:
        self.receive = receive
        self.loop = loop
        self.ended = False  # readers ask again at the end (gzip, tarfile): the stream is not asked twice

    def read(self, n: int = -1) -> bytes:
        if self.ended:
            return b""
        data: bytes = _wait(self.loop, self.receive(n if n > 0 else PIECE))
        self.ended = not data
        return data


class LoopWriter:
    """`write(data)` through `send(piece)`, a coroutine of `loop`, in pieces of about PIECE bytes."""

    def __init__(self, send: Callable[[bytes], Awaitable[Any]], loop: asyncio.AbstractEventLoop) -> None:
        self.send = send
        self.loop = loop
        self.pending = bytearray()
        self.sent = 0

    def write(self, data: bytes) -> int:
        self.pending += data
        if len(self.pending) >= PIECE:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.pending:
            piece, self.pending = bytes(self.pending), bytearray()
            _wait(self.loop, self.send(piece))
            self.sent += len(piece)


class ThreadPipe:
    """Bytes that `produce(writer)` writes in a worker thread, read by the loop as an async iterator
    (an upload's body). `close()` ends it either way: a reader that stopped early (the server
    refused the upload) makes the producer's next write fail instead of blocking it forever."""

    def __init__(self, produce: Callable[[LoopWriter], None], depth: int = 4) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(depth)
        self._abandoned = False
        self._produce = produce
        self._task: asyncio.Future[None] | None = None

    async def _put(self, piece: bytes) -> None:
        if self._abandoned:
            raise BrokenPipeError("the stream's reader went away")
        await self._queue.put(piece)

    async def _run(self) -> None:
        writer = LoopWriter(self._put, asyncio.get_running_loop())

        def work() -> None:
            self._produce(writer)
            writer.flush()

        try:
            await asyncio.to_thread(work)
        finally:
            if not self._abandoned:
                await self._queue.put(None)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        while (piece := await self._queue.get()) is not None:
            yield piece
        await self._task  # the producer's error, if it failed

    async def close(self) -> None:
        """Wait for the producer to stop; its error (not one of being abandoned) is raised here."""
        if self._task is None:
            return
        self._abandoned = True
        while not self._task.done():
            while not self._queue.empty():
                self._queue.get_nowait()
            await asyncio.wait([self._task], timeout=0.05)
        exc = self._task.exception()
        if exc is not None and not isinstance(exc, BrokenPipeError):
            raise exc
