"""`/status` and `atropos-sandbox status`: what each slot runs now, and what the server enforces."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.server_process import run_server


def _status(url: str, token: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ATROPOS_SANDBOX_TOKEN": token}
    return subprocess.run([sys.executable, "-m", "atropos.cli", "status", url, *extra], capture_output=True,
                          text=True, timeout=60, env=env)  # fmt: skip


def test_status_shows_a_running_call_and_what_is_enforced(tmp_path: Path) -> None:
    # awake slots: a sleeping one shows as `asleep` (tests/test_hibernation.py)
    with run_server(str(tmp_path), "--slots", "2", "--isolation", "none", "--hibernate-after", "0") as srv:
        sleeper = threading.Thread(target=srv.execute, args=(1, "bash"), kwargs={"command": "sleep 3"})
        sleeper.start()
        time.sleep(1.0)
        with srv.client() as c:
            data = c.get("/status").json()
        shown = _status(srv.url, srv.token)
        sleeper.join()
        after = _status(srv.url, srv.token)
    assert [a["state"] for a in data["slot_activity"]] == ["idle", "running"]
    assert data["slot_activity"][1]["tool"] == "bash" and data["slot_activity"][1]["running_s"] >= 0.5
    assert data["isolation"] == "none" and "limits" in data and data["busy"] == 1
    assert shown.returncode == 0, shown.stderr
    rows = shown.stdout.splitlines()
    assert "isolation none (--isolation none was asked for)  network allow" in rows[1], shown.stdout
    assert rows[-1].split()[:3] == ["1", "running", "bash"] and rows[-2].split()[:2] == ["0", "idle"]
    assert after.stdout.splitlines()[-1].split() == ["1", "idle", "-", "-", "0", "1", "-"], after.stdout


def test_status_says_what_a_slot_sees(tmp_path: Path) -> None:
    shown_dir = tempfile.mkdtemp(prefix="atropos-shown-")  # mode 0700 by mkdtemp: the server's user reaches it
    os.chmod(shown_dir, 0o755)
    try:
        with run_server(str(tmp_path / "data"), "--slots", "1", "--bind-ro", f"{shown_dir}:/mnt/tasks") as srv:
            shown = _status(srv.url, srv.token)
    finally:
        os.rmdir(shown_dir)
    assert shown.returncode == 0, shown.stderr
    assert (
        f"slot root: system (the node's /usr, /bin, /sbin, /lib*, /sys and a curated /etc); "
        f"binds: {shown_dir}:/mnt/tasks (ro)"
    ) in shown.stdout.splitlines(), shown.stdout


def test_status_needs_the_token_and_says_so(tmp_path: Path) -> None:
    with run_server(str(tmp_path), "--slots", "1", "--isolation", "none") as srv:
        wrong = _status(srv.url, "not-the-token")
        with srv.client() as c:
            anonymous = c.get("/status", headers={"Authorization": ""})
    assert anonymous.status_code == 401
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr and "Traceback" not in wrong.stderr, wrong.stderr
