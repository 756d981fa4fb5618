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

A snapshot of a slot in a task's image (atropos.sandbox.image_slots) keeps the image too: its
layers are copies of the slot's writes over the image (whiteouts and opaque dirs included) and of
the layers its own root stood on, in DATA_DIR/snapshots/.layers/NAME, and it holds the image in the
cache until it is deleted. A fork of it is a slot in that image with those layers below its own.

A snapshot counts against the slot's workspace limit (the fork sees it in its workspace), cannot
be deleted while an overlay fork stands on it, and dies with the server (the directory is
emptied when the server starts and when it stops).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from atropos.images.roots import ImageRoot
from atropos.sandbox.image_slots import SlotImage
from atropos.sandbox.runner.files import empty_dir, remove_entry
from atropos.sandbox.tarsafe import Keep, TreeLimits, Unpacked, copy_tree

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
    image: ImageRoot | None = None  # the task image its slot ran in, held in the cache while it lasts
    layers: tuple[str, ...] = ()  # the slot's writes over that image, topmost first
    release: Callable[[], None] = field(default=lambda: None, repr=False)  # ends the hold on the image


class SnapshotStore:
    def __init__(self, data_dir: str, max_count: int) -> None:
        self.root = os.path.join(data_dir, "snapshots")
        self.layer_root = os.path.join(self.root, ".layers")  # a snapshot's name never starts with "."
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

    def create(
        self,
        name: str,
        slot: int,
        view: str,
        max_bytes: int,
        image: SlotImage | None = None,
        release: Callable[[], None] = lambda: None,
    ) -> Snapshot:
        """Copy the workspace view `view` of `slot` into a new snapshot (blocking: run in a thread);
        for a slot in a task's `image`, its layers over the image too (each within `max_bytes`).
        `release` ends the snapshot's hold on the image: called when it goes, or if it fails."""
        try:
            snap = self._reserve(name, slot)
        except BaseException:
            release()
            raise
        snap.release = release
        try:
            os.mkdir(snap.path, 0o700)
            done = _copy(view, snap.path, max_bytes, "content")
            if image is not None:
                snap.image = image.image
                os.makedirs(os.path.join(self.layer_root, name), 0o700)
                layers = []
                for i, layer in enumerate((image.upper, *image.layers)):
                    layers.append(os.path.join(self.layer_root, name, str(i)))
                    os.mkdir(layers[-1], 0o700)
                    copied = _copy(layer, layers[-1], max_bytes, "layer")
                    done.files, done.bytes = done.files + copied.files, done.bytes + copied.bytes
                snap.layers = tuple(layers)
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
            snap = self._snapshots.pop(name, None)
        for where in (self.root, self.layer_root):
            if os.path.isdir(where):
                fd = os.open(where, _DIR)
                try:
                    remove_entry(fd, name)
                finally:
                    os.close(fd)
        if snap is not None:
            snap.release()

    def clear(self) -> None:
        with self._lock:
            gone, self._snapshots = list(self._snapshots.values()), {}
        empty_dir(self.root)
        for snap in gone:
            snap.release()


def _copy(src_path: str, dest_path: str, max_bytes: int, keep: Keep) -> Unpacked:
    src, dest = os.open(src_path, _DIR), os.open(dest_path, _DIR)
    try:
        return copy_tree(src, dest, TreeLimits(max_bytes), keep)
    finally:
        os.close(src)
        os.close(dest)


def copy_root(image_root: str, dest: str) -> None:
    """A task image's root copied for one slot, where no overlay can stand on it."""
    _copy(image_root, dest, 1 << 62, "content")  # bounded when it was unpacked


def copy_snapshot(snapshot: str, workspace: str) -> None:
    """A fork without overlays: the snapshot copied into the (empty) workspace."""
    _copy(snapshot, workspace, 1 << 62, "content")  # bounded when the snapshot was taken
