"""The SIF cache: pull policies, one good image from many concurrent pullers, cleanup, resolution."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from filelock import FileLock

from atropos.images import commands
from atropos.images.cache import (
    cached_image_path,
    default_cache_dir,
    list_images,
    pull_image,
    pulled_images,
    remove_images,
    resolve_singularity_image,
)
from atropos.images.errors import ImageError, ImageNotFoundError, ImagePullError
from atropos.images.staging import lock_path

if TYPE_CHECKING:
    from tests.images_fixtures import StandIn


REF = "docker://python:3.11"
_PULLER = """
import sys
from atropos.images.cache import pull_image
print(pull_image(sys.argv[1], sys.argv[2], sys.argv[3]), flush=True)
"""


def start_puller(standin: StandIn, policy: str, ref: str = REF) -> subprocess.Popen[str]:
    """A separate process calling pull_image, in its own session so a test can kill it whole."""
    return subprocess.Popen(
        [sys.executable, "-c", _PULLER, ref, policy, str(standin.cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def published(cache: Path) -> list[str]:
    """Names a reader of the cache can see (hidden lock and temporary files excluded)."""
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) if cache.exists() else []


def partials(cache: Path) -> list[Path]:
    return sorted(cache.glob(".*.partial.sif"))


def watch_until_done(procs: list[subprocess.Popen[str]], standin: StandIn, source: str) -> int:
    """Read the cache while pullers run: any visible image must already be complete."""
    dest = cached_image_path(source, standin.cache)
    expected = standin.expected(source)
    complete_sightings = 0
    while any(proc.poll() is None for proc in procs):
        time.sleep(0.002)
        for name in published(standin.cache):
            assert name == dest.name
            try:
                data = dest.read_bytes()
            except FileNotFoundError:
                continue  # replaced between listing and opening
            assert data == expected, f"a reader saw a partial image ({len(data)} of {len(expected)} bytes)"
            complete_sightings += 1
    return complete_sightings


def finish(procs: list[subprocess.Popen[str]]) -> list[str]:
    outputs = []
    for proc in procs:
        out, err = proc.communicate()
        assert proc.returncode == 0, err
        outputs.append(out.strip())
    return outputs


def test_many_processes_pulling_one_image_pull_once_and_never_show_a_partial_file(standin: StandIn) -> None:
    procs = [start_puller(standin, "missing") for _ in range(6)]
    watch_until_done(procs, standin, REF)
    outputs = finish(procs)
    dest = cached_image_path(REF, standin.cache)
    assert set(outputs) == {str(dest)}
    assert [call[0] for call in standin.calls()] == ["pull"]
    assert dest.read_bytes() == standin.expected(REF)
    assert published(standin.cache) == [dest.name]
    assert partials(standin.cache) == []


def test_concurrent_always_pulls_replace_atomically(standin: StandIn) -> None:
    pull_image(REF, "missing", standin.cache)
    procs = [start_puller(standin, "always") for _ in range(4)]
    watch_until_done(procs, standin, REF)
    finish(procs)
    pulls = len(standin.calls())
    assert 2 <= pulls <= 5  # the first pull, then at least one re-pull; waiters may reuse a fresh one
    assert cached_image_path(REF, standin.cache).read_bytes() == standin.expected(REF)
    assert partials(standin.cache) == []


def test_threads_of_one_process_share_one_pull(standin: StandIn) -> None:
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda _: pull_image(REF, "missing", standin.cache), range(6)))
    assert len(set(results)) == 1
    assert len(standin.calls()) == 1


def test_killed_puller_leaves_no_visible_image_and_the_next_pull_cleans_up(standin: StandIn) -> None:
    proc = start_puller(standin, "missing")
    while not any(standin.started.iterdir()):  # the stand-in has begun writing
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert published(standin.cache) == []
    assert len(partials(standin.cache)) == 1

    dest = pull_image(REF, "missing", standin.cache)
    assert dest.read_bytes() == standin.expected(REF)
    assert partials(standin.cache) == []


def test_failed_pull_raises_with_runtime_output_and_leaves_nothing(standin: StandIn) -> None:
    ref = "docker://example/will-fail:1"
    with pytest.raises(ImagePullError, match="simulated failure") as info:
        pull_image(ref, "missing", standin.cache)
    assert "exited with 255" in str(info.value)
    assert published(standin.cache) == []
    assert partials(standin.cache) == []
    assert pulled_images() == []


def test_policy_missing_pulls_only_once(standin: StandIn) -> None:
    first = pull_image("python:3.11", "missing", standin.cache)
    second = pull_image(REF, "missing", standin.cache)
    assert first == second
    assert len(standin.calls()) == 1


def test_policy_never_uses_the_cache_or_fails_clearly(standin: StandIn) -> None:
    with pytest.raises(ImageNotFoundError, match="policy is 'never'"):
        pull_image(REF, "never", standin.cache)
    assert standin.calls() == []
    pull_image(REF, "missing", standin.cache)
    assert pull_image(REF, "never", standin.cache) == cached_image_path(REF, standin.cache)
    assert len(standin.calls()) == 1


def test_policy_always_repulls_while_open_readers_keep_the_old_file(standin: StandIn) -> None:
    dest = pull_image(REF, "always", standin.cache)
    with dest.open("rb") as reader:
        old_inode = os.fstat(reader.fileno()).st_ino
        pull_image(REF, "always", standin.cache)
        assert reader.read() == standin.expected(REF)
    assert dest.stat().st_ino != old_inode
    assert len(standin.calls()) == 2


def test_bad_policy_is_rejected(standin: StandIn) -> None:
    with pytest.raises(ValueError, match="never, always, missing"):
        pull_image(REF, "sometimes", standin.cache)  # type: ignore[arg-type]


def test_local_docker_sources_are_built_not_pulled(standin: StandIn) -> None:
    dest = pull_image("docker-daemon:atropos-sandbox:local", "missing", standin.cache)
    assert standin.calls()[0][:2] == ["build", "docker-daemon://atropos-sandbox:local"]
    assert dest.read_bytes() == standin.expected("docker-daemon://atropos-sandbox:local")


def test_layer_cache_defaults_beside_the_sif_cache(standin: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    pull_image(REF, "missing", standin.cache)
    assert standin.calls()[-1][4] == str(standin.cache / ".layers")
    monkeypatch.setenv("APPTAINER_CACHEDIR", "/shared/apptainer-cache")
    pull_image("docker://alpine:3", "missing", standin.cache)
    assert standin.calls()[-1][4] == "/shared/apptainer-cache"


def test_progress_streams_runtime_output_line_by_line(standin: StandIn) -> None:
    lines: list[str] = []
    pull_image(REF, "missing", standin.cache, progress=lines.append)
    assert f"INFO:    pulling {REF}" in lines
    assert "3/8 chunks" in lines  # carriage-return progress bars become separate lines
    assert lines[-1].endswith(str(cached_image_path(REF, standin.cache)))


def test_heartbeat_reports_a_long_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands, "HEARTBEAT_SECONDS", 0.01)
    beat = threading.Event()
    lines: list[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        beat.set()

    with commands.heartbeat(progress, "pull x"):
        beat.wait()
    assert lines[0].startswith("pull x: still running after ")


def test_waiting_for_another_pullers_lock_is_reported(standin: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands, "HEARTBEAT_SECONDS", 0.01)
    dest = cached_image_path(REF, standin.cache)
    standin.cache.mkdir(parents=True)
    holder = FileLock(str(lock_path(dest)))
    holder.acquire()
    waiting = threading.Event()

    def progress(line: str) -> None:
        if "waiting for another process" in line:
            waiting.set()

    with ThreadPoolExecutor(max_workers=1) as pool:
        result = pool.submit(pull_image, REF, "missing", standin.cache, None, progress)
        waiting.wait()
        assert standin.calls() == []  # nothing pulls while another holder has the lock
        holder.release()
        assert result.result() == dest
    assert len(standin.calls()) == 1


def test_lock_timeout_gives_up_with_a_clear_error(standin: StandIn) -> None:
    dest = cached_image_path(REF, standin.cache)
    standin.cache.mkdir(parents=True)
    with FileLock(str(lock_path(dest))), pytest.raises(ImageError, match="another process is writing"):
        pull_image(REF, "missing", standin.cache, lock_timeout=0.05)
    assert standin.calls() == []


def test_remove_images_removes_only_what_this_process_pulled(standin: StandIn) -> None:
    other = start_puller(standin, "missing", "docker://alpine:3")
    finish([other])
    mine = pull_image(REF, "missing", standin.cache)
    reused = pull_image("docker://alpine:3", "missing", standin.cache)
    assert pulled_images() == [mine]
    assert remove_images() == [mine]
    assert not mine.exists()
    assert reused.exists()
    assert remove_images() == []


def test_list_images_shows_published_sifs_with_sizes(standin: StandIn) -> None:
    assert list_images(standin.cache) == []
    a = pull_image("docker://alpine:3", "missing", standin.cache)
    b = pull_image(REF, "missing", standin.cache)
    (standin.cache / ".hidden.partial.sif").write_bytes(b"x")
    (standin.cache / "notes.txt").write_text("not an image")
    listed = list_images(standin.cache)
    assert listed == sorted([(a, a.stat().st_size), (b, b.stat().st_size)])
    assert all(size == len(standin.expected(REF)) for _, size in listed if _ == b)


def test_cache_dir_precedence(tmp_path: Path) -> None:
    home = Path.home()
    assert default_cache_dir(env={}) == home / ".cache" / "atropos-sandbox" / "sif"
    assert default_cache_dir(env={"APPTAINER_CACHEDIR": str(tmp_path)}) == tmp_path / "sif"
    both = {"APPTAINER_CACHEDIR": str(tmp_path), "ATROPOS_SIF_CACHE": str(tmp_path / "mine")}
    assert default_cache_dir(env=both) == tmp_path / "mine"


def test_environment_cache_dir_is_used_without_an_argument(standin: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATROPOS_SIF_CACHE", str(standin.cache / "env"))
    assert pull_image(REF).parent == standin.cache / "env"


def test_resolve_accepts_an_existing_sif_without_the_runtime(standin: StandIn, tmp_path: Path) -> None:
    sif = tmp_path / "given.sif"
    sif.write_bytes(standin.expected("given"))
    assert resolve_singularity_image(str(sif), "never") == sif.resolve()
    assert standin.calls() == []


@pytest.mark.parametrize("value", ["./missing.sif", "/nowhere/image.sif", "~/nope/x.sif", "rel/dir/x.sif"])
def test_resolve_rejects_a_missing_path_before_anything_runs(standin: StandIn, value: str) -> None:
    with pytest.raises(ImageNotFoundError, match="does not exist"):
        resolve_singularity_image(value, "missing", cache_dir=standin.cache)
    assert standin.calls() == []


def test_resolve_rejects_what_is_neither_path_nor_reference(standin: StandIn) -> None:
    with pytest.raises(ImageNotFoundError, match="neither an existing file nor an image reference"):
        resolve_singularity_image("Not A Reference!", "missing", cache_dir=standin.cache)
    with pytest.raises(ImageNotFoundError, match="no singularity image"):
        resolve_singularity_image("  ", "missing", cache_dir=standin.cache)


@pytest.mark.parametrize("value", ["python:3.11", "docker://python:3.11"])
def test_resolve_pulls_a_reference_per_policy(standin: StandIn, value: str) -> None:
    with pytest.raises(ImageNotFoundError, match="policy is 'never'"):
        resolve_singularity_image(value, "never", cache_dir=standin.cache)
    path = resolve_singularity_image(value, "missing", cache_dir=standin.cache)
    assert path == cached_image_path(REF, standin.cache)
    assert path.read_bytes() == standin.expected(REF)
