from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest

from tests.server_process import RunningServer, run_server

# the fixtures shared by several test modules, loaded once here (the only way fixtures are loaded)
pytest_plugins = ["tests.nomad_fixtures", "tests.images_fixtures", "tests.swerex_fixtures", "tests.env_fixtures"]


@pytest.fixture(scope="module", params=["bwrap", "none"])
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    """A real server with 4 slots, once with bubblewrap isolation and once without."""
    data_dir = tempfile.mkdtemp(prefix=f"atropos-test-{request.param}-")
    try:
        with run_server(
            data_dir,
            "--slots",
            "4",
            "--isolation",
            request.param,
            "--max-output",
            "65536",
            "--max-file-bytes",
            "1048576",
            "--max-body",
            "4194304",
        ) as srv:
            yield srv
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def bwrap_server() -> Iterator[RunningServer]:
    data_dir = tempfile.mkdtemp(prefix="atropos-test-iso-")
    try:
        with run_server(data_dir, "--slots", "3", "--isolation", "bwrap") as srv:
            yield srv
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def tmpdir_path() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="atropos-test-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
