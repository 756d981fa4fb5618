"""`read_file` and `write_file` tools, confined to the slot's workspace (see pathsafe), and its reset."""

from __future__ import annotations

import base64
import binascii
import errno
import os
import stat
import time
import uuid
from dataclasses import dataclass

from atropos.sandbox.runner.pathsafe import PathEscapeError, opened_in_workspace
from atropos.sandbox.runner.protocol import Outcome, ReadFileOp, WriteFileOp

# O_NONBLOCK: a FIFO planted in the workspace must not hang the runner; only regular files are used
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK


def _elapsed_ms(started: float) -> float:
    return (time.monotonic() - started) * 1000.0


def _refused(started: float, error: str) -> Outcome:
    return {"ok": False, "error": error, "duration_ms": _elapsed_ms(started)}


def _done(started: float, text: str) -> Outcome:
    return {"ok": True, "output": text, "stdout": text, "duration_ms": _elapsed_ms(started)}


def _os_error_message(path: str, exc: OSError) -> str:
    if isinstance(exc, IsADirectoryError):
        return f"{path}: is a directory"
    if isinstance(exc, FileNotFoundError):
        return f"{path}: no such file"
    if isinstance(exc, NotADirectoryError):
        return f"{path}: a component of the path is not a directory"
    return f"{path}: {exc.strerror or exc}"


def _regular_file(fd: int) -> os.stat_result:
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file")
    return st


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = os.read(fd, min(1 << 20, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _read_bytes(root: str, path: str, limit: int) -> bytes | str:
    """The file's bytes, or why not (a message)."""
    with opened_in_workspace(root, path, _READ_FLAGS) as fd:
        size = _regular_file(fd).st_size
        if size > limit:
            return f"{path}: file is {size} bytes, over the read limit of {limit} bytes"
        data = _read_at_most(fd, limit)
    if len(data) > limit:
        return f"{path}: file grew past the read limit of {limit} bytes"
    return data


def _encode_for_reply(path: str, data: bytes, encoding: str | None) -> tuple[str | None, str | None]:
    """(content, None) or (None, why not)."""
    if encoding == "base64":
        return base64.b64encode(data).decode("ascii"), None
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, f"{path}: not UTF-8 text; read it with encoding=base64"


def read_file(root: str, op: ReadFileOp, limit: int) -> Outcome:
    started = time.monotonic()
    path = op["path"]
    limit = min(limit, op["max_bytes"] or limit)
    try:
        data = _read_bytes(root, path, limit)
    except PathEscapeError as exc:
        return _refused(started, str(exc))
    except OSError as exc:
        return _refused(started, _os_error_message(path, exc))
    if isinstance(data, str):
        return _refused(started, data)
    content, why_not = _encode_for_reply(path, data, op["encoding"])
    if content is None:
        return _refused(started, str(why_not))
    return _done(started, content)


def _decode_content(op: WriteFileOp) -> bytes:
    content = op["content"]
    if op["encoding"] == "base64":
        return base64.b64decode(content, validate=True)
    return content.encode("utf-8")


def _write_bytes(root: str, path: str, data: bytes, mode: int | None) -> None:
    with opened_in_workspace(root, path, _WRITE_FLAGS, create_parents=True) as fd:
        _regular_file(fd)
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if mode is not None:
            os.fchmod(fd, mode)


def write_file(root: str, op: WriteFileOp, limit: int) -> Outcome:
    started = time.monotonic()
    path = op["path"]
    try:
        data = _decode_content(op)
    except UnicodeEncodeError:
        return _refused(started, f"{path}: content is not valid text (lone surrogate); send it as base64")
    except (binascii.Error, ValueError) as exc:
        return _refused(started, f"{path}: content is not valid base64 ({exc})")
    if len(data) > limit:
        return _refused(started, f"{path}: {len(data)} bytes is over the write limit of {limit} bytes")
    try:
        _write_bytes(root, path, data, op["mode"])
    except PathEscapeError as exc:
        return _refused(started, str(exc))
    except OSError as exc:
        return _refused(started, _os_error_message(path, exc))
    return _done(started, f"wrote {len(data)} bytes to {path}")


# --- reset: empty the workspace without following any symlink an agent left in it ---

_MAX_REMOVAL_DEPTH = 64
_MAX_REMOVAL_PASSES = 100_000  # each pass removes 64 levels of every deep chain


def _open_dir_for_removal(parent: int, name: str) -> int:
    """A readable fd of directory `name` (made searchable if an agent locked it), never via a symlink."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=parent)
    except PermissionError:  # an agent's `chmod 000 dir`: fchmodat never follows a symlink here
        os.chmod(name, 0o700, dir_fd=parent, follow_symlinks=False)
        fd = os.open(name, flags, dir_fd=parent)
    os.fchmod(fd, 0o700)  # writable, so its entries can be removed
    return fd


@dataclass(frozen=True)
class _Removal:
    root: int  # the workspace: deep directories are moved up to it and removed in a later pass
    depth: int = 0
    moved: list[str] | None = None  # the names they got there, where the caller removes them itself


def _remove_entry(parent: int, name: str, how: _Removal) -> None:
    for _ in range(8):  # the entry may change type under us only while something still runs
        try:
            os.unlink(name, dir_fd=parent)
            return
        except FileNotFoundError:
            return
        except IsADirectoryError:
            pass
        except PermissionError as exc:  # EPERM: unlink of a directory on some file systems
            if exc.errno != errno.EPERM:
                raise
        if how.depth >= _MAX_REMOVAL_DEPTH:
            # bounded recursion and open fds whatever an agent's `mkdir -p` depth: flatten the tree
            flat = f".atropos-deep-{uuid.uuid4().hex}"
            os.rename(name, flat, src_dir_fd=parent, dst_dir_fd=how.root)
            if how.moved is not None:
                how.moved.append(flat)
            return
        try:
            fd = _open_dir_for_removal(parent, name)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                continue
            raise
        try:
            _remove_entries(fd, _Removal(how.root, how.depth + 1, how.moved))
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=parent)
        return
    raise OSError(errno.EBUSY, f"cannot remove {name!r}: it keeps changing")


def remove_entry(parent: int, name: str) -> None:
    """Remove entry `name` of the directory fd `parent`, a whole tree if it is one, never via a symlink."""
    moved = [name]
    while moved:
        _remove_entry(parent, moved.pop(), _Removal(parent, moved=moved))


def _remove_entries(dir_fd: int, how: _Removal) -> None:
    for name in os.listdir(dir_fd):
        _remove_entry(dir_fd, name, how)


def empty_dir(root: str) -> None:
    """Remove everything under `root` (a bind mount point, so `root` itself stays)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for _ in range(_MAX_REMOVAL_PASSES):
            if not os.listdir(fd):
                return
            _remove_entries(fd, _Removal(fd))
        raise OSError(errno.EBUSY, f"cannot empty {root}: entries keep appearing")
    finally:
        os.close(fd)
