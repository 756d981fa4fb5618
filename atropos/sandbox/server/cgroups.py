"""Per-slot cgroups (v1 `memory` and `pids`), when the machine lets the server create them.

They bound a slot as a whole, where rlimits bound single processes: a slot's memory in all its
processes together, and its process count even for root (whom RLIMIT_NPROC does not stop).
Without write access to the hierarchies (an unprivileged user, most containers) nothing is
created, the server says so once, and the rlimits and the runner's watch are what holds.
cgroup v2 is not used: a v2 group can only get controllers below a cgroup with no processes of
its own, which would mean moving the server itself; that is left to a later change.

Layout: <hierarchy>/<the server's own cgroup>/atropos-<server pid>/slot-<n>. Groups of servers
that died (SIGKILL) are removed by the next server that starts on the machine.
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass, field

from atropos.sandbox.runner.protocol import LimitKind

log = logging.getLogger("atropos.sandbox")

CGROUP_ROOT = "/sys/fs/cgroup"
_PREFIX = "atropos-"


def _own_paths(proc_cgroup: str = "/proc/self/cgroup") -> dict[str, str]:
    """v1 controller name -> this process's cgroup path in that hierarchy."""
    paths: dict[str, str] = {}
    try:
        with open(proc_cgroup, encoding="utf-8") as fh:
            for line in fh:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for name in controllers.split(","):
                    if name:
                        paths[name] = path
    except OSError:
        pass
    return paths


