"""Faults a soak run (or a fault test) injects into a local pool's servers: SIGKILL of a server,
SIGSTOP for a while then SIGCONT, SIGKILL of one slot's runner. Each returns what it hit, or None
when there was nothing to hit."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections import Counter

from atropos.backends.local import LocalBackend
from atropos.host import command_line, signal_pids, snapshot
from atropos.slots import SlotPool

FAULT_KINDS = ("kill_server", "stop_server", "kill_runner")


class LocalFaults:
    def __init__(self, pool: SlotPool, rng: random.Random) -> None:
        assert isinstance(pool.backend, LocalBackend), "local faults need the local backend"
        self.pool = pool
        self.backend: LocalBackend = pool.backend
        self.rng = rng
        self.injected: Counter[str] = Counter()
        self._stopped: set[int] = set()

    def _server_pid(self) -> int | None:
        ids = self.pool.server_ids()
        if not ids:
            return None
        with contextlib.suppress(KeyError):
            return self.backend.pid(self.rng.choice(ids))
        return None

    async def inject(self, kind: str) -> str | None:
        if kind == "kill_server":
            pid = self._server_pid()
            if pid is None or not signal_pids((pid,), signal.SIGKILL):
                return None
            what = f"SIGKILL server pid {pid}"
        elif kind == "stop_server":
            pid = self._server_pid()
            if pid is None or not signal_pids((pid,), signal.SIGSTOP):
                return None
            pause = self.rng.uniform(0.5, 5.0)
            self._stopped.add(pid)
            try:
                await asyncio.sleep(pause)
            finally:
                signal_pids((pid,), signal.SIGCONT)
                self._stopped.discard(pid)
            what = f"SIGSTOP server pid {pid} for {pause:.1f}s"
        elif kind == "kill_runner":
            pid = self._runner_pid()
            if pid is None or not signal_pids((pid,), signal.SIGKILL):
                return None
            what = f"SIGKILL slot runner pid {pid}"
        else:
            raise ValueError(f"unknown fault {kind!r}")
        self.injected[kind] += 1
        return what

    def _runner_pid(self) -> int | None:
        servers = set()
        for sid in self.pool.server_ids():
            with contextlib.suppress(KeyError):
                servers.add(self.backend.pid(sid))
        runners = [
            p.pid
            for p in snapshot().values()
            if p.ppid in servers and any(k in command_line(p.pid) for k in ("atropos.sandbox.runner", "bwrap"))
        ]
        return self.rng.choice(runners) if runners else None

    def resume_all(self) -> None:
        """SIGCONT every server this injector froze (when a run is cut short)."""
        for pid in list(self._stopped):
            signal_pids((pid,), signal.SIGCONT)
