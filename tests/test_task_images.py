"""Task images unpacked as roots (atropos.images.roots): the archives users have, made by the real
Docker engine (two small task images built from CI's base image) and by skopeo, and hand-made
archives for what no engine writes (a corrupt one, a hostile one)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from atropos.images.errors import ImageError, ImageNotFoundError, InvalidReference
from atropos.images.roots import RootCache
from tests.images_fixtures import docker_unready

needs_docker = pytest.mark.skipif(docker_unready() is not None, reason=str(docker_unready()))

if TYPE_CHECKING:
    from tests.images_fixtures import TaskImages


def _unpacking(said: list[str]) -> list[str]:
    return [line for line in said if "unpacking layer" in line]


@needs_docker
def test_two_task_images_share_their_base_layer_and_each_sees_only_its_own_files(
    task_images: TaskImages, tmp_path: Path
) -> None:
    cache = RootCache(tmp_path / "cache")
    said: list[str] = []
    with cache.use(f"docker-daemon://{task_images.a}", said.append) as a:
        assert (a.root / "opt/task/tool").read_text() == "echo task a\n"
        assert not (a.root / "opt/task/tool-b").exists()
        assert not os.path.lexists(a.root / "etc/motd")  # the layer's whiteout took it away
        assert (a.root / "etc/debian_version").is_file() and (a.root / "usr/bin/bash").is_file()
    assert len(_unpacking(said)) == 2, said  # base and task layer
    said.clear()
    with cache.use(f"docker-daemon://{task_images.b}", said.append) as b:
        assert (b.root / "opt/task/tool-b").is_file() and not (b.root / "opt/task/tool").exists()
        assert (b.root / "etc/motd").is_file()
    assert len(_unpacking(said)) == 1 and any("already unpacked" in line for line in said), said
    # the shared layer's files are one file on disk
    assert os.stat(a.root / "usr/bin/bash").st_ino == os.stat(b.root / "usr/bin/bash").st_ino
    said.clear()
    with cache.use(f"docker-daemon://{task_images.a}", said.append) as again:
        assert again.root == a.root
    assert said == [], said  # the second use unpacks nothing, not even docker save


@needs_docker
@pytest.mark.skipif(shutil.which("skopeo") is None, reason="no skopeo (Debian's; .ci/system.sh installs it)")
def test_docker_and_oci_archives_of_one_image_share_every_layer(task_images: TaskImages, tmp_path: Path) -> None:
    """skopeo writes an OCI config of its own (another image id), over the same layers: nothing is
    unpacked twice, and both roots hold the same files."""
    docker_tar, oci_tar = tmp_path / "a.tar", tmp_path / "a-oci.tar"
    subprocess.run(["docker", "save", "-o", str(docker_tar), task_images.a], check=True)
    subprocess.run(["skopeo", "copy", "-q", f"docker-archive:{docker_tar}", f"oci-archive:{oci_tar}"], check=True)
    cache = RootCache(tmp_path / "cache")
    said: list[str] = []
    with cache.use(f"docker-archive:{docker_tar}", said.append) as first:
        assert (first.root / "opt/task/tool").is_file()
    assert len(_unpacking(said)) == 2, said
    said.clear()
    with cache.use(f"oci-archive:{oci_tar}", said.append) as second:
        assert (second.root / "opt/task/tool").read_text() == "echo task a\n"
        assert os.stat(second.root / "opt/task/tool").st_ino == os.stat(first.root / "opt/task/tool").st_ino
    assert _unpacking(said) == [] and len([line for line in said if "already unpacked" in line]) == 2, said


def _archive(path: Path, layers: list[list[tuple[tarfile.TarInfo, bytes | None]]]) -> Path:
    """A docker-archive written by hand: one image of these layers."""
    blobs: list[tuple[str, bytes]] = []
    for members in layers:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            for info, data in members:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        blobs.append((f"layer{len(blobs)}/layer.tar", out.getvalue()))
    import hashlib

    config = {"rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(b).hexdigest() for _, b in blobs]}}
    config_raw = json.dumps(config).encode()
    config_name = hashlib.sha256(config_raw).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": ["hand:made"], "Layers": [n for n, _ in blobs]}]
    with tarfile.open(path, "w") as tar:
        for name, raw in [(config_name, config_raw), *blobs, ("manifest.json", json.dumps(manifest).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def _file(name: str, text: str = "x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(text)
    info.mode = 0o644
    return info, text.encode()


def _entry(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    info.mode = 0o755
    return info, None


def test_no_layer_reaches_outside_the_cache(tmp_path: Path) -> None:
    """A layer's symlink to a directory outside, then a later layer's whiteout and file through it:
    the outside stays untouched. A member climbing out with `..` fails the image, leaving nothing."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep me")
    cache = RootCache(tmp_path / "cache")
    through_link = _archive(
        tmp_path / "link.tar",
        [[_entry("bin", tarfile.DIRTYPE), _entry("evil", tarfile.SYMTYPE, str(outside)), _file("evil/planted")]],
    )
    with pytest.raises(ImageError, match="cannot unpack 'evil/planted'"):
        with cache.use(f"docker-archive:{through_link}"):
            pass
    assert not (outside / "planted").exists()

    whiteout_only = _archive(
        tmp_path / "whiteout.tar",
        [
            [_entry("bin", tarfile.DIRTYPE), _file("bin/sh"), _entry("evil", tarfile.SYMTYPE, str(outside))],
            [_file("evil/.wh.victim", ""), _file("bin/.wh.sh", ""), _file("evil/planted")],
        ],
    )
    with cache.use(f"docker-archive:{whiteout_only}") as image:
        assert not (image.root / "bin/sh").exists()  # a whiteout inside the image applies
        # a later layer's directory replaces the link: its file lands in the image
        assert (image.root / "evil").is_dir() and not (image.root / "evil").is_symlink()
        assert (image.root / "evil/planted").is_file()
    assert (outside / "victim").read_text() == "keep me"  # a whiteout through the link does not apply
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]

    climbing = _archive(tmp_path / "climb.tar", [[_entry("bin", tarfile.DIRTYPE), _file("../../climbed")]])
    with pytest.raises(ImageError, match="leaves the image"):
        with cache.use(f"docker-archive:{climbing}"):
            pass
    assert not (tmp_path / "climbed").exists()
    assert _leftovers(cache) == []


