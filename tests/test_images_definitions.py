"""images/ and scripts/: the definition files parse and name what they need; the scripts behave."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.images_fixtures import StandIn


REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "images"
SCRIPTS = REPO / "scripts"
# Section names Apptainer accepts (apps sections aside).
KNOWN_SECTIONS = {
    "help", "setup", "files", "labels", "environment", "post", "runscript", "test", "startscript", "arguments",
}  # fmt: skip
BOOTSTRAP_AGENTS = {"docker", "docker-daemon", "docker-archive", "debootstrap", "library", "localimage", "oras"}
BASH = shutil.which("bash") or "/bin/bash"
_TEMPLATE = re.compile(r"{{\s*(\w+)\s*}}")


@dataclass
class Definition:
    """An Apptainer definition file: header keywords and section bodies."""

    header: dict[str, str]
    sections: dict[str, str] = field(default_factory=dict)

    @property
    def arguments(self) -> dict[str, str]:
        pairs = (line.strip().split("=", 1) for line in self.sections.get("arguments", "").splitlines())
        return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def render(text: str, build_args: dict[str, str]) -> str:
    """Apptainer's {{ VAR }} templating: --build-arg values, then %arguments defaults."""
    defaults = parse(text, render_args=False).arguments
    values = {**defaults, **build_args}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"build var {name} is not defined")
        return values[name]

    lines = [line if line.lstrip().startswith("#") else _TEMPLATE.sub(substitute, line) for line in text.splitlines()]
    return "\n".join(lines) + "\n"


def parse(text: str, *, render_args: bool = True, build_args: dict[str, str] | None = None) -> Definition:
    if render_args:
        text = render(text, build_args or {})
    definition = Definition(header={})
    current: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        section = re.match(r"%(\w+)\s*$", line)
        if section:
            if current is not None:
                definition.sections[current] = "\n".join(body)
            current, body = section.group(1), []
            assert current not in definition.sections, f"section %{current} appears twice"
        elif current is not None:
            body.append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition(":")
            assert sep, f"header line without a colon: {line!r}"
            definition.header[key.strip()] = value.strip()
    if current is not None:
        definition.sections[current] = "\n".join(body)
    return definition


def load(name: str, **build_args: str) -> Definition:
    return parse((IMAGES / name).read_text(), build_args=build_args)


def shell_syntax_ok(script: str) -> None:
    done = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", ["atropos-sandbox.def", "atropos-sandbox-airgapped.def"])
def test_definitions_parse_with_known_sections_and_valid_scripts(name: str) -> None:
    definition = load(name, IMAGE="registry.example.org/atropos-sandbox:1")
    assert definition.header["Bootstrap"] in BOOTSTRAP_AGENTS
    assert set(definition.sections) <= KNOWN_SECTIONS
    assert {"test", "runscript", "environment", "help"} <= set(definition.sections)
    for section in ("test", "runscript", "environment", "post"):
        if section in definition.sections:
            shell_syntax_ok(definition.sections[section])


@pytest.mark.parametrize("name", ["atropos-sandbox.def", "atropos-sandbox-airgapped.def"])
def test_test_section_starts_the_server_and_checks_health_and_tools(name: str) -> None:
    script = load(name, IMAGE="x:1").sections["test"]
    assert "atropos-sandbox server --host 127.0.0.1 --port 0" in script
    assert "/health" in script and "ATROPOS_SANDBOX_READY" in script
    assert "command -v bwrap" in script and "command -v git" in script


def test_registry_definition_defaults_to_docker_and_switches_to_the_daemon() -> None:
    registry = load("atropos-sandbox.def", IMAGE="ghcr.io/org/atropos-sandbox:0.1.0")
    assert registry.header == {"Bootstrap": "docker", "From": "ghcr.io/org/atropos-sandbox:0.1.0"}
    daemon = load("atropos-sandbox.def", BOOTSTRAP="docker-daemon", IMAGE="atropos-sandbox:latest")
    assert daemon.header == {"Bootstrap": "docker-daemon", "From": "atropos-sandbox:latest"}


def test_registry_definition_requires_an_image_argument() -> None:
    with pytest.raises(KeyError, match="IMAGE"):
        load("atropos-sandbox.def")


