"""`ServerSettings`: the one contract between whoever starts a server and the server that parses it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from atropos.sandbox.limits import SlotLimits
from atropos.sandbox.settings import ServerSettings


def test_what_a_launcher_renders_the_server_reads_back() -> None:
    settings = ServerSettings(
        host="0.0.0.0",
        port=9000,
        slots=16,
        data_dir="/data",
        token_file="/s/t",
        isolation="bwrap",
        network="deny",
        run_as="sandbox",
        timeout=30.0,
        max_output=4096,
        max_file_bytes=2048,
        max_body=8192,
        log_level="DEBUG",
        limits=SlotLimits(memory=None, processes=64, tmp=64 << 20),
    )
    assert ServerSettings.from_args(settings.to_args()) == settings


def test_unset_options_stay_off_the_command_line() -> None:
    assert ServerSettings(slots=2).to_args() == [
        "--host",
        "127.0.0.1",
        "--port",
        "8080",
        "--data-dir",
        "./sandbox-data",
        "--slots",
        "2",
    ]
    assert ServerSettings.from_args([]).to_args() == ServerSettings().to_args()


def test_placed_keeps_the_pool_settings_and_takes_the_launchers_place() -> None:
    pool = ServerSettings(slots=3, network="deny", limits=SlotLimits(processes=32))
    args = pool.placed(host="0.0.0.0", port="${NOMAD_PORT_http}", data_dir="/alloc/data", token_file="/s/t").to_args()
    assert args == [
        "--host",
        "0.0.0.0",
        "--port",
        "${NOMAD_PORT_http}",
        "--data-dir",
        "/alloc/data",
        "--slots",
        "3",
        "--token-file",
        "/s/t",
        "--network",
        "deny",
        "--limit-processes",
        "32",
    ]


@pytest.mark.parametrize("port", ["eighty", "$NOMAD_PORT", "${A}${B}", 70000])
def test_a_port_is_a_number_or_one_shell_reference(port: object) -> None:
    with pytest.raises(ValidationError, match="port"):
        ServerSettings.model_validate({"port": port})


def test_the_server_refuses_a_reference_no_shell_filled_in(tmp_path: object) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "atropos.sandbox.server", "--port", "${NOMAD_PORT_http}", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "no shell filled in" in done.stderr, done.stderr
