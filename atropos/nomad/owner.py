"""Which process owns a sandbox job, and whether that process is still alive.

Every job carries its owner in `Meta` (host name, pid, the process's start time and the kernel boot
id). A pool that crashed without stopping its job leaves it running; the next pool on the same host
finds such jobs with `owner_state(meta) == "dead"` and stops them. Jobs owned by another host are
`"unknown"` and left alone: this host cannot see that process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["OWNER_META_KEYS", "OwnerMeta", "OwnerState", "owner_state"]

OwnerState = Literal["alive", "dead", "unknown"]

_HOST = "atropos_owner_host"
_PID = "atropos_owner_pid"
_STARTED = "atropos_owner_started"
_BOOT = "atropos_owner_boot_id"
OWNER_META_KEYS = (_HOST, _PID, _STARTED, _BOOT)

# /proc start times are in clock ticks: two readings of the same process agree to the tick, so a
# larger difference means the pid now belongs to another process.
_START_TOLERANCE_S = 1.0


class OwnerMeta(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str
    pid: int
    started: float | None = None
    """Unix time the owner process started (None where /proc is unavailable)."""
    boot_id: str | None = None

    @classmethod
    def current(cls) -> OwnerMeta:
        pid = os.getpid()
        return cls(host=socket.gethostname(), pid=pid, started=process_start_time(pid),
                   boot_id=boot_id())

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
    if not _pid_exists(owner.pid):
        return "dead"
    if owner.started is not None:
        now_started = process_start_time(owner.pid)
        if now_started is not None and abs(now_started - owner.started) > _START_TOLERANCE_S:
            return "dead"  # pid reused by another process
    return "alive"


def _pid_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def process_start_time(pid: int) -> float | None:
    """Unix time at which `pid` started, from /proc (None when unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
        with open("/proc/stat", encoding="ascii") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    # fields after the parenthesised command name; starttime is field 22 of the whole line
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        ticks = int(fields[19])
    except (IndexError, ValueError):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")

