"""Bubblewrap isolation: what a slot can and cannot see or touch, and start-up refusals."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import httpx
import pytest

from tests.server_process import RunningServer, run_server, wait_for_pids, wait_until_gone


def test_slot_cannot_see_or_touch_another_slot(bwrap_server: RunningServer) -> None:
    srv = bwrap_server
    srv.execute(1, "write_file", path="secret.txt", content="slot one only")
    other = os.path.join(srv.data_dir, "slots", "1", "secret.txt")
    assert os.path.exists(other)
    res = srv.execute(0, "bash", command=f"cat {other}; ls {srv.data_dir}; cat ../1/secret.txt")
    assert "slot one only" not in str(res["output"])
    res = srv.execute(0, "bash", command=f"echo pwned > {other}; echo x > ../1/secret.txt")
    assert res["ok"] is False
    assert open(other).read() == "slot one only"
    assert srv.execute(0, "read_file", path=other)["ok"] is False


def test_the_python_runner_starts_from_compiled_modules(tmpdir_path: str) -> None:
    """The Python runner's private copy is compiled once by the server: a slot's runner (whose copy
    is read-only, so it could never cache its own) compiles nothing at its start or its wake."""
    script = (
        "import importlib.util, pathlib, sys\n"
        "for src in sorted(pathlib.Path('/run/atropos-runner').rglob('*.py')):\n"
        "    pyc = pathlib.Path(importlib.util.cache_from_source(str(src)))\n"
        "    head = pyc.read_bytes()[:8] if pyc.exists() else b''\n"
        "    ok = head[:4] == importlib.util.MAGIC_NUMBER and head[4:8] == (1).to_bytes(4, 'little')\n"
        "    print('COMPILED' if ok else 'SOURCE', src)\n"
    )
    with run_server(tmpdir_path, "--slots", "1", "--isolation", "bwrap", "--runner", "python") as srv:
        srv.execute(0, "write_file", path="pyc.py", content=script)
        python = os.path.realpath(sys.executable)  # the runner's (isolation.runner_command), bound in the slot
        out = str(srv.execute(0, "bash", command=f"{python} -S -I pyc.py")["output"])
    assert out.count("COMPILED") >= 10 and "SOURCE" not in out, out


def test_root_is_read_only_and_tmp_is_private(bwrap_server: RunningServer) -> None:
    srv = bwrap_server
    res = srv.execute(0, "bash", command="touch /etc/atropos-test || echo refused")
    assert "refused" in str(res["stdout"])
    srv.execute(0, "bash", command="echo zero > /tmp/private")
    assert srv.execute(0, "bash", command="cat /tmp/private")["stdout"] == "zero\n"
    assert srv.execute(1, "bash", command="cat /tmp/private")["exit_code"] != 0
    assert not os.path.exists("/tmp/private")


def test_pids_are_namespaced_and_caps_dropped(bwrap_server: RunningServer) -> None:
    res = bwrap_server.execute(0, "bash", command="ls /proc | grep -c '^[0-9]'; grep CapEff /proc/self/status")
    count, caps = str(res["stdout"]).splitlines()
    assert int(count) < 10  # bwrap's init, the runner, this shell: not the host's processes
    assert caps.split()[1] == "0000000000000000"
    res = bwrap_server.execute(0, "bash", command=f"kill -0 {bwrap_server.proc.pid}")
    assert res["exit_code"] != 0


def test_token_is_not_visible_inside(bwrap_server: RunningServer) -> None:
    res = bwrap_server.execute(0, "bash", command="env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'")
    assert bwrap_server.token not in str(res["output"])


def test_data_dir_outside_tmp_is_hidden() -> None:
    data_dir = tempfile.mkdtemp(prefix="atropos-test-", dir="/var/tmp")
    try:
        with run_server(data_dir, "--slots", "2", "--isolation", "bwrap") as srv:
            srv.execute(1, "write_file", path="s.txt", content="mine")
            res = srv.execute(0, "bash", command=f"ls -A {data_dir} | wc -l; cat {data_dir}/slots/1/s.txt")
            assert str(res["stdout"]).startswith("0\n")
            assert "mine" not in str(res["output"])
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_network_deny(tmpdir_path: str) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    probe = f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 2)\""
    try:
        with run_server(tmpdir_path, "--slots", "1", "--network", "deny") as srv:
            health = httpx.get(srv.url + "/health").json()
            assert health["network"] == "deny" and health["isolation"] == "bwrap"
            assert srv.execute(0, "bash", command=probe)["exit_code"] != 0
        with run_server(tmpdir_path, "--slots", "1", "--network", "allow") as srv:
            assert srv.execute(0, "bash", command=probe)["exit_code"] == 0
    finally:
        listener.close()


def test_sandbox_dies_with_server(tmpdir_path: str) -> None:
    tag = "6" + str(os.getpid() % 10000).zfill(4)
    with run_server(tmpdir_path, "--slots", "2", "--isolation", "bwrap") as srv:
        srv.execute(0, "bash", command=f"sleep {tag} >/dev/null 2>&1 &")
        srv.execute(1, "bash_session", command=f"sleep {tag} &")
        assert wait_for_pids(f"sleep {tag}", 2) == 2
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
    assert wait_until_gone(f"sleep {tag}") == []


def _start_fails(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "atropos.sandbox.server", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert proc.returncode == 2, proc.stderr
    return proc.stderr


def test_refuses_public_address_without_token(tmpdir_path: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ATROPOS_SANDBOX_TOKEN"}
    proc = subprocess.run(
        [sys.executable, "-m", "atropos.sandbox.server", "--host", "0.0.0.0", "--port", "0", "--data-dir", tmpdir_path],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2
    assert "without a token" in proc.stderr


def test_loopback_without_token_generates_one(tmpdir_path: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ATROPOS_SANDBOX_TOKEN"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "atropos.sandbox.server", "--port", "0", "--slots", "1", "--data-dir", tmpdir_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        from tests.server_process import wait_ready

        url = wait_ready(proc, "server")
        token_file = os.path.join(tmpdir_path, "token")
        assert oct(os.stat(token_file).st_mode & 0o777) == "0o600"
        token = open(token_file).read().strip()
        assert (
            httpx.post(url + "/execute", json={"slot": 0, "tool": "bash", "args": {"command": "true"}}).status_code
            == 401
        )
        r = httpx.post(
            url + "/execute",
            json={"slot": 0, "tool": "bash", "args": {"command": "true"}},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 200 and r.json()["ok"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_bwrap_mode_refuses_without_bwrap(tmpdir_path: str) -> None:
    err = _start_fails(["--data-dir", tmpdir_path, "--isolation", "bwrap"], {"ATROPOS_BWRAP": "/nonexistent/bwrap"})
    assert "isolation unavailable" in err


def test_network_deny_refused_without_isolation(tmpdir_path: str) -> None:
    err = _start_fails(["--data-dir", tmpdir_path, "--isolation", "none", "--network", "deny"], {})
    assert "needs bubblewrap" in err


def test_auto_falls_back_and_says_so(tmpdir_path: str) -> None:
    with run_server(tmpdir_path, "--slots", "1", env={"ATROPOS_BWRAP": "/nonexistent/bwrap"}) as srv:
        assert httpx.get(srv.url + "/health").json()["isolation"] == "none"
        assert srv.execute(0, "bash", command="echo ok")["stdout"] == "ok\n"


@pytest.mark.parametrize("slots", ["0", "abc"])
def test_bad_option_values(tmpdir_path: str, slots: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "atropos.sandbox.server", "--slots", slots, "--data-dir", tmpdir_path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "slots" in proc.stderr and "Traceback" not in proc.stderr
