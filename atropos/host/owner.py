"""Which process owns something a pool started (a Nomad job, a local server's record), and whether
that process is still alive.

The owner is written as a flat string map (a Nomad job's `Meta`, a record's `owner`): host name,
pid, the process's start time and the kernel boot id. A pool that crashed without cleaning up
leaves its things behind; the next pool on the same host finds them with `owner_state(meta) ==
"dead"` and removes them. Things owned on another host are `"unknown"` and left alone: this host
cannot see that process. Standard library only.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from atropos.host.procs import boot_id, pid_exists, same_process, start_time

__all__ = ["OWNER_META_KEYS", "OwnerMeta", "OwnerState", "owner_state"]

OwnerState = Literal["alive", "dead", "unknown"]

_HOST = "atropos_owner_host"
_PID = "atropos_owner_pid"
_STARTED = "atropos_owner_started"
_BOOT = "atropos_owner_boot_id"
OWNER_META_KEYS = (_HOST, _PID, _STARTED, _BOOT)


@dataclass(frozen=True)
class OwnerMeta:
    host: str
    pid: int
    started: float | None = None
    """Unix time the owner process started (None where /proc is unavailable)."""
    boot_id: str | None = None

    @classmethod
    def current(cls) -> OwnerMeta:
        pid = os.getpid()
        return cls(host=socket.gethostname(), pid=pid, started=start_time(pid), boot_id=boot_id())

    def to_meta(self) -> dict[str, str]:
        meta = {_HOST: self.host, _PID: str(self.pid)}
        if self.started is not None:
            meta[_STARTED] = f"{self.started:.2f}"
        if self.boot_id is not None:
            meta[_BOOT] = self.boot_id
        return meta

    @classmethod
    def from_meta(cls, meta: Mapping[str, str] | None) -> OwnerMeta | None:
        """The owner recorded in a job's Meta, or None for a job without one."""
        if not meta or _HOST not in meta or _PID not in meta:
            return None
        try:
            started = float(meta[_STARTED]) if _STARTED in meta else None
            return cls(host=meta[_HOST], pid=int(meta[_PID]), started=started, boot_id=meta.get(_BOOT))
        except ValueError:
            return None


def owner_state(meta: Mapping[str, str] | None, *, host: str | None = None) -> OwnerState:
    """`alive`/`dead` for a job owned by a process of this host, `unknown` otherwise."""
    owner = OwnerMeta.from_meta(meta)
    if owner is None or owner.host != (host or socket.gethostname()):
        return "unknown"
    if owner.boot_id is not None and boot_id() not in (None, owner.boot_id):
        return "dead"  # the machine rebooted since: every process of then is gone
    if not pid_exists(owner.pid) or not same_process(owner.pid, owner.started):
        return "dead"  # gone, or the pid was reused by another process
    return "alive"
