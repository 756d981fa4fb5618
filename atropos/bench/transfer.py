"""Scenario 12, whole trees: upload and download of a real project tree (this Python's
site-packages: thousands of files, the shape of a task's virtualenv) through a slot, against the
floor of `tar -c | tar -x` piped between two local processes, in the same run."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Callable

from atropos.bench.measure import Row
from atropos.bench.scenarios import pool_config
from atropos.slots import SlotPool

_SCENARIO = "12 transfer"


def _size(path: str) -> tuple[int, int]:
    """(files, bytes) below `path` (or of it, a file or link)."""
    if os.path.islink(path) or not os.path.isdir(path):
        return 1, os.lstat(path).st_size
    files = size = 0
    for top, _dirs, names in os.walk(path):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(top, name)).st_size
    return files, size


def _tree_of(source: str, dest: str, budget: int) -> tuple[int, int]:
    """Copy top-level entries of `source` into `dest` while they fit in `budget` bytes; (files, bytes)."""
    files = size = 0
    for name in sorted(os.listdir(source)):
        src = os.path.join(source, name)
        n, b = _size(src)
        if size + b > budget:
            continue
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, os.path.join(dest, name), symlinks=True)
        else:
            shutil.copy2(src, os.path.join(dest, name), follow_symlinks=False)
        files, size = files + n, size + b
    return files, size


def _tar_pipe(src: str, dst: str) -> float:
    os.makedirs(dst, exist_ok=True)
    t0 = time.perf_counter()
    pack = subprocess.Popen(["tar", "-C", src, "-cf", "-", "."], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-C", dst, "-xf", "-"], stdin=pack.stdout, check=True)
    assert pack.stdout is not None
    pack.stdout.close()
    if pack.wait() != 0:
        raise RuntimeError("tar -c failed")
    return time.perf_counter() - t0


async def transfer_rows(quick: bool, say: Callable[[str], None]) -> list[Row]:
    budget = (40 if quick else 200) << 20
    with tempfile.TemporaryDirectory(prefix="atropos-bench-tree-") as scratch:
        tree = os.path.join(scratch, "tree")
        os.makedirs(tree)
        files, size = await asyncio.to_thread(_tree_of, sysconfig.get_paths()["purelib"], tree, budget)
        mb = size / 1e6
        say(f"transfer: a tree of {files} files, {mb:.0f} MB; floor: tar -c | tar -x")
        floor = await asyncio.to_thread(_tar_pipe, tree, os.path.join(scratch, "floor"))
        async with SlotPool(pool_config(slots_per_container=1, min_containers=1, max_containers=1)) as pool:
            slot = await pool.acquire("bench-transfer")
            t0 = time.perf_counter()
            done = await pool.upload_tree(slot, tree, "tree")
            upload = time.perf_counter() - t0
            if done.files + done.symlinks < files:
                raise RuntimeError(f"upload unpacked {done.files} files of {files}")
            t0 = time.perf_counter()
            back = await pool.download_tree(slot, "tree", os.path.join(scratch, "back"))
            download = time.perf_counter() - t0
            if back.bytes != done.bytes:
                raise RuntimeError(f"download brought {back.bytes} bytes of {done.bytes}")
            pool.release(slot)
    note = f"{files} files, {mb:.0f} MB; floor {floor:.2f} s ({mb / floor:.0f} MB/s)"
    return [
        Row(_SCENARIO, "upload_tree of a site-packages tree", upload, "s", baseline="tar -c | tar -x, local",
            baseline_value=floor, ratio=upload / floor, note=f"{mb / upload:.0f} MB/s; {note}"),
        Row(_SCENARIO, "download_tree of the same tree", download, "s", baseline="tar -c | tar -x, local",
            baseline_value=floor, ratio=download / floor, note=f"{mb / download:.0f} MB/s; {note}"),
    ]  # fmt: skip
