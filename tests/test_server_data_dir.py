"""One server per data dir: a second one is refused with whom it would share slot files, and a data
dir left by a dead server is taken over empty."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.server_process import run_server


def test_a_second_server_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    with run_server(str(tmp_path), "--slots", "1", "--isolation", "none") as first:
        port = first.url.rsplit(":", 1)[1]
        second = subprocess.run(
            [sys.executable, "-m", "atropos.sandbox.server", "--port", "0", "--isolation", "none",
             "--data-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60, env={**os.environ, "ATROPOS_SANDBOX_TOKEN": "x"},
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert f"is in use by server pid {first.proc.pid} on port {port}" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        assert first.execute(0, "write_file", path="mine.txt", content="first's")["ok"]  # the first one still serves
        assert (tmp_path / "slots" / "0" / "mine.txt").read_text() == "first's"


def test_a_dead_servers_data_dir_is_taken_over_empty(tmp_path: Path) -> None:
    with run_server(str(tmp_path), "--slots", "2", "--isolation", "none") as dead:
        assert dead.execute(1, "write_file", path="left.txt", content="old run")["ok"]
        os.killpg(dead.proc.pid, signal.SIGKILL)  # dies without cleaning up
        dead.proc.wait()
    assert (tmp_path / "slots" / "1" / "left.txt").exists()
    with run_server(str(tmp_path), "--slots", "2", "--isolation", "none") as heir:
        listing = heir.execute(1, "bash", command="ls -A")
        assert listing["ok"] and listing["stdout"] == "", listing
