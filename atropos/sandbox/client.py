"""HTTP client of one sandbox server (the pool's, and Nomad's readiness probe): one pooled HTTP/1.1
connection set, per-call timeouts.

Nothing here is retried: a tool call that may have run is never sent twice. Transport failures
and a server that stopped answering become `SlotLost`; the server's own slot failures become
`SlotFailed`; refusals of the call itself become `InvalidToolCall`.

This is the hot path of every tool call, in the training process: it uses the small keep-alive
client of `atropos.sandbox.http` (measured here: httpx spent 0.76 ms of CPU per call, aiohttp's
client about 0.3 ms, most of the pool's overhead over the server itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from atropos.errors import InfrastructureError, InvalidToolCall, SlotFailed, SlotLost
from atropos.sandbox import tarsafe
from atropos.sandbox.http import HttpClient, HttpRefused, HttpSilent, HttpTransportError, HttpUnreachable
from atropos.sandbox.models import (
    BridgeResponse,
    ExecuteResult,
    ForkResponse,
    ImageResponse,
    OutputChunk,
    SnapshotInfo,
    StatusResponse,
    UploadResult,
)
from atropos.sandbox.streams import LoopReader, LoopWriter, ThreadPipe
from atropos.sandbox.tarsafe import Compression

# the server enforces a call's timeout, then gives the slot's runner 10 s more; past this margin
# on top of the call's own timeout the server itself is considered gone
CALL_MARGIN = 15.0


class ServerRefused(ConnectionError):
    """Nothing listens at the server's address any more."""