def test_airgapped_definition_bootstraps_debian_and_installs_the_local_wheelhouse() -> None:
    definition = load("atropos-sandbox-airgapped.def")
    assert definition.header["Bootstrap"] == "debootstrap"
    assert definition.header["OSVersion"] == "bookworm"
    assert definition.header["MirrorURL"] == "http://deb.debian.org/debian"
    included = set(definition.header["Include"].split())
    assert {"python3", "python3-venv", "bubblewrap", "git"} <= included
    assert definition.sections["files"].split() == ["dist/wheelhouse", "/opt/atropos-wheelhouse"]
    post = definition.sections["post"]
    assert "pip install --no-index" in post and "--find-links /opt/atropos-wheelhouse atropos-sandbox" in post
    mirrored = load("atropos-sandbox-airgapped.def", MIRROR="http://mirror.local/debian", WHEELHOUSE="/w")
    assert mirrored.header["MirrorURL"] == "http://mirror.local/debian"
    assert mirrored.sections["files"].split()[0] == "/w"


def test_test_section_really_starts_a_server_and_passes(tmp_path: Path) -> None:
    """Run the image's %test on this host against the real server, as the image would."""
    server = shutil.which("atropos-sandbox") or str(Path(sys.executable).parent / "atropos-sandbox")
    if not os.access(server, os.X_OK):
        pytest.skip("the atropos-sandbox console script is not installed")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "atropos-sandbox").symlink_to(server)
    (bindir / "python3").symlink_to(sys.executable)
    if shutil.which("bwrap") is None:
        (bindir / "bwrap").symlink_to("/bin/true")  # %test only checks presence; the server falls back
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "TMPDIR": str(tmp_path)}
    env.pop("ATROPOS_SANDBOX_TOKEN", None)
    script = load("atropos-sandbox-airgapped.def").sections["test"]
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "%test: server healthy:" in done.stdout
    assert [p for p in tmp_path.iterdir() if p.name.startswith("tmp.")] == []  # scratch dir removed


def test_dockerfile_installs_what_the_server_needs() -> None:
    text = (IMAGES / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith(("#", " "))]
    froms = [line for line in instructions if line.startswith("FROM")]
    assert froms and all("PYTHON_IMAGE" in line for line in froms)
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.\d+-slim", text)
    assert re.search(r"apt-get install [^\n]*bubblewrap[^\n]*git", text)
    assert "COPY . ." in text and "pip wheel" in text and "atropos-sandbox" in text
    # the container starts as root so the server can set up the slots' sandboxes; it then becomes
    # the image's unprivileged user (atropos/sandbox/privileges.py)
    assert not re.search(r"^USER ", text, re.MULTILINE)
    assert "ATROPOS_SANDBOX_RUN_AS=sandbox" in text and "--uid 1000" in text
    assert re.search(r"apt-get install [^\n]*passt[^\n]*iproute2", text)
    assert "chmod 1777 /data" in text
    entrypoint = next(line for line in instructions if line.startswith("ENTRYPOINT"))
    assert entrypoint == 'ENTRYPOINT ["tini", "--", "/usr/local/bin/atropos-sandbox-entrypoint"]'
    assert "COPY images/docker-entrypoint.sh /usr/local/bin/atropos-sandbox-entrypoint" in text
    assert ".git" in (IMAGES / "Dockerfile.dockerignore").read_text().split()


