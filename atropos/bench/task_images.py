"""Scenario 15, slots in their task's own image (`acquire(image=...)`), with default settings and a
fresh pool (nothing unpacked before): four task images built here by the Docker engine over one
base image, each adding a few MB of its own, given to the servers as `docker save` archives.

- the first slot of a new image (unpacked on its node, then its first call) against the floor of
  doing that by hand: `tar -x` of the same archive and of each of its layers into a root;
- a second slot of that image (nothing unpacked), acquire to first call, against a plain slot's
  (warmed ahead, as by default, and not), and against `docker run --rm IMAGE true` (one container
  per rollout);
- 16 slots of one image, and 4 slots each of the 4 images: the time until all 16 answered their
  first call (acquired at once), and the disk the pool's servers used for it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from atropos.backends import LocalBackend
from atropos.bench.measure import Row, judged
from atropos.bench.scenarios import pool_config
from atropos.slots import Slot, SlotPool

_SCENARIO = "15 task images"
BASE_IMAGE = os.environ.get("ATROPOS_BENCH_BASE_IMAGE", "atropos-ci-base:bookworm")
_TAGS = [f"atropos-bench-task-{i}:1" for i in range(4)]


def unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command (the task images are built by the Docker engine)"
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True).returncode != 0:
        return f"no base image {BASE_IMAGE} in the Docker engine (set ATROPOS_BENCH_BASE_IMAGE)"
    return None


def _build(where: Path) -> list[str]:
    """The four task images, saved as archives any user can read; their references."""
    refs = []
    for i, tag in enumerate(_TAGS):
        context = where / f"ctx{i}"
        context.mkdir()
        step = f"RUN mkdir -p /opt/task && head -c {4 + i}M /dev/urandom > /opt/task/blob && echo {i} > /opt/task/id"
        (context / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\n{step}\n")
        subprocess.run(
            ["docker", "build", "--pull=false", "-q", "-t", tag, str(context)], check=True, capture_output=True
        )
        archive = where / f"task{i}.tar"
        subprocess.run(["docker", "save", "-o", str(archive), tag], check=True)
        os.chmod(archive, 0o644)
        refs.append(f"docker-archive:{archive}")
    return refs


def _by_hand(archive: str, where: Path) -> float:
    """`tar -x` of the archive, then of each layer into one root: the floor of unpacking it."""
    t0 = time.perf_counter()
    out, root = where / "saved", where / "root"
    out.mkdir()
    root.mkdir()
    subprocess.run(["tar", "-xf", archive, "-C", str(out)], check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    for layer in manifest[0]["Layers"]:
        subprocess.run(["tar", "-xf", str(out / layer), "-C", str(root)], check=True, capture_output=True)
    return time.perf_counter() - t0


def _disk_bytes(path: str) -> float:
    done = subprocess.run(["du", "-s", "--block-size=1", path], capture_output=True, text=True, check=False)
    return float(done.stdout.split()[0]) if done.stdout else 0.0


async def _ready(pool: SlotPool, name: str, image: str | None) -> tuple[Slot, float]:
    """Acquire to the end of the first call (`bash true`), as a rollout meets it."""
    t0 = time.perf_counter()
    slot = await pool.acquire(name, image=image)
    result = await pool.execute(slot, "bash", {"command": "true"})
    if not result.ok:
        raise RuntimeError(f"a slot's first call failed: {result.output[-500:]}")
    return slot, time.perf_counter() - t0


async def _all_at_once(images: list[str], say: Callable[[str], None]) -> tuple[float, float]:
    """16 slots of a fresh pool (one server), acquired at once: seconds to all first calls, disk bytes."""
    async with SlotPool(pool_config(slots_per_container=16)) as pool:
        t0 = time.perf_counter()
        await asyncio.gather(*(_ready(pool, f"bench-img-{i}", image) for i, image in enumerate(images)))
        seconds = time.perf_counter() - t0
        disk = _disk_bytes(pool.backend.workdir) if isinstance(pool.backend, LocalBackend) else 0.0
    say(f"  {len(images)} slots of {len(set(images))} image(s): {seconds:.1f}s, {disk / 1e6:.0f} MB")
    return seconds, disk


async def task_image_rows(quick: bool, say: Callable[[str], None]) -> list[Row]:
    runs = 3 if quick else 8
    say("task images: building 4 task images with the Docker engine")
    with tempfile.TemporaryDirectory(prefix="atropos-bench-images-") as scratch:
        where = Path(scratch)
        os.chmod(where, 0o755)
        refs = await asyncio.to_thread(_build, where)
        try:
            hand = await asyncio.to_thread(_by_hand, refs[0].removeprefix("docker-archive:"), where)
            say("task images: first and second slot of an image, a plain slot, and a plain slot not warmed")
            async with (
                SlotPool(pool_config(slots_per_container=3)) as pool,
                SlotPool(pool_config(slots_per_container=runs, warm_slots=0)) as cold_pool,
            ):
                first_slot, first = await _ready(pool, "bench-first", refs[0])
                pool.release(first_slot)
                second: list[float] = []
                plain: list[float] = []
                cold: list[float] = []
                for i in range(runs):
                    for on, image, into in ((pool, refs[0], second), (pool, None, plain), (cold_pool, None, cold)):
                        slot, seconds = await _ready(on, f"bench-{i}", image)
                        into.append(seconds)
                        if on is pool:  # the cold pool's slots are kept: each is used once, its sandbox not started
                            on.release(slot)
            docker_run = []
            for _ in range(runs):
                t0 = time.perf_counter()
                await asyncio.to_thread(
                    subprocess.run, ["docker", "run", "--rm", "--network=none", _TAGS[0], "true"], check=True
                )
                docker_run.append(time.perf_counter() - t0)
            one_s, one_disk = await _all_at_once([refs[0]] * 16, say)
            four_s, four_disk = await _all_at_once([r for r in refs for _ in range(4)], say)
        finally:
            await asyncio.to_thread(subprocess.run, ["docker", "image", "rm", "-f", *_TAGS], capture_output=True)
    second_ms, plain_ms = statistics.median(second) * 1000, statistics.median(plain) * 1000
    cold_ms = statistics.median(cold) * 1000
    return [
        judged(Row(_SCENARIO, "first slot of a new image: unpack + first call", first * 1000, "ms",
                   baseline="tar -x of its archive and layers into a root, by hand", baseline_value=hand * 1000,
                   target="<= 2x", note="docker-archive of base + 4 MB; fresh cache"), 2.0),
        Row(_SCENARIO, "second slot of that image: acquire to first call", second_ms, "ms",
            baseline="a plain slot (the server's root; its sandbox warmed ahead), the same", baseline_value=plain_ms,
            ratio=second_ms / plain_ms, note=f"p50 of {runs} each, interleaved; no target: an image slot cannot "
            "be warmed before its image is known"),
        judged(Row(_SCENARIO, "second slot of that image: acquire to first call", second_ms, "ms",
                   baseline="a plain slot whose sandbox starts on its first call (warm_slots=0)",
                   baseline_value=cold_ms, target="<= 1.5x", note=f"p50 of {runs} each, interleaved"), 1.5),
        judged(Row(_SCENARIO, "second slot of that image: acquire to first call", second_ms, "ms",
                   baseline="docker run --rm IMAGE true (a container per rollout)",
                   baseline_value=statistics.median(docker_run) * 1000, target="<= 0.75x",
                   note=f"p50 of {runs} each"), 0.75),
        judged(Row(_SCENARIO, "16 slots of 4 images (4 each), acquired at once: all first calls", four_s * 1000,
                   "ms", baseline="16 slots of 1 image, the same", baseline_value=one_s * 1000, target="<= 4x",
                   note="one server, fresh pool each"), 4.0),
        judged(Row(_SCENARIO, "disk used by 16 slots of 4 images", four_disk / 1e6, "MB",
                   baseline="16 slots of 1 image", baseline_value=one_disk / 1e6, target="<= 1.5x",
                   note="the base layer is unpacked once, shared by the 4 images"), 1.5),
    ]  # fmt: skip
