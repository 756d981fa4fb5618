"""HTTP client of one sandbox server: one pooled HTTP/1.1 connection set, per-call timeouts.

Nothing here is retried: a tool call that may have run is never sent twice. Transport failures
and a server that stopped answering become `SlotLost`; the server's own slot failures become
`SlotFailed`; refusals of the call itself become `InvalidToolCall`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from atropos.sandbox.models import ExecuteResult
from atropos.slots.errors import InfrastructureError, InvalidToolCall, SlotFailed, SlotLost

# the server enforces a call's timeout, then gives the slot's runner 10 s more; past this margin
# on top of the call's own timeout the server itself is considered gone
CALL_MARGIN = 15.0


class ServerClient:
    def __init__(self, server_id: str, url: str, token: str, max_connections: int) -> None:
        self.server_id = server_id
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(30.0, connect=5.0),
        )
        self.lost = asyncio.Event()
        self.lost_reason = ""

    def mark_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def health(self, timeout: float) -> dict[str, Any]:
        r = await self._http.get("/health", timeout=timeout)
        r.raise_for_status()
        return dict(r.json())

    async def _post(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """POST racing the server's liveness: a server declared lost fails its calls at once."""
        if self.lost.is_set():
            raise SlotLost(f"server {self.server_id} is lost: {self.lost_reason}")
        request = asyncio.ensure_future(self._http.post(path, json=body, timeout=timeout))
        request.add_done_callback(_consume)
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            await asyncio.wait({request, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if not request.done():
            request.cancel()
            raise SlotLost(f"server {self.server_id} is lost: {self.lost_reason}")
        try:
            response = request.result()
        except httpx.TimeoutException:
            raise SlotLost(f"server {self.server_id} did not answer {path} within {timeout:.0f}s") from None
        except httpx.TransportError as exc:
            raise SlotLost(f"server {self.server_id} unreachable on {path}: {exc!r}") from None
        return self._decode(path, response)

    def _decode(self, path: str, response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            data = {"error": response.text[:500]}
        status = response.status_code
        if status == 200:
            return dict(data)
        message = f"server {self.server_id} {path}: HTTP {status}: {data.get('error')}"
        if status in (409, 503):
            raise SlotFailed(message)
        if status in (400, 404, 413, 422):
            raise InvalidToolCall(f"{message} {data.get('detail') or ''}".rstrip())
        raise InfrastructureError(message)  # 401 (wrong token), 5xx

    async def execute(self, slot: int, tool: str, args: dict[str, Any], timeout: float) -> ExecuteResult:
        body = {"slot": slot, "tool": tool, "args": args, "timeout": timeout}
        return ExecuteResult.model_validate(await self._post("/execute", body, timeout + CALL_MARGIN))

    async def batch(self, calls: list[dict[str, Any]]) -> list[ExecuteResult]:
        # calls on one slot run in series, slots in parallel: the slowest slot's sum bounds the wait
        per_slot: dict[int, float] = {}
        for call in calls:
            per_slot[call["slot"]] = per_slot.get(call["slot"], 0.0) + float(call["timeout"])
        data = await self._post("/batch", {"calls": calls}, max(per_slot.values(), default=0.0) + CALL_MARGIN)
        return [ExecuteResult.model_validate(r) for r in data["results"]]

    async def reset(self, slot: int, timeout: float = 60.0) -> dict[str, Any]:
        return await self._post("/reset", {"slot": slot}, timeout)


def _consume(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned request's error as seen (the caller already got SlotLost)."""
    if not task.cancelled():
        task.exception()
