"""The one `apptainer exec` command line, as the local backend and the Nomad job build it."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from atropos.images.apptainer import (
    apptainer_secret_env,
    build_apptainer_exec_argv,
    exec_shell_command,
    runtime_env_prefix,
    shell_quote_argv,
)
from atropos.sandbox.settings import TOKEN_ENV, ServerSettings


def test_local_backend_command_binds_data_and_runs_server_on_given_port() -> None:
    argv = build_apptainer_exec_argv(
        "/usr/bin/apptainer",
        "/images/atropos-sandbox.sif",
        binds=[("/scratch/run1/slots-0", "/data")],
        workdir="/scratch/run1/work-0",
        server_args=ServerSettings(host="127.0.0.1", port=41234, slots=8, data_dir="/data").to_args(),
    )
    assert argv == [
        "/usr/bin/apptainer", "exec", "--containall",
        "--workdir", "/scratch/run1/work-0",
        "--bind", "/scratch/run1/slots-0:/data", "--bind", "/dev/full",
        "/images/atropos-sandbox.sif",
        "atropos-sandbox", "server",
        "--host", "127.0.0.1", "--port", "41234", "--data-dir", "/data", "--slots", "8",
    ]  # fmt: skip


def test_no_network_namespace_flags_for_rootless_hosts() -> None:
    container = ServerSettings(host="0.0.0.0", data_dir="/data")
    argv = build_apptainer_exec_argv("apptainer", "x.sif", server_args=container.to_args())
    assert not any(arg.startswith(("--net", "--network")) for arg in argv)
    assert "--fakeroot" not in argv


def test_contain_without_pid_namespace_when_asked() -> None:
    argv = build_apptainer_exec_argv("apptainer", "x.sif", containall=False, server_args=[])
    assert argv[:6] == ["apptainer", "exec", "--contain", "--cleanenv", "--bind", "/dev/full"]
    assert "--containall" not in argv


def test_every_server_option_is_rendered() -> None:
    args = ServerSettings(
        host="0.0.0.0",
        port="${NOMAD_PORT_http}",
        data_dir="/data",
        slots=4,
        token_file="/secrets/token",
        isolation="bwrap",
        network="deny",
        timeout=300.0,
        max_output=65536,
    ).to_args()
    assert args == [
        "--host", "0.0.0.0", "--port", "${NOMAD_PORT_http}", "--data-dir", "/data",
        "--slots", "4", "--token-file", "/secrets/token", "--isolation", "bwrap",
        "--network", "deny", "--timeout", "300.0", "--max-output", "65536",
    ]  # fmt: skip


def test_plain_env_goes_through_env_flags_and_extra_args_before_image() -> None:
    argv = build_apptainer_exec_argv(
        "apptainer",
        "img.sif",
        env={"PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"},
        extra_args=["--nv"],
        server_args=[],
    )
    assert argv[2:] == [
        "--containall", "--bind", "/dev/full", "--env", "PYTHONUNBUFFERED=1", "--env", "LANG=C.UTF-8",
        "--nv", "img.sif", "atropos-sandbox", "server",
    ]  # fmt: skip


@pytest.mark.parametrize("value", ["a,b", 'say "hi"', "two\nlines"])
def test_env_values_apptainer_would_split_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="apptainer_secret_env"):
        build_apptainer_exec_argv("apptainer", "img.sif", env={"X": value}, server_args=[])


@pytest.mark.parametrize("name", ["1X", "A-B", "", "A B"])
def test_bad_env_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="environment variable name"):
        build_apptainer_exec_argv("apptainer", "img.sif", env={name: "v"}, server_args=[])


@pytest.mark.parametrize(
    ("host", "container", "message"),
    [
        ("/a:b", "/data", "contains ':'"),
        ("/a,b", "/data", "contains ','"),
        ("/a", "data", "absolute"),
        ("", "/data", "empty"),
    ],
)
def test_bind_specs_apptainer_cannot_express_are_refused(host: str, container: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_apptainer_exec_argv("apptainer", "img.sif", binds=[(host, container)], server_args=[])


def test_image_that_looks_like_an_option_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid image"):
        build_apptainer_exec_argv("apptainer", "--help", server_args=[])


def test_token_travels_in_process_env_never_in_argv() -> None:
    token = "s3cr3t-token-value"
    env = apptainer_secret_env("/usr/bin/apptainer", {TOKEN_ENV: token})
    container = ServerSettings(host="0.0.0.0", data_dir="/data")
    argv = build_apptainer_exec_argv("/usr/bin/apptainer", "img.sif", server_args=container.to_args())
    assert env == {"APPTAINERENV_ATROPOS_SANDBOX_TOKEN": token}
    assert not any(token in arg for arg in argv)


@pytest.mark.parametrize(
    ("binary", "prefix"),
    [
        ("apptainer", "APPTAINERENV_"),
        ("/opt/apptainer/bin/apptainer", "APPTAINERENV_"),
        ("/usr/local/bin/singularity", "SINGULARITYENV_"),
    ],
)
def test_secret_env_prefix_follows_binary_name(binary: str, prefix: str) -> None:
    assert runtime_env_prefix(binary) == prefix
    assert apptainer_secret_env(binary, {"A": "1"}) == {f"{prefix}A": "1"}


def test_nomad_job_shell_command_keeps_nomad_references_expandable() -> None:
    argv = build_apptainer_exec_argv(
        "apptainer",
        "/shared/images/atropos-sandbox.sif",
        binds=[("${NOMAD_ALLOC_DIR}/data", "/data")],
        workdir="${NOMAD_ALLOC_DIR}/tmp",
        server_args=ServerSettings(host="0.0.0.0", port="${NOMAD_PORT_http}", slots=10, data_dir="/data").to_args(),
    )
    assert exec_shell_command(argv) == (
        'exec apptainer exec --containall --workdir "${NOMAD_ALLOC_DIR}/tmp" '
        '--bind "${NOMAD_ALLOC_DIR}/data:/data" --bind /dev/full /shared/images/atropos-sandbox.sif '
        'atropos-sandbox server --host 0.0.0.0 --port "${NOMAD_PORT_http}" --data-dir /data --slots 10'
    )


def test_shell_string_expands_only_allowed_references_when_run() -> None:
    words = [
        "${NOMAD_ALLOC_DIR}/data:/data",
        "$NOMAD_PORT_http",
        "$HOME stays literal",
        "it's `not` run; $(neither)",
        'quote " and back\\slash ${NOMAD_TASK_NAME}',
        "",
    ]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "NOMAD_ALLOC_DIR": "/alloc dir",
        "NOMAD_PORT_http": "23456",
        "NOMAD_TASK_NAME": "sandbox",
        "HOME": "/should/not/appear",
    }
    script = "printf '%s\\n' " + shell_quote_argv(words)
    out = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:-1] == [
        "/alloc dir/data:/data",
        "23456",
        "$HOME stays literal",
        "it's `not` run; $(neither)",
        'quote " and back\\slash sandbox',
        "",
    ]


def test_shell_string_with_custom_expand_prefixes() -> None:
    quoted = shell_quote_argv(["$SIF", "$NOMAD_X"], expand=("SIF",))
    assert quoted == "\"${SIF}\" '$NOMAD_X'"
    assert shlex.split(shell_quote_argv(["a b", "c"], expand=())) == ["a b", "c"]