def _leftovers(cache: RootCache) -> list[str]:
    """Partial unpacks and scratch directories left in the cache."""
    return [str(p) for p in cache.directory.rglob("*") if ".partial-" in p.name or p.name.startswith(".scratch-")]


def _garbage(path: Path) -> Path:
    path.write_bytes(b"#!/bin/sh\n" + b"\0" * 500)
    return path


def test_a_corrupt_or_missing_image_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    cache = RootCache(tmp_path / "cache")
    good = _archive(tmp_path / "good.tar", [[_entry("bin", tarfile.DIRTYPE), _file("bin/sh", "x" * 100_000)]])
    raw = good.read_bytes()
    corrupt = tmp_path / "corrupt.tar"
    cut = raw.index(b"x" * 1000) + 500  # inside the layer's file: the layer tar ends early
    corrupt.write_bytes(raw[:cut])
    for ref, error, words in [
        (f"docker-archive:{corrupt}", ImageError, "corrupt.tar"),
        (f"docker-archive:{tmp_path / 'none.tar'}", ImageNotFoundError, "no such file"),
        ("docker-daemon://atropos-no-such-image:never", ImageNotFoundError, "atropos-no-such-image"),
        ("oci-archive:", InvalidReference, "nothing after"),
        ("ubuntu:22.04", InvalidReference, "docker-daemon://NAME:TAG"),
        (str(tmp_path / "missing-dir"), ImageNotFoundError, "no such directory"),
        (str(tmp_path / "none.sif"), ImageNotFoundError, "no such SIF file"),
        (str(_garbage(tmp_path / "garbage.sif")), ImageError, "not a SIF image"),
    ]:
        with pytest.raises(error) as caught:
            with cache.use(ref):
                pass
        message = str(caught.value)
        assert words in message and "\n" not in message, message
    assert list((cache.directory / "images").glob("*/")) == [] and _leftovers(cache) == []
    assert [p.name for p in (cache.directory / "layers").iterdir()] == []


