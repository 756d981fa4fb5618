"""`build_image` and the `atropos-sandbox image ...` commands, against the apptainer stand-in."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from atropos.cli import main as cli_main
from atropos.images import cli as images_cli
from atropos.images.build import build_image
from atropos.images.cache import cached_image_path, pull_image
from atropos.images.errors import ApptainerNotFoundError, ImageBuildError, ImageNotFoundError

if TYPE_CHECKING:
    from tests.images_fixtures import StandIn


DEFINITION = "Bootstrap: docker\nFrom: python:3.11-slim\n\n%post\n    true\n"


def write_def(directory: Path, text: str = DEFINITION, name: str = "box.def") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def run_image_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="atropos-sandbox")
    images_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["image", *argv])
    return int(args.handler(args))


def test_build_publishes_a_complete_sif(standin: StandIn, tmp_path: Path) -> None:
    definition = write_def(tmp_path)
    out = tmp_path / "out" / "box.sif"
    lines: list[str] = []
    assert build_image(definition, out, progress=lines.append) == out
    verb, source, written = standin.calls()[0][:3]
    assert (verb, source) == ("build", str(definition))
    assert Path(written).parent == out.parent and Path(written).name.startswith(".box.sif.")
    assert out.read_bytes() == standin.expected(str(definition))
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".")) == ["box.sif"]
    assert any("chunks" in line for line in lines)


def test_build_defaults_to_stem_in_current_dir(
    standin: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "defs").mkdir()
    definition = write_def(tmp_path / "defs", name="atropos-sandbox.def")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert build_image(definition) == work / "atropos-sandbox.sif"


def test_failed_build_keeps_the_previous_image(standin: StandIn, tmp_path: Path) -> None:
    broken = write_def(tmp_path, "no header here\n")
    out = tmp_path / "box.sif"
    out.write_bytes(b"previous image")
    with pytest.raises(ImageBuildError, match="no Bootstrap header"):
        build_image(broken, out)
    assert out.read_bytes() == b"previous image"
    assert list(tmp_path.glob(".*.partial.sif")) == []


def test_missing_definition_is_reported_before_the_runtime_runs(standin: StandIn, tmp_path: Path) -> None:
    with pytest.raises(ImageNotFoundError, match="does not exist"):
        build_image(tmp_path / "absent.def", tmp_path / "x.sif")
    assert standin.calls() == []


def test_build_without_runtime_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("ATROPOS_APPTAINER", raising=False)
    with pytest.raises(ApptainerNotFoundError, match="install Apptainer"):
        build_image(write_def(tmp_path), tmp_path / "x.sif")


def test_cli_pull_prints_the_path_and_streams_progress(standin: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_image_cli("pull", "python:3.11", "--cache-dir", str(standin.cache)) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(cached_image_path("python:3.11", standin.cache))
    assert "8/8 chunks" in err.splitlines()


def test_cli_pull_policy_never_fails_clearly(standin: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_image_cli("pull", "python:3.11", "--policy", "never", "--cache-dir", str(standin.cache)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("atropos-sandbox image: error: docker://python:3.11 is not in the SIF cache")
    assert standin.calls() == []


def test_cli_build_and_list(standin: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = standin.cache / "box.sif"
    assert run_image_cli("build", str(write_def(tmp_path)), "-o", str(out), "--quiet") == 0
    pull_image("docker://alpine:3", "missing", standin.cache)
    printed, err = capsys.readouterr()
    assert printed.strip() == str(out)
    assert err == ""
    assert run_image_cli("list", "--cache-dir", str(standin.cache)) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0] == f"# SIF cache: {standin.cache}"
    names = [line.split()[-1] for line in listing[1:-1]]
    assert names[0].startswith("alpine_3-") and names[1] == "box.sif"
    assert all(line.split()[1] == "KiB" for line in listing[1:-1])
    assert listing[-1].startswith("# 2 image(s), ")


def test_cli_runtime_reports_binary_and_version(standin: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_image_cli("runtime") == 0
    assert capsys.readouterr().out == f"{standin.binary}\tapptainer 1.3.99-standin\n"


def test_cli_runtime_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("ATROPOS_APPTAINER", raising=False)
    assert run_image_cli("runtime") == 1
    assert "neither apptainer nor singularity" in capsys.readouterr().err


def test_cli_image_without_action_shows_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_image_cli() == 2
    assert "pull" in capsys.readouterr().err


def test_dispatcher_exposes_image_commands(standin: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["image", "runtime"]) == 0
    assert "1.3.99-standin" in capsys.readouterr().out


def test_cli_build_passes_build_args_and_fakeroot(standin: StandIn, tmp_path: Path) -> None:
    definition = write_def(tmp_path)
    out = tmp_path / "box.sif"
    argv = [
        "build",
        str(definition),
        "-o",
        str(out),
        "-q",
        "--fakeroot",
        "--build-arg",
        "IMAGE=x:1",
        "--build-arg",
        "A=b",
    ]
    assert run_image_cli(*argv) == 0
    assert standin.calls()[0][5] == "IMAGE=x:1,A=b"
    assert run_image_cli("build", str(definition), "-o", str(out), "--build-arg", "novalue") == 1
