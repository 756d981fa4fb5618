"""Local sandbox servers never outlive the pool that started them.

Two mechanisms, because either alone leaves gaps:

- Each server is started with `PR_SET_PDEATHSIG = SIGKILL` (`die_with_owner`): when the owner
  process dies, even by SIGKILL, the kernel kills the server at once, whose slot runners and
  sandboxes die with it (they hold the same setting towards the server).
- Each server has a record in a per-user state directory (owner pid, start time and boot id; the
  server's pid and start time; its data dir and container name). A record whose owner is dead is
  stale: the next LocalBackend, or `atropos-sandbox cleanup --local`, kills what is left of that
  server (a docker container, processes that escaped the first mechanism) and deletes its files.

Nothing unrelated is ever killed because a pid was reused: a process counts as the server's only
if its start time is the recorded one, as a member of the server's session only while that session
cannot have been reused, or when its command line or working directory lies inside the server's
own (randomly named) data dir.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import asdict, dataclass, field

from atropos.host import OwnerMeta, kill_trees, owner_state, same_process, snapshot, start_time, tree_members

log = logging.getLogger("atropos.backends.local")

STATE_DIR_ENV = "ATROPOS_SANDBOX_STATE_DIR"


def state_dir() -> str:
    """Where this user's server records live: $ATROPOS_SANDBOX_STATE_DIR, else a private
    directory under $XDG_RUNTIME_DIR or the temp dir."""
    configured = os.environ.get(STATE_DIR_ENV)
    if configured:
        return configured
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"atropos-sandbox-{os.getuid()}", "local-servers")


@dataclass
class ServerRecord:
    server_id: str
    pid: int
    started: float | None
    data_dir: str
    workdir: str
    own_workdir: bool
    container: str | None = None
    owner: dict[str, str] = field(default_factory=lambda: OwnerMeta.current().to_meta())
    path: str = ""

    @classmethod
    def for_process(
        cls, server_id: str, pid: int, *, data_dir: str, workdir: str, own_workdir: bool, container: str | None
    ) -> ServerRecord:
        return cls(server_id, pid, start_time(pid), data_dir, workdir, own_workdir, container)

    def save(self) -> None:
        directory = state_dir()
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(directory, f"{os.getpid()}-{uuid.uuid4().hex[:8]}-{self.server_id}.json")
        body = {k: v for k, v in asdict(self).items() if k != "path"}
        temporary = self.path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as fh:
            json.dump(body, fh)
        os.replace(temporary, self.path)

    def delete(self) -> None:
        if self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    @property
    def owner_dead(self) -> bool:
        return owner_state(self.owner) == "dead"


def load_records() -> list[ServerRecord]:
    directory = state_dir()
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    records = []
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8") as fh:
                record = ServerRecord(**json.load(fh))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("event=bad_server_record path=%s error=%s", path, exc)
            continue
        record.path = path
        records.append(record)
    return records


@dataclass
class Reaped:
    """What cleaning up after one dead owner's server removed (or, in a dry run, would remove)."""

    server_id: str
    owner_pid: str
    pids: list[int]
    container: str | None
    paths: list[str]

    def describe(self) -> str:
        parts = [f"{len(self.pids)} process(es)" + (f" {sorted(self.pids)}" if self.pids else "")]
        if self.container:
            parts.append(f"container {self.container}")
        parts.extend(self.paths)
        return f"server {self.server_id} of dead pool pid {self.owner_pid}: " + ", ".join(parts)


def leftover_pids(record: ServerRecord) -> set[int]:
    """Live processes that belong to the recorded server (see the module's docstring)."""
    procs = snapshot()
    found: set[int] = set()
    server = procs.get(record.pid)
    same_server = server is not None and same_process(record.pid, record.started)
    if same_server:
        found |= tree_members(record.pid, procs, include_root=True)
    elif server is None:
        # the leader is gone; while a process still sits in its session, Linux cannot hand the
        # pid out again, so every member of that session is one the server left behind
        found |= {p.pid for p in procs.values() if p.sid == record.pid}
    data_dir = record.data_dir.rstrip("/")
    for pid in procs:
        if pid not in found and _inside(pid, data_dir):
            found.add(pid)
    found.discard(os.getpid())
    return found


def _inside(pid: int, data_dir: str) -> bool:
    """The process names the data dir on its command line, or works inside it."""
    d = data_dir.encode()
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            args = fh.read().split(b"\0")
        if any(a == d or d + b"/" in a or d + b":" in a for a in args):
            return True
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return cwd == data_dir or cwd.startswith(data_dir + "/")


def _remove_container(name: str) -> None:
    if shutil.which("docker") is None:
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["docker", "rm", "-f", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30, check=False
        )


def reap(record: ServerRecord, *, dry_run: bool = False) -> Reaped:
    """Kill what is left of a dead owner's server and delete its files and record."""
    pids = leftover_pids(record)
    paths = [p for p in (record.data_dir,) if os.path.exists(p)]
    result = Reaped(record.server_id, record.owner.get("atropos_owner_pid", "?"), sorted(pids), record.container, paths)
    if dry_run:
        return result
    if record.container:
        _remove_container(record.container)
    kill_trees(pids)
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    record.delete()
    return result


def reap_dead_owners(*, dry_run: bool = False) -> list[Reaped]:
    """Clean up every server whose owner process is dead (on this host); live pools are untouched."""
    records = load_records()
    stale = [r for r in records if r.owner_dead]
    reaped = [reap(r, dry_run=dry_run) for r in stale]
    live_workdirs = {r.workdir for r in records if r not in stale}
    by_workdir = {r.workdir: item for r, item in zip(stale, reaped, strict=True) if r.own_workdir}
    for workdir, item in sorted(by_workdir.items()):
        if workdir not in live_workdirs and os.path.isdir(workdir):
            item.paths.append(workdir)
            if not dry_run:
                shutil.rmtree(workdir, ignore_errors=True)
    for item in reaped:
        if dry_run:
            log.info("event=dead_owner_server_found %s", item.describe())
        else:
            log.warning("event=reaped_dead_owner_server %s", item.describe())
    return reaped