def test_a_cache_over_its_limit_evicts_unused_images_never_one_in_use(tmp_path: Path) -> None:
    cache = RootCache(tmp_path / "cache")
    refs = []
    for name in ("one", "two", "three"):
        archive = _archive(
            tmp_path / f"{name}.tar", [[_entry("bin", tarfile.DIRTYPE), _file(f"bin/{name}", name * 50_000)]]
        )
        refs.append(f"docker-archive:{archive}")
        with cache.use(refs[-1]):
            pass
    assert len(cache.images()) == 3
    with cache.use(refs[0]) as busy:  # the oldest, but in use now
        assert [i.in_use for i in sorted(cache.images(), key=lambda i: i.ref)] == [True, False, False]
        evicted = cache.trim(limit=0)
        assert sorted(evicted) == sorted(refs[1:]), evicted
        assert (busy.root / "bin/one").is_file()
    assert [i.ref for i in cache.images()] == [refs[0]]
    with cache.use(refs[0]) as image, cache.keep(image):  # a snapshot's hold outlives the slot's
        pass
    with cache.use(refs[0]) as image:
        kept = contextlib.ExitStack()
        kept.enter_context(cache.keep(image))
    assert cache.trim(limit=0) == [] and (image.root / "bin/one").is_file()
    kept.close()
    assert cache.trim(limit=0) == [refs[0]]
    assert cache.images() == [] and [p for p in (cache.directory / "layers").iterdir() if p.is_dir()] == []
    with pytest.raises(ImageNotFoundError, match="no longer on this node"), cache.keep(image):
        pass


def test_slots_that_ask_for_a_new_image_at_once_all_get_it_while_the_first_ones_use_it(tmp_path: Path) -> None:
    """Many slots of one image not yet unpacked (a GRPO group's first acquires): one unpacks, and
    every other gets the image, though the first ones hold it (in use) by the time they ask."""
    cache = RootCache(tmp_path / "cache")
    files = [_file(f"bin/{i}", "x" * 100_000) for i in range(300)]
    archive = _archive(tmp_path / "one.tar", [[_entry("bin", tarfile.DIRTYPE), *files]])
    held = contextlib.ExitStack()
    entered: list[str] = []
    lock = threading.Lock()

    def slot() -> None:
        use = cache.use(f"docker-archive:{archive}")
        image = use.__enter__()
        with lock:
            held.push(use)
            entered.append(image.image_id)

    threads = [threading.Thread(target=slot, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert len(entered) == 8 and len(set(entered)) == 1, f"{len(entered)} of 8 slots got the image"
    finally:
        held.close()


def test_the_cache_is_measured_while_another_request_removes_its_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trimming walks the cache while other requests unpack: a scratch dir or partial that vanishes
    between the listing and its stat is left out, not a server error (seen in CI as HTTP 500)."""
    cache = RootCache(tmp_path / "cache")
    scratch = tmp_path / "cache" / ".scratch-x"
    scratch.mkdir(parents=True)
    (scratch / "going").write_bytes(b"x" * 8192)
    (tmp_path / "cache" / "staying").write_bytes(b"y" * 8192)
    real_lstat = os.lstat

    def vanishing(path: str | os.PathLike[str], *args: object, **kwargs: object) -> os.stat_result:
        if str(path).endswith("going"):  # removed by its request between the walk's listing and this
            (scratch / "going").unlink(missing_ok=True)
        return real_lstat(path)

    monkeypatch.setattr("atropos.images.roots.os.lstat", vanishing)
    assert cache.size() >= 8192
    assert cache.trim(1 << 40) == []
