"""Fixtures and helpers for the image tests.

Test modules load it explicitly with `pytest_plugins = ["tests.images_fixtures"]` and import names
from it only under TYPE_CHECKING (so pytest can rewrite its asserts).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from atropos.images import cache, commands, runtime
from atropos.images.errors import ImageError
from atropos.images.runtime import ApptainerRuntime, find_runtime

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
STANDIN_DIR = TESTS_DIR / "bin_images"
STANDIN = STANDIN_DIR / "apptainer"

_FIGURES: list[str] = []

_LAUNCH = b"#!/usr/bin/env run-singularity\n".ljust(32, b"\0") + b"SIF_MAGIC\0"
_CHUNK = 4096


def expected_image(source: str, chunks: int) -> bytes:
    """The exact bytes the stand-in writes for `source`: what a complete image must equal."""
    parts = [_LAUNCH]
    for index in range(chunks):
        seed = f"{source}#{index}|".encode()
        parts.append((seed * (_CHUNK // len(seed) + 1))[:_CHUNK])
    parts.append(f"\nEND-OF-IMAGE {source}\n".encode())
    return b"".join(parts)


@dataclass
class StandIn:
    """The `apptainer` stand-in, put first on PATH, logging each pull/build it performs."""

    binary: Path
    log: Path
    cache: Path
    started: Path
    chunks: int

    def calls(self) -> list[list[str]]:
        """One `[verb, source, output, pid, cachedir, build-args]` per pull/build, in order."""
        if not self.log.exists():
            return []
        return [line.split(" ") for line in self.log.read_text().splitlines()]

    def install(self, bindir: Path, name: str = "apptainer") -> Path:
        """Another copy of the stand-in, e.g. to break it or to name it `singularity`."""
        return install_standin(bindir, name)

    def expected(self, source: str) -> bytes:
        """The exact bytes of a complete image of `source`."""
        return expected_image(source, self.chunks)


def real_apptainer() -> ApptainerRuntime | None:
    """A real apptainer/singularity on PATH (never one of the stand-ins under tests/), or None."""
    entries = os.environ.get("PATH", "").split(os.pathsep)
    path = os.pathsep.join(entry for entry in entries if not entry.startswith(str(TESTS_DIR)))
    try:
        found = find_runtime(env={"PATH": path})
    except ImageError:
        return None
    return None if found.binary.startswith(str(TESTS_DIR)) else found


def install_standin(bindir: Path, name: str = "apptainer") -> Path:
    """Copy the stand-in into `bindir` as `name`, its shebang naming this interpreter (no PATH lookup)."""
    bindir.mkdir(parents=True, exist_ok=True)
    target = bindir / name
    body = STANDIN.read_text().split("\n", 1)[1]
    target.write_text(f"#!{sys.executable}\n{body}")
    target.chmod(0o755)
    return target


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    """Environment where discovery finds the stand-in, with a private SIF cache and call log."""
    bindir = tmp_path / "bin"
    fake = StandIn(
        binary=install_standin(bindir),
        log=tmp_path / "standin.log",
        cache=tmp_path / "cache",
        started=tmp_path / "started",
        chunks=8,
    )
    fake.started.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("STANDIN_LOG", str(fake.log))
    monkeypatch.setenv("STANDIN_CHUNKS", str(fake.chunks))
    monkeypatch.setenv("STANDIN_CHUNK_DELAY", "0.01")
    monkeypatch.setenv("STANDIN_STARTED", str(fake.started))
    for name in ("ATROPOS_APPTAINER", "ATROPOS_SIF_CACHE", "APPTAINER_CACHEDIR", "SINGULARITY_CACHEDIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(commands, "HEARTBEAT_SECONDS", 3600.0)
    monkeypatch.setattr(cache, "_pulled", set())  # what *this test* pulled
    runtime._probe_cached.cache_clear()
    yield fake


@pytest.fixture
def singularity_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH holding nothing but a `singularity` stand-in."""
    bindir = tmp_path / "bin-singularity"
    target = install_standin(bindir, "singularity")
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.delenv("ATROPOS_APPTAINER", raising=False)
    runtime._probe_cached.cache_clear()
    return target


