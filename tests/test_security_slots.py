"""Cross-slot attacks on a real server: slot B against a process of slot A and against the server.

With bubblewrap each slot has its own PID namespace, so another slot's processes (and the server)
have no pid it can name: kill, ptrace, /proc/<pid>/{mem,environ} all fail, and `kill -9 -1` reaches
only its own processes. With `--isolation none` none of that holds (same user, same PID namespace):
the last tests assert what still holds there and record, as a failing-if-it-changes fact, what does not.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from tests.security_fixtures import temporary_server
from tests.server_process import RunningServer, pids_with_arg, wait_for_pids

PTRACE_ATTACH = 16


def start_victim(srv: RunningServer, slot: int) -> tuple[str, int]:
    """A long sleep in `slot`, found from outside by its unique argument; (marker, host pid)."""
    marker = f"7777.{secrets.randbelow(10**9):09d}"
    srv.execute(slot, "bash", command=f"setsid sleep {marker} >/dev/null 2>&1 &")
    assert wait_for_pids(marker, 1) == 1
    return marker, pids_with_arg(marker)[0]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def attack_script(pid: int) -> str:
    """Shell run in the attacking slot: each line prints ATTACK-<name>-OK only if the attack worked."""
    ptrace = (f"import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
              f"print('ATTACK-ptrace-OK' if libc.ptrace({PTRACE_ATTACH}, {pid}, 0, 0) == 0 else 'ptrace refused')")
    lines = [
        f"kill -0 {pid} 2>/dev/null && echo ATTACK-signal0-OK",
        f"kill -STOP {pid} 2>/dev/null && echo ATTACK-stop-OK",
        f"head -c 64 /proc/{pid}/environ 2>/dev/null && echo ATTACK-environ-OK",
        f"dd if=/proc/{pid}/mem bs=1 count=1 skip=$((0x400000)) 2>/dev/null | wc -c | grep -q 1 && echo ATTACK-mem-OK",
        f"cat /proc/{pid}/cmdline 2>/dev/null | grep -q . && echo ATTACK-cmdline-OK",
        f"ls /proc/{pid}/root/ >/dev/null 2>&1 && echo ATTACK-root-OK",
        f"command -v python3 >/dev/null && python3 -c \"{ptrace}\"",
        f"command -v strace >/dev/null && timeout 5 strace -p {pid} -e trace=none 2>&1 | head -3 | "
        "grep -q 'attached' && echo ATTACK-strace-OK",
        f"command -v gdb >/dev/null && timeout 10 gdb -batch -p {pid} -ex 'info proc' 2>&1 | "
        "grep -q 'process {pid}' && echo ATTACK-gdb-OK",
    ]
    return "\n".join(lines) + "\ntrue"


@pytest.fixture(scope="module")
def iso_server() -> Iterator[RunningServer]:
    with temporary_server("atropos-test-xslot-", "--slots", "3", "--isolation", "bwrap") as srv:
        yield srv


@pytest.fixture(scope="module")
def plain_server() -> Iterator[RunningServer]:
    with temporary_server("atropos-test-xslot-none-", "--slots", "2", "--isolation", "none") as srv:
        yield srv


@pytest.mark.parametrize("target", ["other slot", "server"])
def test_slot_cannot_signal_trace_or_read_another_slots_process_or_the_server(iso_server: RunningServer,
                                                                               target: str) -> None:
    marker, victim = start_victim(iso_server, 0)
    pid = victim if target == "other slot" else iso_server.proc.pid
    res = iso_server.execute(1, "bash", command=attack_script(pid), timeout=60)
    assert "ATTACK-" not in str(res["stdout"]), res
    assert alive(victim) and alive(iso_server.proc.pid)
    with open(f"/proc/{victim}/stat", "rb") as fh:  # not stopped either
        assert fh.read().rsplit(b")", 1)[1].split()[0] != b"T"
    iso_server.execute(0, "bash", command=f"pkill -f 'sleep {marker}'")


def test_slot_sees_only_its_own_processes(iso_server: RunningServer) -> None:
    marker, _ = start_victim(iso_server, 0)
    res = iso_server.execute(1, "bash", command="cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '")
    assert marker not in str(res["stdout"]) and "atropos.sandbox.server" not in str(res["stdout"])
    iso_server.execute(0, "bash", command=f"pkill -f 'sleep {marker}'")


def test_kill_all_from_a_slot_reaches_only_that_slot(iso_server: RunningServer) -> None:
    marker, victim = start_victim(iso_server, 0)
    with iso_server.client() as client:
        res = client.post("/execute", json={"slot": 2, "tool": "bash", "args": {"command": "kill -9 -1"}})
        # the slot's own runner dies with it: a 503 that names the slot, never a hang or a 500
        assert res.status_code == 503 and "slot 2" in res.json()["error"], res.text
        assert client.get("/health").status_code == 200
    assert alive(victim) and alive(iso_server.proc.pid)
    assert iso_server.execute(2, "bash", command="echo back")["stdout"] == "back\n"
    assert iso_server.execute(0, "bash", command="echo still")["stdout"] == "still\n"
    iso_server.execute(0, "bash", command=f"pkill -f 'sleep {marker}'")


def test_with_isolation_none_file_tools_stay_confined_and_commands_get_no_token(plain_server: RunningServer
                                                                               ) -> None:
    """What holds without bubblewrap: path confinement of the file tools, and no token in commands' env."""
    srv = plain_server
    for path in (f"/proc/{srv.proc.pid}/environ", os.path.join(srv.data_dir, "slots", "0", "..", "1", "x"),
                 "/etc/hostname"):
        res = srv.execute(1, "read_file", path=path)
        assert res["ok"] is False and "outside the workspace" in str(res["error"]), (path, res)
    res = srv.execute(1, "bash", command="env; cat /proc/self/environ")
    assert srv.token not in str(res["output"])


def test_with_isolation_none_slots_are_not_separated(plain_server: RunningServer) -> None:
    """Recorded fact, not a wish: without bubblewrap, slot 1 can signal slot 0 and, unless the server
    was started as root, read the server's env. A server that gave root up is marked undumpable by
    the kernel (its uid changed), so its /proc/PID/environ is then root's alone.

    If this starts failing, isolation none became stronger: update SECURITY.md.
    """
    srv = plain_server
    marker, victim = start_victim(srv, 0)
    environ = f"/proc/{srv.proc.pid}/environ"
    res = srv.execute(1, "bash", command=f"kill -0 {victim} && echo SIGNAL-OK; "
                                         f"tr '\\0' '\\n' < {environ} | grep -c ATROPOS_SANDBOX_TOKEN")
    gave_up_root = os.geteuid() == 0
    assert "SIGNAL-OK" in str(res["stdout"]), res
    assert str(res["stdout"]).split()[-1] == ("0" if gave_up_root else "1"), res
    # the attack script used above with bubblewrap does detect attacks that work
    out = str(srv.execute(1, "bash", command=attack_script(victim), timeout=60)["stdout"])
    assert "ATTACK-signal0-OK" in out and "ATTACK-environ-OK" in out and "ATTACK-cmdline-OK" in out, out
    srv.execute(0, "bash", command=f"pkill -f 'sleep {marker}'")
