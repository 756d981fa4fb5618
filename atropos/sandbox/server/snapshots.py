"""Snapshots of slot workspaces, and forks of them: prepare a task once, start many slots from it.

A snapshot is a confined copy (atropos.sandbox.tarsafe.copy_tree: nothing followed, nothing
special; in-kernel copies, reflinks where the file system has them) of a slot's workspace as its
commands see it, in DATA_DIR/snapshots/NAME, where no slot can reach it. Nothing of the slot's
processes is kept. A fork makes a slot start over from one:

- `overlay` (where bubblewrap can mount overlayfs in the slot's user namespace, probed at start):
  the slot's workspace becomes an overlay with the snapshot as its read-only lower layer and the
  slot's own (emptied) workspace dir taking every write, so a fork costs no copy at all, writes
  in one fork never show in another or in the snapshot, and disk use grows only with what the
  fork changes. The overlay lives in the slot's sandbox: the server reaches the merged view
  through the runner's root (`SlotRunner.view`), never by writing to the layers (overlayfs
  forbids changing them while mounted).
- `copy` (no bubblewrap, or no overlayfs here: a container's own overlay file system as the data
  dir, a kernel before 5.11): the snapshot is copied into the workspace.

A snapshot counts against the slot's workspace limit (the fork sees it in its workspace), cannot
be deleted while an overlay fork stands on it, and dies with the server (the directory is
emptied when the server starts and when it stops).
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass

from atropos.sandbox.runner.files import empty_dir, remove_entry
from atropos.sandbox.tarsafe import TreeLimits, Unpacked, copy_tree

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class SnapshotError(ValueError):
    """A snapshot request that cannot be done; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Snapshot:
    name: str
    path: str
    source_slot: int
    created: float
    files: int = 0
    bytes: int = 0
    ready: bool = False  # False while it is being copied


class SnapshotStore:
    def __init__(self, data_dir: str, max_count: int) -> None:
        self.root = os.path.join(data_dir, "snapshots")
        self.max_count = max_count
        self._snapshots: dict[str, Snapshot] = {}
        self._lock = threading.Lock()  # creations run in threads
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        empty_dir(self.root)  # a previous server's: snapshots die with their server

    def _reserve(self, name: str, slot: int) -> Snapshot:
        if not NAME.match(name):
            raise SnapshotError(400, f"snapshot name {name!r}: 1-64 of A-Z a-z 0-9 . _ - (not starting with . _ -)")
        with self._lock:
            if name in self._snapshots:
                raise SnapshotError(409, f"snapshot {name!r} exists; delete it first or pick another name")
            if len(self._snapshots) >= self.max_count:
                raise SnapshotError(
                    409, f"this server holds {self.max_count} snapshots, its limit (--max-snapshots); delete one"
                )
            snap = Snapshot(name, os.path.join(self.root, name), slot, time.time())
            self._snapshots[name] = snap
            return snap

    def create(self, name: str, slot: int, view: str, max_bytes: int) -> Snapshot:
        """Copy the workspace view `view` of `slot` into a new snapshot (blocking: run in a thread)."""
        snap = self._reserve(name, slot)
        try:
            os.mkdir(snap.path, 0o700)
            src, dest = os.open(view, _DIR), os.open(snap.path, _DIR)
            try:
                done: Unpacked = copy_tree(src, dest, TreeLimits(max_bytes))
            finally:
                os.close(src)
                os.close(dest)
        except BaseException:
            self._forget(name)
            raise
        snap.files, snap.bytes, snap.ready = done.files, done.bytes, True
        return snap

    def get(self, name: str) -> Snapshot:
        snap = self._snapshots.get(name)
        if snap is None or not snap.ready:
            known = ", ".join(sorted(n for n, s in self._snapshots.items() if s.ready)) or "none"
            raise SnapshotError(404, f"no snapshot {name!r} on this server (it has: {known})")
        return snap

    def all(self) -> list[Snapshot]:
        return sorted((s for s in self._snapshots.values() if s.ready), key=lambda s: s.created)

    def delete(self, name: str) -> None:
        """Remove a snapshot (blocking); the caller checked that no overlay fork stands on it."""
        self.get(name)
        self._forget(name)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._snapshots.pop(name, None)
        fd = os.open(self.root, _DIR)
        try:
            remove_entry(fd, name)
        finally:
            os.close(fd)

    def clear(self) -> None:
        with self._lock:
            self._snapshots.clear()
        empty_dir(self.root)


def copy_snapshot(snapshot: str, workspace: str) -> None:
    """A fork without overlays: the snapshot copied into the (empty) workspace."""
    src, dest = os.open(snapshot, _DIR), os.open(workspace, _DIR)
    try:
        copy_tree(src, dest, TreeLimits(max_bytes=1 << 62))  # bounded when the snapshot was taken
    finally:
        os.close(src)
        os.close(dest)