@pytest.fixture(scope="session")
def real_runtime() -> ApptainerRuntime:
    """The real apptainer/singularity, or a skip saying how to provide one."""
    found = real_apptainer()
    if found is None:
        pytest.skip("no real apptainer or singularity on PATH (install Apptainer or put it on PATH)")
    return found


@pytest.fixture(scope="session")
def figures() -> list[str]:
    """Append lines here (build time, SIF size, ...): they are shown in the terminal summary."""
    return _FIGURES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _FIGURES:
        terminalreporter.write_line(f"[apptainer] {line}")


# ------------------------------------------------------------------- task images (image slots)

BASE_IMAGE = os.environ.get("ATROPOS_CI_BASE_IMAGE", "atropos-ci-base:bookworm")


@dataclass(frozen=True)
class TaskImages:
    a: str  # adds /opt/task/tool and deletes /etc/motd (a whiteout)
    b: str  # adds /opt/task/tool-b


def docker_unready() -> str | None:
    """Why the Docker engine cannot make task images here, or None."""
    if shutil.which("docker") is None:
        return "no docker command"
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True).returncode != 0:
        return f"no Docker engine with the base image {BASE_IMAGE} (.ci/system.sh makes it)"
    return None


@pytest.fixture(scope="session")
def task_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TaskImages]:
    """Two task images over the base image's one layer, built by the real engine (no registry)."""
    # tagged per test session: two sessions at once (a by-hand run beside CI) never remove each other's
    images = TaskImages(f"atropos-test-task-a:{os.getpid()}", f"atropos-test-task-b:{os.getpid()}")
    for tag, step in (
        (images.a, "RUN mkdir -p /opt/task && echo 'echo task a' > /opt/task/tool && rm -f /etc/motd"),
        (images.b, "RUN mkdir -p /opt/task && echo 'echo task b' > /opt/task/tool-b"),
    ):
        context = tmp_path_factory.mktemp("ctx")
        (context / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\n{step}\n")
        build = ["docker", "build", "--pull=false", "-q", "-t", tag, str(context)]
        subprocess.run(build, check=True, capture_output=True)
    yield images
    subprocess.run(["docker", "image", "rm", "-f", images.a, images.b], capture_output=True)


def write_sif(root: Path, dest: Path) -> Path:
    """A SIF holding `root` as its squashfs root partition, laid out as Apptainer 1.5's `sif` library
    writes one (header, one 585-byte partition descriptor, the data), for machines without Apptainer;
    atropos.images.sif reads real ones the same way (checked by hand against `apptainer build`)."""
    squash = dest.with_suffix(".squashfs")
    subprocess.run(["mksquashfs", str(root), str(squash), "-noappend", "-quiet", "-no-progress"], check=True)
    data = squash.read_bytes()
    squash.unlink()
    table, start = 4096, 8192
    header = b"#!/usr/bin/env run-singularity\n".ljust(32, b"\0") + b"SIF_MAGIC\0" + b"01\0" + b"02\0"
    header += os.urandom(16) + struct.pack("<qqqqqqqq", 1, 1, 0, 1, table, 585, start, len(data))
    descriptor = struct.pack("<i?III", 0x4004, True, 1, 0x1000001, 0)
    descriptor += struct.pack("<qqqqqqq", start, len(data), len(data), 1, 1, 0, 0)
    descriptor += b"rootfs".ljust(128, b"\0") + struct.pack("<ii", 1, 2).ljust(384, b"\0")
    assert len(header) == 128 and len(descriptor) == 585
    dest.write_bytes(header.ljust(table, b"\0") + descriptor.ljust(start - table, b"\0") + data)
    return dest
