"""Open tool paths inside a slot's workspace so that nothing outside it is ever read or written.

Paths are resolved one component at a time from a directory fd of the workspace root, each step
an `openat` with O_NOFOLLOW. A symlink is never followed by the kernel: its target is read with
`readlinkat` and resolved by the same walk, so a link that leaves the workspace (absolute, through
`..`, dangling or in a chain) is refused. Every directory on the way is held open, so swapping a
component for a symlink between two steps changes nothing: the next step starts from the directory
already opened, never from a path string. There is no check-then-use window to race.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

# Agents are told their workspace is /workspace; the same path works with and without bubblewrap.
WORKSPACE_ALIAS = "/workspace"
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_SYMLINKS = 40

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_FOLLOWED = (errno.ELOOP, errno.ENOTDIR)
_MAX_RETRIES = 64


class PathEscapeError(ValueError):
    """The path is refused: it leaves the workspace or cannot name a file in it."""


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def _check_text(path: str) -> None:
    if "\x00" in path:
        raise PathEscapeError("path contains a NUL byte")
    try:
        encoded = os.fsencode(path)
    except UnicodeEncodeError:
        raise PathEscapeError("path is not valid text (lone surrogate)") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise PathEscapeError(f"path is too long ({len(encoded)} bytes, limit {MAX_PATH_BYTES})")
    for part in _components(path):
        if len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise PathEscapeError(f"path component {part[:32]!r}... is too long (limit {MAX_NAME_BYTES} bytes)")


def _strip_prefix(parts: list[str], prefix: list[str]) -> list[str] | None:
    return parts[len(prefix) :] if parts[: len(prefix)] == prefix else None


def _inside_parts(root: str, absolute: str) -> list[str] | None:
    """Components of an absolute path below the workspace (alias or host path), None if elsewhere."""
    parts = _components(absolute)
    for top in (WORKSPACE_ALIAS, os.path.realpath(root)):
        rest = _strip_prefix(parts, _components(top))
        if rest is not None:
            return rest
    return None


def _climbs_above(parts: list[str]) -> bool:
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 1
        if depth < 0:
            return True
    return False


def workspace_parts(root: str, path: str) -> list[str]:
    """The components of `path` relative to the workspace (`..` kept for the walk), or PathEscapeError."""
    _check_text(path)
    parts = _inside_parts(root, path) if path.startswith("/") else _components(path)
    if parts is None or _climbs_above(parts):
        raise PathEscapeError(f"path {path!r} is outside the workspace ({WORKSPACE_ALIAS})")
    return parts


class _Walk:
    """Directory fds from the workspace root down to the current directory of a resolution."""

    def __init__(self, root: str, path: str) -> None:
        self.root = root
        self.path = path
        self.fds = [os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]
        self.links = 0
        self.last_link = ""

    @property
    def here(self) -> int:
        return self.fds[-1]

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())

    def up(self) -> None:
        if len(self.fds) == 1:
            how = f"{self.last_link} leads" if self.last_link else "goes"
            raise PathEscapeError(f"path {self.path!r}: {how} outside the workspace ({WORKSPACE_ALIAS})")
        os.close(self.fds.pop())

    def to_root(self) -> None:
        while len(self.fds) > 1:
            os.close(self.fds.pop())

    def follow(self, name: str, pending: deque[str]) -> bool:
        """If `name` is a symlink, queue its target's components (in front) and return True."""
        try:
            target = os.readlink(name, dir_fd=self.here)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return False  # not a symlink (any more): the caller's error stands
            raise
        self.links += 1
        self.last_link = f"symlink {name!r} -> {target!r}"
        if self.links > MAX_SYMLINKS:
            raise PathEscapeError(f"path {self.path!r}: too many levels of symbolic links")
        if target.startswith("/"):
            inside = _inside_parts(self.root, target)
            if inside is None:
                raise PathEscapeError(
                    f"path {self.path!r}: symlink {name!r} -> {target!r} points outside "
                    f"the workspace ({WORKSPACE_ALIAS})"
                )
            self.to_root()
            pending.extendleft(reversed(inside))
        else:
            pending.extendleft(reversed(_components(target)))
        return True

    def enter(self, name: str, pending: deque[str], create: bool) -> None:
        """Step into directory `name` of the current one (making it if `create`), or follow a symlink."""
        for _ in range(_MAX_RETRIES):
            try:
                self.fds.append(os.open(name, _DIR_FLAGS, dir_fd=self.here))
                return
            except FileNotFoundError:
                if not create:
                    raise
            except OSError as exc:
                if exc.errno in _NOT_FOLLOWED and self.follow(name, pending):
                    return
                raise
            try:
                os.mkdir(name, 0o777, dir_fd=self.here)
            except FileExistsError:
                pass  # made concurrently (or a dangling symlink: the next open tells which)
            if self.follow(name, pending):
                return
        raise PathEscapeError(f"path {self.path!r}: directory {name!r} keeps changing; try again")


def _open_final(walk: _Walk, name: str, pending: deque[str], flags: int, mode: int) -> int | None:
    """Open the last component without following it; None when it was a symlink now queued."""
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=walk.here)
    except OSError as exc:
        if exc.errno in _NOT_FOLLOWED and walk.follow(name, pending):
            return None
        raise


def _resolve(walk: _Walk, parts: list[str], flags: int, mode: int, create_parents: bool) -> int:
    pending = deque(parts)
    while pending:
        name = pending.popleft()
        if name == "..":
            walk.up()
        elif name == ".":
            continue
        elif pending:
            walk.enter(name, pending, create_parents)
        else:
            fd = _open_final(walk, name, pending, flags, mode)
            if fd is not None:
                return fd
    raise IsADirectoryError(errno.EISDIR, "is the workspace or a directory")


def open_in_workspace(root: str, path: str, flags: int, mode: int = 0o666, *, create_parents: bool = False) -> int:
    """An fd of `path` inside the workspace `root`, opened with `flags`; PathEscapeError if it leaves.

    The final component is opened with O_NOFOLLOW added; a symlink there is resolved by the walk.
    OSError (FileNotFoundError, IsADirectoryError, ...) for what the file system refuses.
    """
    parts = workspace_parts(root, path)
    walk = _Walk(root, path)
    try:
        return _resolve(walk, parts, flags, mode, create_parents)
    finally:
        walk.close()


@contextmanager
def opened_in_workspace(
    root: str, path: str, flags: int, mode: int = 0o666, *, create_parents: bool = False
) -> Iterator[int]:
    fd = open_in_workspace(root, path, flags, mode, create_parents=create_parents)
    try:
        yield fd
    finally:
        os.close(fd)


def open_dir_in_workspace(root: str, path: str, *, create: bool = False) -> int:
    """A readable fd of directory `path` inside the workspace `root` (made, with its parents, if
    `create`), resolved by the same walk; PathEscapeError if it leaves, OSError if not a directory."""
    parts = workspace_parts(root, path)
    walk = _Walk(root, path)
    try:
        pending = deque(parts)
        while pending:
            name = pending.popleft()
            if name == "..":
                walk.up()
            elif name != ".":
                walk.enter(name, pending, create)
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=walk.here)
    finally:
        walk.close()
