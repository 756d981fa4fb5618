"""Scenario 12, whole trees: upload and download of a real project tree (this Python's
site-packages: thousands of files, the shape of a task's virtualenv) through a slot, against the
floor of `tar -c | tar -x` piped between two local processes; and that tree prepared once (with a
git repository of it), snapshotted and forked into 16 slots, against one `cp -a` of it and against
running the setup in every slot; all in the same run."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Callable

from atropos.backends.local import LocalBackend
from atropos.bench.measure import Row, judged
from atropos.bench.scenarios import pool_config
from atropos.sandbox.client import ServerClient
from atropos.sandbox.runner.rlimits import workspace_bytes
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


def _cp_a(src: str, dst: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cp", "-a", src, dst], check=True)
    return time.perf_counter() - t0


_GIT = (
    "cd tree && git init -q && git add -A && "
    "git -c user.email=bench@localhost -c user.name=bench commit -qm setup && git status --porcelain | wc -l"
)


async def _fork_rows(tree: str, scratch: str, mb: float, forks: int, say: Callable[[str], None]) -> list[Row]:
    """The tree made into a task's workspace once (uploaded, and a git checkout where git is here),
    snapshotted, and forked into `forks` slots of the same server."""
    git = shutil.which("git") is not None
    say(f"transfer: fork a prepared workspace ({mb:.0f} MB{' + its git repository' if git else ''}) into {forks} slots")
    copy_s = await asyncio.to_thread(_cp_a, tree, os.path.join(scratch, "cp-a"))
    async with SlotPool(pool_config(slots_per_container=forks + 1, warm_slots=0)) as pool:
        assert isinstance(pool.backend, LocalBackend)
        source = await pool.acquire("bench-source")
        info = pool.server_of(source)
        client = ServerClient(info.server_id, info.url, info.token, 4)
        try:
            t0 = time.perf_counter()
            await pool.upload_tree(source, tree, "tree")
            if git:
                done = await pool.execute(source, "bash", {"command": _GIT}, timeout=900)
                if not done.ok or done.stdout.strip() != "0":
                    raise RuntimeError(f"git setup failed: {done.output[-500:]}")
            setup_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            snap = await client.snapshot(source.index, "bench", 900)
            snapshot_s = time.perf_counter() - t0
            targets = [await pool.acquire(f"fork{i}") for i in range(forks)]
            t0 = time.perf_counter()
            forked = await client.fork("bench", [t.index for t in targets], 900)
            fork_s = time.perf_counter() - t0
            await asyncio.gather(*(pool.execute(t, "bash", {"command": "true"}) for t in targets))
            first_s = time.perf_counter() - t0
            # each fork changes something, as a rollout would (git rewrites its index: a copy-up)
            change = "cd tree && echo changed >> CHANGED" + (" && git add CHANGED && git status --short" if git else "")
            outs = await asyncio.gather(*(pool.execute(t, "bash", {"command": change}, timeout=300) for t in targets))
            failed = [o.output[-300:] for o in outs if not o.ok]
            if failed:
                raise RuntimeError(f"a fork does not hold the tree: {failed[0]}")
            slots_dir = os.path.join(pool.backend.data_dir(info.server_id), "slots")
            disk = [await asyncio.to_thread(workspace_bytes, os.path.join(slots_dir, str(t.index))) for t in targets]
        finally:
            await client.aclose()
    tree_bytes = snap.bytes
    per_fork = max(disk) / tree_bytes
    note = (
        f"{forked.mechanism}; every fork answered its first call {first_s:.2f} s after the fork began (their "
        f"sandboxes start); the setup in one slot took {setup_s:.1f} s (in each of {forks}: {forks * setup_s:.0f} s), "
        f"the snapshot {snapshot_s:.1f} s; {snap.files} files, {tree_bytes / 1e6:.0f} MB"
    )
    extra = {"setup_s": setup_s, "snapshot_s": snapshot_s, "first_call_s": first_s}
    return [
        judged(Row(_SCENARIO, f"fork a prepared workspace into {forks} slots", fork_s, "s",
                   baseline="one cp -a of the tree", baseline_value=copy_s, target="< 1x", note=note, extra=extra),
               1.0),
        judged(Row(_SCENARIO, "disk per fork, after a change", max(disk) / 1e6, "MB", baseline="the tree",
                   baseline_value=tree_bytes / 1e6, target="small fraction",
                   note=f"{per_fork:.2%} of the tree (the largest of {forks} forks)"), 0.05),
    ]  # fmt: skip


async def transfer_rows(quick: bool, say: Callable[[str], None]) -> list[Row]:
    budget = (40 if quick else 200) << 20
    with tempfile.TemporaryDirectory(prefix="atropos-bench-tree-") as scratch:
        tree = os.path.join(scratch, "tree")
        os.makedirs(tree)
        files, size = await asyncio.to_thread(_tree_of, sysconfig.get_paths()["purelib"], tree, budget)
        mb = size / 1e6
        fork_rows = await _fork_rows(tree, scratch, mb, 4 if quick else 16, say)
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
        *fork_rows,
    ]  # fmt: skip
