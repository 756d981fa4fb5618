"""Cross-slot attacks on a real server: slot B against a process of slot A and against the server.

With bubblewrap each slot has its own PID namespace, so another slot's processes (and the server)
have no pid it can name: kill, ptrace, /proc/<pid>/{mem,environ} all fail, and `kill -9 -1` reaches
only its own processes. Within its own slot, its processes cannot reach the slot's runner (its pid
1, not dumpable): neither kill it nor open its pipes to the server (to forge a call's answer or read
another call's request). With `--isolation none` none of that holds (same user, same PID namespace):
the last tests assert what still holds there and record, as a failing-if-it-changes fact, what does not.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator

import pytest

from tests.attacks import attack_script
from tests.security_fixtures import temporary_server
from tests.server_process import RunningServer, alive, pids_with_arg, wait_for_pids


def start_victim(srv: RunningServer, slot: int) -> tuple[str, int]:
    """A long sleep in `slot`, found from outside by its unique argument; (marker, host pid)."""
    marker = f"7777.{secrets.randbelow(10**9):09d}"
    srv.execute(slot, "bash", command=f"setsid sleep {marker} >/dev/null 2>&1 &")
    assert wait_for_pids(marker, 1) == 1
    return marker, pids_with_arg(marker)[0]


def until_gone(pid: int, rounds: int = 100) -> bool:
    """True once `pid` has died (polled: a death follows its signal by a moment)."""
    for _ in range(rounds):
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def iso_server() -> Iterator[RunningServer]:
    with temporary_server("atropos-test-xslot-", "--slots", "3", "--isolation", "bwrap") as srv:
        yield srv


@pytest.fixture(scope="module")
def plain_server() -> Iterator[RunningServer]:
    with temporary_server("atropos-test-xslot-none-", "--slots", "2", "--isolation", "none") as srv:
        yield srv


@pytest.mark.parametrize("target", ["other slot", "server"])
def test_slot_cannot_signal_trace_or_read_another_slots_process_or_the_server(
    iso_server: RunningServer, target: str
) -> None:
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
    own_marker, own = start_victim(iso_server, 2)
    with iso_server.client() as client:
        res = client.post("/execute", json={"slot": 2, "tool": "bash", "args": {"command": "kill -9 -1"}})
        # the slot's own processes die; its runner, the sandbox's pid 1, is out of their reach and answers
        assert res.status_code == 200, res.text
        assert client.get("/health").status_code == 200
    assert until_gone(own), own_marker
    assert alive(victim) and alive(iso_server.proc.pid)
    assert iso_server.execute(2, "bash", command="echo back")["stdout"] == "back\n"
    assert iso_server.execute(0, "bash", command="echo still")["stdout"] == "still\n"
    iso_server.execute(0, "bash", command=f"pkill -f 'sleep {marker}'")


def test_with_isolation_none_file_tools_stay_confined_and_commands_get_no_token(plain_server: RunningServer) -> None:
    """What holds without bubblewrap: path confinement of the file tools, and no token in commands' env."""
    srv = plain_server
    for path in (
        f"/proc/{srv.proc.pid}/environ",
        os.path.join(srv.data_dir, "slots", "0", "..", "1", "x"),
        "/etc/hostname",
    ):
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
    res = srv.execute(
        1,
        "bash",
        command=f"kill -0 {victim} && echo SIGNAL-OK; tr '\\0' '\\n' < {environ} | grep -c ATROPOS_SANDBOX_TOKEN",
    )
    gave_up_root = os.geteuid() == 0
    assert "SIGNAL-OK" in str(res["stdout"]), res
    assert str(res["stdout"]).split()[-1] == ("0" if gave_up_root else "1"), res
    # the attack script used above with bubblewrap does detect attacks that work
    out = str(srv.execute(1, "bash", command=attack_script(victim), timeout=60)["stdout"])
    assert "ATTACK-signal0-OK" in out and "ATTACK-environ-OK" in out and "ATTACK-cmdline-OK" in out, out
    srv.execute(0, "bash", command=f"pkill -f 'sleep {marker}'")


# the slot's pid 1 and its runner (compiled, or Python's): their fds 0 and 1 are the pipes to the
# server that a forged answer is written into and requests are read from
_FORGE = r"""
sleep 1
for p in /proc/[0-9]*; do
  argv0=$(tr '\0' '\n' < "$p/cmdline" 2>/dev/null | head -1)
  case "$p:$argv0" in /proc/1:*|*:*atropos-runner|*:*bwrap*|*:*python*) ;; *) continue ;; esac
  for id in $(seq 1 400); do
    printf '{"id":%d,"result":{"ok":true,"output":"FORGED","stdout":"FORGED","stderr":"","exit_code":0}}\n' "$id"
  done > "$p/fd/1" 2>/dev/null && echo "ATTACK-forged-into $p"
  timeout 0.2 head -c 1 "$p/fd/0" >/dev/null 2>&1 && echo "ATTACK-read-requests-of $p"
done
"""


def test_a_slots_processes_cannot_forge_its_runners_answers(iso_server: RunningServer) -> None:
    """A process left in the slot (the agent's) writes answers for every likely call id into the
    runner's pipe to the server while a later call (a hidden test's, say) runs: that call still gets
    its own command's result, and the attacker reaches none of those pipes."""
    iso_server.execute(2, "write_file", path="forge.sh", content=_FORGE)
    iso_server.execute(2, "bash", command="nohup sh forge.sh > forge.log 2>&1 &")
    result = iso_server.execute(2, "bash", command="sleep 3; echo real")
    assert result["stdout"] == "real\n" and result["exit_code"] == 0, result
    log = iso_server.execute(2, "bash", command="sleep 1; cat forge.log")
    assert "ATTACK-" not in str(log["stdout"]), log
