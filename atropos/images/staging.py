"""Atomic publication of an image file: a per-file lock, a temporary sibling, then `os.replace`.

Readers never see a partial image: the runtime writes into a hidden temporary file in the same
directory, and only a complete, valid SIF is renamed onto the final name (a rename within one
directory is atomic on POSIX filesystems, NFS included). Writers of the same file are serialized by
a lock file next to it, so concurrent processes produce one image, not a race.
"""

from __future__ import annotations

import glob
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from atropos.images import commands
from atropos.images.errors import ImageError
from atropos.progress import Progress

__all__ = ["SIF_MAGIC", "check_sif", "is_sif", "locked", "staged_file"]

SIF_MAGIC = b"SIF_MAGIC"
_MAGIC_OFFSET = 32  # after the 32-byte launch script line of the SIF global header
_PARTIAL = ".partial.sif"


def lock_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.lock")


@contextmanager
def locked(dest: Path, *, progress: Progress | None, label: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the lock of `dest`, reporting periodically while another process holds it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(dest)))
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = commands.HEARTBEAT_SECONDS
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - time.monotonic()))
        try:
            lock.acquire(timeout=wait)
            break
        except Timeout:
            if deadline is not None and time.monotonic() >= deadline:
                raise ImageError(
                    f"gave up after {timeout:.0f} s waiting for {lock_path(dest)} "
                    f"(another process is writing {dest.name})"
                ) from None
            if progress is not None:
                progress(f"{label}: waiting for another process writing {dest.name}")
    try:
        _remove_stale_partials(dest)
        yield
    finally:
        lock.release()


@contextmanager
def staged_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on normal exit check it is a SIF and publish it.

    Call while holding `locked(dest)`. On any error the temporary file is removed and `dest` is
    left as it was.
    """
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}{_PARTIAL}")
    try:
        yield tmp
        check_sif(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def is_sif(path: Path) -> bool:
    """True when `path` is a regular file that starts with a SIF global header."""
    try:
        with path.open("rb") as handle:
            head = handle.read(_MAGIC_OFFSET + len(SIF_MAGIC))
    except OSError:
        return False
    return head[_MAGIC_OFFSET:] == SIF_MAGIC


def check_sif(path: Path) -> None:
    if not path.is_file():
        raise ImageError(f"the runtime reported success but wrote no file at {path}")
    if not is_sif(path):
        raise ImageError(f"{path} is not a SIF image (no SIF header); refusing to publish it")


def _remove_stale_partials(dest: Path) -> None:
    """Temporary files of writers that died: only a lock holder writes one, and we hold the lock."""
    for stale in dest.parent.glob(f".{glob.escape(dest.name)}.*{_PARTIAL}"):
        stale.unlink(missing_ok=True)
