"""Whole trees into and out of a slot's workspace: `POST /upload` and `GET /download` (tar streams).

The server unpacks and packs outside the slot's sandbox, in the slot's workspace on the host, so
every step goes through directory fds (see atropos.sandbox.tarsafe and runner.pathsafe): a link
the slot planted, even one swapped in while an upload runs, is never followed out of it.

An upload is all or nothing: it is unpacked into a fresh directory at the top of the workspace and
moved into place only once the whole archive was accepted (entries of the same name are replaced,
directories merged, as `tar -x` does); a refused archive leaves the workspace as it was.

Both directions stream (atropos.sandbox.streams): neither side ever holds a whole archive.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid

from atropos.sandbox.runner.files import remove_entry
from atropos.sandbox.runner.pathsafe import open_dir_in_workspace
from atropos.sandbox.runner.rlimits import workspace_bytes
from atropos.sandbox.tarsafe import Compression, Reader, TreeLimits, TreeTooLarge, Unpacked, Writer, pack, unpack

_STAGING = ".atropos-upload-"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def upload_budget(workspace: str, max_upload: int, workspace_limit: int | None) -> int:
    """Bytes an upload may unpack: the server's limit, and no more than the workspace has left."""
    if workspace_limit is None:
        return max_upload
    left = workspace_limit - workspace_bytes(workspace)
    if left <= 0:
        raise TreeTooLarge(f"the workspace is already at its limit of {workspace_limit} bytes")
    return min(max_upload, left)


def receive_tree(workspace: str, path: str, raw: Reader, limits: TreeLimits) -> Unpacked:
    """Unpack the archive `raw` into `path` of the workspace, all or nothing (see the module docstring)."""
    root = os.open(workspace, _DIR)
    staging = f"{_STAGING}{uuid.uuid4().hex}"
    try:
        os.mkdir(staging, 0o700, dir_fd=root)
        try:
            staged = os.open(staging, _DIR, dir_fd=root)
            try:
                done = unpack(raw, staged, limits)
                target = open_dir_in_workspace(workspace, path, create=True)
                try:
                    _merge(staged, target)
                finally:
                    os.close(target)
            finally:
                os.close(staged)
        finally:
            remove_entry(root, staging)
    finally:
        os.close(root)
    return done


def _is_dir(parent: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _merge(src: int, dst: int) -> None:
    """Move every entry of directory fd `src` into `dst`: a directory present in both is merged,
    anything else of the same name in `dst` is replaced (a symlink there is replaced, not followed)."""
    for name in os.listdir(src):
        for _ in range(8):  # `dst` belongs to a slot whose processes may change it meanwhile
            try:
                os.rename(name, name, src_dir_fd=src, dst_dir_fd=dst)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                    raise
            if _is_dir(src, name) and _is_dir(dst, name):
                _merge_dirs(src, dst, name)
                break
            remove_entry(dst, name)
        else:
            raise OSError(errno.EBUSY, f"{name}: it keeps changing while the upload is moved into place")


def _merge_dirs(src: int, dst: int, name: str) -> None:
    inner_src = os.open(name, _DIR, dir_fd=src)
    try:
        inner_dst = os.open(name, _DIR, dir_fd=dst)
        try:
            _merge(inner_src, inner_dst)
            os.fchmod(inner_dst, stat.S_IMODE(os.fstat(inner_src).st_mode))
        finally:
            os.close(inner_dst)
    finally:
        os.close(inner_src)
    os.rmdir(name, dir_fd=src)


def open_source(workspace: str, path: str) -> int:
    """The directory fd a download packs (PathEscapeError, FileNotFoundError, NotADirectoryError)."""
    return open_dir_in_workspace(workspace, path)


def send_tree(source: int, out: Writer, compression: Compression) -> None:
    """Pack the directory fd `source` (closed here) into `out`."""
    try:
        pack(source, out, compression)
        out.flush()
    finally:
        os.close(source)