class ServerClient:
    def __init__(self, server_id: str, url: str, token: str | None, max_connections: int) -> None:
        self.server_id = server_id
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = HttpClient(self.url, headers=self._headers or None, keep=max_connections)
        self._streams: aiohttp.ClientSession | None = None  # tree transfers: streamed bodies, rare
        self.lost_reason = ""

    def mark_lost(self, reason: str) -> None:
        """The server is gone: its calls in flight fail now (SlotLost), and every later one at once."""
        if not self.lost_reason:
            self.lost_reason = reason
            self._http.abort_all(reason)

    async def aclose(self) -> None:
        await self._http.close()
        if self._streams is not None:
            await self._streams.close()

    async def answers(self, timeout: float) -> bool:
        """The server answers /health (its liveness; no token needed), within `timeout`."""
        try:
            await self.health(timeout)
        except (ServerRefused, HttpTransportError, InfrastructureError, asyncio.TimeoutError):
            return False
        return True

    async def reachable(self, timeout: float) -> bool:
        """Something at the server's address answers within `timeout`: the server, or its node's
        kernel (a refused connection: the server died; an accepted one without an answer: it
        hangs). A node that went silent (link down, powered off) does neither."""
        try:
            await self._http.request("GET", "/health", None, timeout)
        except (HttpSilent, HttpUnreachable):
            return False
        except (HttpTransportError, asyncio.TimeoutError):
            return True
        return True

    async def _get(self, path: str, timeout: float) -> tuple[int, bytes]:
        try:
            return await self._http.request("GET", path, None, timeout)
        except HttpRefused as exc:
            raise ServerRefused(f"server {self.server_id} at {self.url}: {exc}") from None

    async def health(self, timeout: float) -> dict[str, Any]:
        status, raw = await self._get("/health", timeout)
        if status != 200:
            raise InfrastructureError(f"server {self.server_id} /health: HTTP {status}")
        return dict(json.loads(raw))

    async def status(self, timeout: float) -> StatusResponse:
        """`GET /status`: what each slot runs now (needs the token)."""
        status, raw = await self._get("/status", timeout)
        return StatusResponse.model_validate(self._decode("/status", status, raw))

    async def _post(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """POST; a server declared lost fails its calls at once (mark_lost aborts those in flight)."""
        if self.lost_reason:
            raise SlotLost(f"server {self.server_id} is lost: {self.lost_reason}")
        data = json.dumps(body, separators=(",", ":")).encode()
        try:
            status, raw = await self._http.request("POST", path, data, timeout)
        except asyncio.TimeoutError:
            raise SlotLost(f"server {self.server_id} did not answer {path} within {timeout:.0f}s") from None
        except HttpTransportError as exc:
            if self.lost_reason:
                raise SlotLost(f"server {self.server_id} is lost: {self.lost_reason}") from None
            raise SlotLost(f"server {self.server_id} unreachable on {path}: {exc}") from None
        return self._decode(path, status, raw)

    def _decode(self, path: str, status: int, raw: bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except ValueError:
            data = {"error": raw[:500].decode(errors="replace")}
        if status == 200:
            return dict(data)
        message = f"server {self.server_id} {path}: HTTP {status}: {data.get('error')}"
        if status == 503 and data.get("stopping"):
            raise SlotLost(f"{message} (the server is shutting down)")
        if status in (409, 503):
            raise SlotFailed(message)
        if status in (400, 404, 413, 422):
            raise InvalidToolCall(f"{message} {data.get('detail') or ''}".rstrip())
        raise InfrastructureError(message)  # 401 (wrong token), 5xx

    async def execute(self, slot: int, tool: str, args: dict[str, Any], timeout: float) -> ExecuteResult:
        body = {"slot": slot, "tool": tool, "args": args, "timeout": timeout}
        return ExecuteResult.model_validate(await self._post("/execute", body, timeout + CALL_MARGIN))

    async def execute_stream(
        self, slot: int, tool: str, args: dict[str, Any], timeout: float
    ) -> AsyncIterator[OutputChunk | ExecuteResult]:
        """`execute` with `stream: true`: the output's pieces as they come, then the result."""
        body = json.dumps({"slot": slot, "tool": tool, "args": args, "timeout": timeout, "stream": True}).encode()
        async with self._streamed("POST", "/execute", {}, timeout + CALL_MARGIN, body) as answer:
            if answer.status != 200:
                self._decode("/execute", answer.status, await answer.read())
            async for line in _lines(answer):
                event = json.loads(line)
                if "chunk" in event:
                    yield OutputChunk.model_validate(event["chunk"])
                    continue
                if "result" in event:
                    yield ExecuteResult.model_validate(event["result"])
                    return
                self._decode("/execute", int(event.get("status") or 500), line)
        raise SlotLost(f"server {self.server_id} /execute: the stream ended before the call's result")

    async def batch(self, calls: list[dict[str, Any]]) -> list[ExecuteResult]:
        # calls on one slot run in series, slots in parallel: the slowest slot's sum bounds the wait
        per_slot: dict[int, float] = {}
        for call in calls:
            per_slot[call["slot"]] = per_slot.get(call["slot"], 0.0) + float(call["timeout"])
        data = await self._post("/batch", {"calls": calls}, max(per_slot.values(), default=0.0) + CALL_MARGIN)
        return [ExecuteResult.model_validate(r) for r in data["results"]]

    async def reset(self, slot: int, timeout: float = 60.0) -> dict[str, Any]:
        return await self._post("/reset", {"slot": slot}, timeout)

    # -- snapshots and forks (atropos.sandbox.server.snapshots) --------------------------------

    async def snapshot(self, slot: int, name: str, timeout: float) -> SnapshotInfo:
        return SnapshotInfo.model_validate(await self._post("/snapshot", {"slot": slot, "name": name}, timeout))

    async def fork(self, snapshot: str, slots: list[int], timeout: float) -> ForkResponse:
        return ForkResponse.model_validate(await self._post("/fork", {"snapshot": snapshot, "slots": slots}, timeout))

    async def use_image(self, slot: int, image: str, timeout: float) -> ImageResponse:
        """The slot starts over in a task's image (atropos.sandbox.image_slots)."""
        return ImageResponse.model_validate(await self._post("/image", {"slot": slot, "image": image}, timeout))

    async def bridge(self, slot: int, port: int, to_host: str, to_port: int, timeout: float) -> BridgeResponse:
        """A port of the slot's loopback relayed to `to_host:to_port` (atropos.sandbox.server.bridges)."""
        body = {"slot": slot, "port": port, "to_host": to_host, "to_port": to_port}
        return BridgeResponse.model_validate(await self._post("/bridge", body, timeout))

    # -- tree transfers: streamed both ways (see atropos.sandbox.server.transfer) ----------------

    def _session(self) -> aiohttp.ClientSession:
        if self._streams is None:
            self._streams = aiohttp.ClientSession(headers=self._headers, auto_decompress=False)
        return self._streams

    async def upload_tree(
        self, slot: int, source: str, path: str, timeout: float, compression: Compression = "zstd"
    ) -> UploadResult:
        """Pack the local directory `source` and unpack it into `path` of the slot (all or nothing)."""
        src = tarsafe.open_dir(source)

        def produce(out: LoopWriter) -> None:
            try:
                tarsafe.pack(src, out, compression)
            finally:
                os.close(src)

        pipe = ThreadPipe(produce)
        try:
            async with self._streamed("POST", "/upload", {"slot": str(slot), "path": path}, timeout, pipe) as answer:
                status, raw = answer.status, await answer.read()
        finally:
            await pipe.close()
        return UploadResult.model_validate(self._decode("/upload", status, raw))

    async def download_tree(self, slot: int, path: str, dest: str, timeout: float, max_bytes: int) -> tarsafe.Unpacked:
        """Unpack the slot's `path` into the local directory `dest` (made if missing)."""
        os.makedirs(dest, exist_ok=True)
        loop = asyncio.get_running_loop()
        query = {"slot": str(slot), "path": path, "compression": "zstd"}

        async with self._streamed("GET", "/download", query, timeout) as answer:
            if answer.status != 200:
                self._decode("/download", answer.status, await answer.read())
            target = tarsafe.open_dir(dest)
            try:
                reader = LoopReader(answer.content.read, loop)
                return await asyncio.to_thread(tarsafe.unpack, reader, target, tarsafe.TreeLimits(max_bytes))
            finally:
                os.close(target)

    @contextlib.asynccontextmanager
    async def _streamed(
        self, method: str, path: str, query: dict[str, str], timeout: float, body: ThreadPipe | bytes | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A request whose body or answer streams; transport failures and timeouts are SlotLost."""
        if self.lost_reason:
            raise SlotLost(f"server {self.server_id} is lost: {self.lost_reason}")
        try:
            async with self._session().request(
                method, self.url + path, params=query, data=body, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                yield response
        except asyncio.TimeoutError:
            raise SlotLost(f"server {self.server_id} did not finish {path} within {timeout:.0f}s") from None
        except aiohttp.ClientError as exc:
            raise SlotLost(f"server {self.server_id} unreachable on {path}: {exc}") from None


async def _lines(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The lines of an NDJSON answer, whatever their length (a call's result can be megabytes,
    beyond aiohttp's own line reader)."""
    pending = bytearray()
    async for piece in response.content.iter_any():
        scanned = len(pending)  # a long line is searched once, not again with each piece
        pending += piece
        while (end := pending.find(b"\n", scanned)) >= 0:
            yield bytes(pending[:end])
            del pending[: end + 1]
            scanned = 0
    if pending:
        yield bytes(pending)
