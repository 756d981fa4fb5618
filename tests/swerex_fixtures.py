"""Fixtures for the SWE-ReX Apptainer deployment tests.

`apptainer_env` puts the apptainer stand-in (tests/bin/apptainer: `exec` under bubblewrap, `pull`
writing a fake SIF through tests/bin_images/apptainer) first on PATH with a private SIF cache and
call logs (helpers that need no fixture are in tests/swerex_helpers.py).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from atropos.images import cache, commands, runtime
from tests.nomad_fixtures import TESTS_BIN, find_bwrap, write_standin_image


@dataclass
class ApptainerEnv:
    tmp: Path
    cache: Path
    pull_log: Path
    exec_log: Path
    image: Path
    """A stand-in image whose Python (this interpreter) has swe-rex."""

    def pulls(self) -> list[list[str]]:
        """One `[verb, source, output, pid, cachedir, build-args]` per pull, in order."""
        if not self.pull_log.exists():
            return []
        return [line.split(" ") for line in self.pull_log.read_text().splitlines()]

    def execs(self) -> list[list[str]]:
        """The argv (after `apptainer`) of each `apptainer exec`, in order."""
        if not self.exec_log.exists():
            return []
        return [json.loads(line)[1:] for line in self.exec_log.read_text().splitlines()]


@pytest.fixture
def apptainer_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ApptainerEnv:
    env = ApptainerEnv(
        tmp=tmp_path,
        cache=tmp_path / "sif-cache",
        pull_log=tmp_path / "pulls.log",
        exec_log=tmp_path / "execs.log",
        image=Path(write_standin_image(str(tmp_path / "swerex.sif"))),
    )
    path = os.pathsep.join([TESTS_BIN, os.path.dirname(sys.executable), os.environ.get("PATH", "/usr/bin:/bin")])
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("ATROPOS_SIF_CACHE", str(env.cache))
    monkeypatch.setenv("STANDIN_LOG", str(env.pull_log))
    monkeypatch.setenv("STANDIN_CHUNK_DELAY", "0.001")
    monkeypatch.setenv("APPTAINER_STANDIN_LOG", str(env.exec_log))
    bwrap = find_bwrap()
    if bwrap:
        monkeypatch.setenv("APPTAINER_STANDIN_BWRAP", bwrap)
    for name in ("ATROPOS_APPTAINER", "APPTAINER_CACHEDIR", "SINGULARITY_CACHEDIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(commands, "HEARTBEAT_SECONDS", 3600.0)
    monkeypatch.setattr(cache, "_pulled", set())  # what *this test* pulled
    runtime._probe_cached.cache_clear()
    return env
