"""The servers a pool has: admitting them (their slots go into the lease book), losing them
(their slots fail with SlotLost) and replacing what was lost, through the backend; retiring a
server its backend will stop (a time limit): its replacement starts at once, its slots leave as
their trajectories give them back, and the server goes when the last one has.

The pool's `Background` (atropos.host.background) runs its tasks (resets, replacements, loops), so
that closing cancels them all.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from atropos.backends.base import SandboxBackend, ServerInfo
from atropos.host.background import Background
from atropos.progress import Progress
from atropos.sandbox.client import ServerClient
from atropos.slots.admission import IsolationRefused, refusal
from atropos.slots.config import SlotPoolConfig
from atropos.slots.leasing import LeaseBook, SlotState, SlotStatus
from atropos.slots.stats import StatsRecorder

log = logging.getLogger("atropos.slots")

_REPLACE_BACKOFF = 5.0  # seconds before the next try, times the tries so far, up to _REPLACE_BACKOFF_MAX
_REPLACE_BACKOFF_MAX = 60.0


@dataclass(eq=False)
class Member:
    """One server of the pool, with the pooled client its calls use."""

    info: ServerInfo
    client: ServerClient
    last_ok: float
    idle_since: float
    health: dict[str, Any]  # /health when it joined: what it enforces
    retiring: bool = False  # its backend stops it soon: a replacement is on its way


class Fleet:
    def __init__(
        self,
        config: SlotPoolConfig,
        backend: SandboxBackend,
        book: LeaseBook,
        stats: StatsRecorder,
        background: Background,
        progress: Progress,
    ) -> None:
        self.config = config
        self.backend = backend
        self.book = book
        self.stats = stats
        self.background = background
        self.progress = progress
        self.members: dict[str, Member] = {}
        self.replacing = 0  # lost or retiring servers whose replacement is on its way
        self.replace_error: str | None = None  # why the newest try to replace one failed (None: none failed)
        self.closed = False
        book.on_emptied = self._emptied

    def __len__(self) -> int:
        return len(self.members)

    async def admit(self, infos: Sequence[ServerInfo]) -> None:
        """Hand out the slots of these servers; a server with weaker isolation than configured is
        stopped instead, and IsolationRefused raised once the others are in."""
        clients = {
            info.server_id: ServerClient(info.server_id, info.url, info.token, max_connections=info.slots + 4)
            for info in infos
        }
        healths = await asyncio.gather(
            *(c.health(timeout=self.config.health_timeout) for c in clients.values()), return_exceptions=True
        )
        refused: dict[str, str] = {}
        admitted: list[ServerInfo] = []
        now = time.monotonic()
        for info, answer in zip(infos, healths, strict=True):
            health = answer if isinstance(answer, dict) else {}  # unanswered: the health watch decides
            why = refusal(self.config, info.server_id, health)
            if why is not None:
                refused[info.server_id] = why
                log.error("event=server_refused server=%s reason=%s", info.server_id, why)
                await clients[info.server_id].aclose()
                await self.backend.remove_server(info.server_id)
                continue
            admitted.append(info)
            self.members[info.server_id] = Member(info, clients[info.server_id], now, now, health)
            exited = self.backend.exited(info.server_id)
            if exited is not None:
                exited.add_done_callback(functools.partial(self._on_exit, info.server_id))
        # interleave servers so consecutive acquires spread over containers
        per_server = [[SlotState(info.server_id, i) for i in range(info.slots)] for info in admitted]
        width = max((len(p) for p in per_server), default=0)
        self.book.add([p[i] for i in range(width) for p in per_server if i < len(p)])
        if refused:
            raise IsolationRefused("; ".join(refused.values()))

    def _on_exit(self, server_id: str, _exited: object = None) -> None:
        if not self.closed:
            self.lose(server_id, "its process exited")

    def lose(self, server_id: str, reason: str) -> None:
        """The server is gone: its slots fail with SlotLost at once, and a replacement starts."""
        member = self.members.pop(server_id, None)
        if member is None or self.closed:
            return
        member.client.mark_lost(reason)  # in-flight calls fail now, not at their timeout
        slots = self.book.remove_server(server_id, SlotStatus.LOST)
        leased = sum(1 for st in slots if st.lease_id)
        self.stats.counters["servers_lost"] += 1
        log.error("event=server_lost server=%s reason=%s slots=%d leased=%d", server_id, reason, len(slots), leased)
        if member.retiring:  # its replacement is on its way already
            self.progress(f"server {server_id} lost while retiring ({reason}); {leased} leased slot(s) fail")
            self.background.spawn(self._stop(member))
            return
        self.progress(f"server {server_id} lost ({reason}); {leased} leased slot(s) fail with SlotLost; replacing it")
        self._replace(server_id, lambda: self.backend.replace_server(server_id, self.progress), member)

    def retire(self, server_id: str, why: str) -> None:
        """Its backend stops this server soon: start its replacement now, hand out none of its slots
        again, and stop it once its trajectories have given every slot back."""
        member = self.members.get(server_id)
        if member is None or member.retiring or self.closed:
            return
        member.retiring = True
        self.stats.counters["servers_retired"] += 1
        out = self.book.retire_server(server_id)
        log.warning("event=server_retiring server=%s reason=%s leased=%d", server_id, why, out)
        self.progress(f"server {server_id} retiring ({why}): no new leases, {out} slot(s) out; replacement starting")
        self._replace(server_id, lambda: self.backend.add_servers(1, self.progress))

    def _emptied(self, server_id: str) -> None:
        member = self.members.get(server_id)
        if member is not None and member.retiring and not self.closed:
            self.background.spawn(self.drain(server_id, "retired: every slot came back"))

    async def _stop(self, member: Member) -> None:
        await member.client.aclose()
        await self.backend.remove_server(member.info.server_id)

    def _replace(self, sid: str, start: Callable[[], Awaitable[list[ServerInfo]]], lost: Member | None = None) -> None:
        """Start a server in place of `sid` (lost, or retiring): counted as coming at once, so that
        the scaler does not start another meanwhile."""
        self.replacing += 1
        self.background.spawn(self._bring_back(sid, start, lost))

    async def _bring_back(
        self, sid: str, start: Callable[[], Awaitable[list[ServerInfo]]], lost: Member | None
    ) -> None:
        try:
            if lost is not None:
                await lost.client.aclose()
            attempt = 0
            infos: list[ServerInfo] | None = None
            while infos is None and not self.closed:  # until it is back: short of capacity, it says so and keeps trying
                attempt += 1
                try:
                    infos = await start()
                except Exception as exc:
                    delay = min(_REPLACE_BACKOFF * attempt, _REPLACE_BACKOFF_MAX)
                    self.replace_error = f"server {sid}: {exc}"
                    log.error("event=replace_failed server=%s attempt=%d error=%s", sid, attempt, exc)
                    self.progress(
                        f"could not replace server {sid} (attempt {attempt}): {exc}; running short: "
                        f"{len(self.book.slots)} slots on {len(self.members)} server(s); next try in {delay:g}s"
                    )
                    await asyncio.sleep(delay)
            if infos is None or self.closed:
                return
            await self.admit(infos)
            if self.replacing == 1:
                self.replace_error = None
            self.progress(f"capacity back: {len(self.book.slots)} slots on {len(self.members)} server(s)")
        finally:
            self.replacing -= 1

    async def drain(self, server_id: str, why: str) -> None:
        """Take the server out (its slots first, then the server itself): a scale-down, a retirement."""
        member = self.members.pop(server_id, None)
        if member is None:
            return
        self.book.remove_server(server_id, SlotStatus.DRAINING)
        member.client.mark_lost(why)
        await member.client.aclose()
        await self.backend.remove_server(server_id)

    async def close(self) -> None:
        self.closed = True
        for member in self.members.values():
            member.client.mark_lost("the pool is closed")
            await member.client.aclose()
        self.members.clear()
        await self.backend.close()