@pytest.mark.parametrize(
    ("args", "runs"),
    [
        ([], "atropos-sandbox server --host 0.0.0.0 --port 8080 --data-dir /data"),
        (["--slots", "8"], "atropos-sandbox server --host 0.0.0.0 --port 8080 --data-dir /data --slots 8"),
        (["atropos-sandbox", "server", "--port", "9"], "atropos-sandbox server --port 9"),
        (["echo", "plain"], "plain"),
    ],
)
def test_docker_entrypoint_defaults_to_the_server(tmp_path: Path, args: list[str], runs: str) -> None:
    fake = tmp_path / "atropos-sandbox"
    fake.write_text('#!/bin/sh\necho atropos-sandbox "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["sh", str(IMAGES / "docker-entrypoint.sh"), *args], env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == runs


@pytest.mark.parametrize("script", ["build-image.sh", "build-sif.sh"])
def test_scripts_are_strict_executable_and_explain_themselves(script: str) -> None:
    path = SCRIPTS / script
    assert os.access(path, os.X_OK)
    assert "set -euo pipefail" in path.read_text()
    shell_syntax_ok(path.read_text())
    done = subprocess.run([str(path), "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.startswith("Usage: scripts/")
    bad = subprocess.run([str(path), "--bogus"], capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "unknown argument: --bogus" in bad.stderr


def _bare_path(tmp_path: Path) -> str:
    """A PATH with the basic tools the scripts use but no docker, apptainer or singularity."""
    bindir = tmp_path / "tools"
    bindir.mkdir()
    for tool in ("dirname", "basename", "id", "ls", "mkdir", "rm", "mv", "du", "cut", "date", "cat"):
        found = shutil.which(tool)
        if found:
            (bindir / tool).symlink_to(found)
    return str(bindir)


def test_build_image_without_docker_fails_clearly(tmp_path: Path) -> None:
    env = {"PATH": _bare_path(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run([BASH, str(SCRIPTS / "build-image.sh")], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert "docker is not installed or not on PATH" in done.stderr


def test_build_sif_without_apptainer_fails_clearly(tmp_path: Path) -> None:
    env = {"PATH": _bare_path(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run(
        [BASH, str(SCRIPTS / "build-sif.sh"), "--from", "registry", "--image", "x:1"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "neither apptainer nor singularity is on PATH" in done.stderr


def test_build_sif_from_registry_publishes_the_sif_atomically(standin: StandIn, tmp_path: Path) -> None:
    out = tmp_path / "out" / "atropos-sandbox.sif"
    done = subprocess.run(
        [str(SCRIPTS / "build-sif.sh"), "--image", "ghcr.io/org/atropos-sandbox:1", "-o", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    verb, source, written, _pid, _cache, build_args = standin.calls()[0]
    assert (verb, source) == ("build", str(IMAGES / "atropos-sandbox.def"))
    assert Path(written).name.endswith(".partial.sif") and Path(written).parent == out.parent
    assert build_args == "BOOTSTRAP=docker,IMAGE=ghcr.io/org/atropos-sandbox:1"
    assert out.read_bytes() == standin.expected(source)
    assert [p.name for p in out.parent.iterdir()] == ["atropos-sandbox.sif"]


def test_build_sif_registry_mode_needs_an_image(standin: StandIn) -> None:
    done = subprocess.run([str(SCRIPTS / "build-sif.sh")], capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "--from registry needs --image REF" in done.stderr
    assert standin.calls() == []


def test_build_sif_airgapped_with_a_given_wheelhouse(standin: StandIn, tmp_path: Path) -> None:
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (the script refuses airgapped builds without it)")
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    (wheelhouse / "atropos_sandbox-0.1.0-py3-none-any.whl").write_bytes(b"")
    out = tmp_path / "air.sif"
    done = subprocess.run(
        [str(SCRIPTS / "build-sif.sh"), "--from", "airgapped", "--wheelhouse", str(wheelhouse),
         "--mirror", "http://mirror.local/debian", "-o", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    call = standin.calls()[0]
    assert call[1] == str(IMAGES / "atropos-sandbox-airgapped.def")
    assert call[5] == f"MIRROR=http://mirror.local/debian,SUITE=bookworm,WHEELHOUSE={wheelhouse}"
    assert out.is_file()


def _fake_runtime(tmp_path: Path, exit_code: int) -> Path:
    """An `apptainer` that logs its arguments and fails its %test when `exit_code` is not 0."""
    fake = tmp_path / "apptainer"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "apptainer version 0-fake"; exit 0; fi\n'
        f'echo "$@" >> {tmp_path}/calls\n'
        f"if [ {exit_code} != 0 ]; then echo 'FATAL: While running %test: exit status 1' >&2; exit {exit_code}; fi\n"
        'for last; do :; done; echo image > "$last.sif" 2>/dev/null; for a; do case "$a" in *.partial.sif) '
        'echo image > "$a";; esac; done\n'
    )
    fake.chmod(0o755)
    return fake


def test_build_sif_notest_skips_the_images_test_and_a_failure_says_so(tmp_path: Path) -> None:
    out = tmp_path / "x.sif"
    common = [str(SCRIPTS / "build-sif.sh"), "--image", "r/x:1", "-o", str(out)]
    env = {**os.environ, "APPTAINER": str(_fake_runtime(tmp_path, 0))}
    done = subprocess.run([*common, "--notest"], capture_output=True, text=True, check=False, env=env)
    assert done.returncode == 0 and out.exists(), done.stderr
    assert "--notest" in (tmp_path / "calls").read_text().split()
    out.unlink()
    env["APPTAINER"] = str(_fake_runtime(tmp_path, 255))
    failed = subprocess.run(common, capture_output=True, text=True, check=False, env=env)
    assert failed.returncode == 1 and not out.exists(), failed.stderr
    assert "build failed (exit 255)" in failed.stderr and "pass --notest" in failed.stderr, failed.stderr
