"""What a backend is: the way sandbox servers come to exist, and go away, for a SlotPool."""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass

from atropos.drivers import DriverConfig
from atropos.progress import Progress, no_progress
from atropos.sandbox.settings import ServerSettings


@dataclass(frozen=True)
class ServerSpec:
    """What every server of a pool is, whichever backend starts it: its driver, its settings (slots,
    isolation, network, timeouts, limits; where it listens and keeps its data is the backend's
    choice), the user that whatever starts as root becomes (None: stay), and how long it may take."""

    driver: DriverConfig
    settings: ServerSettings
    run_as: str | None = "nobody"
    start_timeout: float = 300.0

    def server_args(self, *, host: str, port: int | str, data_dir: str, token_file: str | None = None) -> list[str]:
        """The server's command-line options, listening on `host:port`, its data in `data_dir`."""
        return self.settings.placed(host=host, port=port, data_dir=data_dir, token_file=token_file).to_args()


@dataclass(frozen=True)
class ServerInfo:
    server_id: str
    url: str
    token: str
    slots: int


class SandboxBackend(abc.ABC):
    """Starts and stops sandbox servers. The pool decides how many; the backend makes it so."""

    name: str = "backend"

    @abc.abstractmethod
    async def add_servers(self, count: int, progress: Progress = no_progress) -> list[ServerInfo]:
        """Bring up `count` more servers and return them once they answer /health."""

    @abc.abstractmethod
    async def remove_server(self, server_id: str) -> None:
        """Stop one server (its slots were drained from the pool first)."""

    async def replace_server(self, server_id: str, progress: Progress = no_progress) -> list[ServerInfo]:
        """A server was lost: make its capacity come back. Default: stop what is left, start anew."""
        await self.remove_server(server_id)
        return await self.add_servers(1, progress)

    def pick_removable(self, idle: list[str]) -> str | None:
        """Which of these idle servers (longest idle first) a scale-down may stop, if any. A backend
        that cannot choose which server goes (Nomad stops the highest group) must say so here."""
        return idle[0] if idle else None

    def exited(self, server_id: str) -> asyncio.Future[None] | None:
        """A future done when the server's process ends, where the backend can see it (local)."""
        return None

    def ends_in(self, server_id: str) -> float | None:
        """Seconds until the backend stops this server whatever it runs (a SLURM job's time limit),
        where there is such an end and it is known; None otherwise. Read on every call: no I/O."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop every server this backend started, leaving no process, container or job behind."""