def _write(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as fh:
        fh.write(value)


def _counter_in(text: str, key: str) -> int:
    """`key N` from a flat-keyed cgroup file's text; 0 when the key is missing."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _remove_stale(parent: str) -> None:
    """Groups left by servers that died: removable once empty, which they are when no runner lives."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(_PREFIX) or not name[len(_PREFIX) :].isdigit():
            continue
        pid = int(name[len(_PREFIX) :])
        if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        _remove_tree(os.path.join(parent, name))


def _remove_tree(top: str) -> None:
    try:
        children = [e.path for e in os.scandir(top) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for child in children:
        _remove_tree(child)
    try:
        os.rmdir(top)
    except OSError:
        pass  # still has processes, or already gone


@dataclass
class SlotCgroup:
    """One slot's groups: the runner is moved into them before it starts the sandbox."""

    memory_dir: str | None = None
    pids_dir: str | None = None
    dirs: list[str] = field(default_factory=list)
    values: dict[str, int] = field(default_factory=dict)  # limit kind -> its configured value
    _seen: dict[LimitKind, int] = field(default_factory=dict)  # counters at the last look (a new group: 0)
    _open: dict[LimitKind, int] = field(default_factory=dict)  # the counter files' fds (-1: unreadable)

    def wrap(self, argv: list[str], helper: str | None = None) -> list[str]:
        """`argv` started from a process that first joins the groups (children inherit them): the
        compiled runner's binary `helper` (`--join`; its `--slot-net` then runs in that same process),
        or a shell."""
        if helper is not None:
            joins = [arg for d in self.dirs for arg in ("--join", d)]
            if argv[:2] == [helper, "--slot-net"]:
                return [helper, *joins, *argv[1:]]
            return [helper, *joins, "--", *argv]
        joins_sh = " && ".join(f"echo $$ > {shlex.quote(os.path.join(d, 'cgroup.procs'))}" for d in self.dirs)
        return ["/bin/sh", "-c", f'{joins_sh} && exec "$@"', "atropos-slot", *argv]

    def remove(self) -> None:
        """After the runner died: an empty group is removed by rmdir."""
        for fd in self._open.values():
            if fd >= 0:
                os.close(fd)
        self._open.clear()
        for path in self.dirs:
            _remove_tree(path)

    def new_events(self) -> list[LimitKind]:
        """Limit kinds hit since the last look: one read of each counter per call."""
        now = self.counters()
        hit = [kind for kind, count in now.items() if count > self._seen.get(kind, 0)]
        self._seen = now
        return hit

    def counters(self) -> dict[LimitKind, int]:
        """Events that mean a limit was hit: OOM kills and refused forks."""
        found: dict[LimitKind, int] = {}
        if self.memory_dir:
            found["memory"] = self._counter("memory", os.path.join(self.memory_dir, "memory.oom_control"), "oom_kill")
        if self.pids_dir:
            found["processes"] = self._counter("processes", os.path.join(self.pids_dir, "pids.events"), "max")
        return found

    def _counter(self, kind: LimitKind, path: str, key: str) -> int:
        """`key`'s count in `path`, read again through the fd opened at the first look (a call's
        check is then one pread, not an open, a read and a close); 0 when it cannot be read."""
        fd = self._open.get(kind)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                fd = -1  # not looked for again
            self._open[kind] = fd
        if fd < 0:
            return 0
        try:
            return _counter_in(os.pread(fd, 4096, 0).decode("ascii", "replace"), key)
        except OSError:
            return 0


class SlotCgroups:
    """The server's group in each usable hierarchy, and a group per slot below it."""

    def __init__(self, memory_parent: str | None, pids_parent: str | None) -> None:
        self.memory_parent = memory_parent
        self.pids_parent = pids_parent

    @classmethod
    def create(cls, root: str = CGROUP_ROOT) -> SlotCgroups | None:
        own = _own_paths()
        made: dict[str, str | None] = {"memory": None, "pids": None}
        reasons = []
        for controller in made:
            hierarchy = os.path.join(root, controller)
            if controller not in own or not os.path.isdir(hierarchy):
                reasons.append(f"no cgroup v1 {controller} hierarchy")
                continue
            base = os.path.join(hierarchy, own[controller].lstrip("/"))
            _remove_stale(base)
            mine = os.path.join(base, f"{_PREFIX}{os.getpid()}")
            try:
                os.makedirs(mine, exist_ok=True)
            except OSError as exc:
                reasons.append(f"cannot create {mine}: {exc.strerror}")
                continue
            made[controller] = mine
        if not any(made.values()):
            log.info(
                "per-slot cgroups unavailable (%s); rlimits and the runner's watch enforce limits", "; ".join(reasons)
            )
            return None
        return cls(made["memory"], made["pids"])

    def for_slot(self, index: int, *, memory: int | None, processes: int | None) -> SlotCgroup:
        group = SlotCgroup()
        if self.memory_parent and memory is not None:
            path = self._make(self.memory_parent, index)
            if path and self._limit(path, "memory.limit_in_bytes", memory):
                # with swap, the same bound on memory+swap; absent when the kernel has no swap accounting
                memsw = os.path.join(path, "memory.memsw.limit_in_bytes")
                if os.path.exists(memsw):
                    self._limit(path, "memory.memsw.limit_in_bytes", memory)
                group.memory_dir = path
                group.dirs.append(path)
                group.values["memory"] = memory
        if self.pids_parent and processes is not None:
            path = self._make(self.pids_parent, index)
            if path and self._limit(path, "pids.max", processes):
                group.pids_dir = path
                group.dirs.append(path)
                group.values["processes"] = processes
        return group

    @staticmethod
    def _make(parent: str, index: int) -> str | None:
        path = os.path.join(parent, f"slot-{index}")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            log.warning("cannot create cgroup %s: %s", path, exc.strerror)
            return None
        return path

    @staticmethod
    def _limit(path: str, name: str, value: int) -> bool:
        try:
            _write(os.path.join(path, name), str(value))
        except OSError as exc:
            log.warning("cannot set %s in %s: %s", name, path, exc.strerror)
            return False
        return True


def remove_server_groups(root: str = CGROUP_ROOT) -> None:
    """This server's groups, at shutdown (each slot removed its own when its runner died)."""
    own = _own_paths()
    for controller in ("memory", "pids"):
        if controller in own:
            _remove_tree(os.path.join(root, controller, own[controller].lstrip("/"), f"{_PREFIX}{os.getpid()}"))
