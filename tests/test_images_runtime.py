"""Finding apptainer, else singularity, and its version."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from atropos.images.errors import ApptainerNotFoundError
from atropos.images.runtime import ApptainerRuntime, find_runtime

if TYPE_CHECKING:
    from tests.images_fixtures import StandIn


def test_apptainer_on_path_is_found_with_version(standin: StandIn) -> None:
    found = find_runtime()
    assert found.binary == str(standin.binary)
    assert found.flavor == "apptainer"
    assert found.version == "1.3.99-standin"
    assert found.env_prefix == "APPTAINER_"


def test_singularity_is_the_fallback(singularity_only: Path) -> None:
    found = find_runtime()
    assert found.binary == str(singularity_only)
    assert found.name == "singularity"
    assert found.env_prefix == "SINGULARITY_"


def test_environment_override_wins(standin: StandIn, singularity_only: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATROPOS_APPTAINER", str(standin.binary))
    assert find_runtime().binary == str(standin.binary)
    assert find_runtime(str(singularity_only)).binary == str(singularity_only)


def test_missing_runtime_error_has_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("ATROPOS_APPTAINER", raising=False)
    with pytest.raises(ApptainerNotFoundError, match=r"neither apptainer nor singularity.*install Apptainer"):
        find_runtime()


def test_bad_override_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATROPOS_APPTAINER", str(tmp_path / "nope"))
    with pytest.raises(ApptainerNotFoundError, match=r"\$ATROPOS_APPTAINER .*nope"):
        find_runtime()


def test_binary_that_cannot_report_a_version_is_an_error(
    standin: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = standin.install(tmp_path / "broken")
    monkeypatch.setenv("STANDIN_VERSION_FAIL", "1")
    with pytest.raises(ApptainerNotFoundError, match="--version failed"):
        find_runtime(str(broken))


def test_runtime_describes_itself() -> None:
    runtime = ApptainerRuntime(binary="/usr/bin/singularity", flavor="singularity-ce", version="3.11.4")
    assert runtime.name == "singularity"
    assert runtime.describe() == "singularity-ce 3.11.4 (/usr/bin/singularity)"
