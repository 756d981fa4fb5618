"""Each tool, in both isolation modes, through real HTTP to a real server."""

from __future__ import annotations

import base64
import os
import threading

import pytest

from atropos.sandbox.runner_choice import find_binary
from atropos.sandbox.settings import DEFAULT_HIBERNATE_AFTER
from tests.server_process import (
    HIBERNATE_ALL,
    RUNNER_ALL,
    RunningServer,
    pids_with_arg,
    wait_for_pids,
    wait_until_gone,
)


def test_health_reports_mode_without_auth(server: RunningServer) -> None:
    import httpx

    r = httpx.get(server.url + "/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["slots"] == 4
    assert body["isolation"] in ("bwrap", "none")
    assert set(body) == {
        "status",
        "version",
        "slots",
        "busy",
        "isolation",
        "runner",
        "network",
        "uid",
        "limits",
        "cgroups",
        "isolation_reason",
        "network_reason",
        "warm",
        "fork",
        "fork_reason",
        "hibernation",
        "root",
        "binds",
        "bwrap",
        "images",
    }
    assert (body["root"], body["binds"]) == (("system", []) if body["isolation"] == "bwrap" else ("none", []))
    assert (body["bwrap"] is not None) == (body["isolation"] == "bwrap")
    assert body["network"] in ("public", "deny", "allow") and body["uid"] != 0
    # forks: an overlay, or a copy with the reason (no bubblewrap, or one without overlays here)
    assert body["fork"] in ("overlay", "copy") and (body["fork"] == "overlay") == (body["fork_reason"] is None), body
    assert body["isolation"] == "bwrap" or body["fork"] == "copy"
    assert body["warm"]["target"] == 4 and 0 <= body["warm"]["ready"] <= 4  # every slot, by default
    # the default (or the whole run's, see tests.server_process); nothing used yet sleeps
    after = float(os.environ.get(HIBERNATE_ALL, DEFAULT_HIBERNATE_AFTER))
    assert body["hibernation"] == {"after_s": after, "asleep": 0}
    # the run's runner (see tests.server_process), else auto's: the compiled one wherever it was built
    assert body["runner"] == os.environ.get(RUNNER_ALL, "compiled" if find_binary() else "python")


def test_bash_separates_streams_and_exit_code(server: RunningServer) -> None:
    res = server.execute(0, "bash", command="echo out; echo err >&2; exit 7")
    assert res["stdout"] == "out\n"
    assert res["stderr"] == "err\n"
    assert res["exit_code"] == 7
    assert res["ok"] is False
    assert res["timed_out"] is False
    assert "out" in str(res["output"]) and "err" in str(res["output"])


def test_bash_runs_in_workspace(server: RunningServer) -> None:
    server.execute(1, "write_file", path="marker.txt", content="here")
    res = server.execute(1, "bash", command="cat marker.txt && echo $HOME")
    assert res["ok"] is True
    assert str(res["stdout"]).startswith("here")


def test_session_keeps_cwd_and_env(server: RunningServer) -> None:
    assert server.execute(2, "bash_session", command="mkdir -p deep/er && cd deep/er && export FOO=bar")["ok"]
    res = server.execute(2, "bash_session", command="pwd; echo $FOO")
    lines = str(res["stdout"]).splitlines()
    assert lines[0].endswith("/deep/er")
    assert lines[1] == "bar"
    res = server.execute(2, "bash_session", command="false")
    assert res["exit_code"] == 1 and res["ok"] is False
    res = server.execute(2, "bash_session", command="printf 'no newline'; printf 'e' >&2")
    assert res["stdout"] == "no newline" and res["stderr"] == "e"
    # output that imitates a delimiter cannot end the command early
    res = server.execute(2, "bash_session", command="echo __ATROPOS_END_x__ 0; echo after")
    assert str(res["stdout"]).endswith("after\n")


def test_a_command_runs_where_and_with_what_its_call_says(server: RunningServer) -> None:
    """`cwd` and `env` of bash and bash_session: for that command alone, a session's own directory
    and variables untouched; a directory that cannot be entered fails the command; bad names refused."""
    server.execute(0, "bash", command="mkdir -p sub/dir")
    res = server.execute(0, "bash", command='pwd; echo "$A|$B"', cwd="sub/dir", env={"A": "x y", "B": "$HOME;'q'"})
    lines = str(res["stdout"]).splitlines()
    assert lines[0].endswith("/sub/dir") and lines[1] == "x y|$HOME;'q'", res
    assert str(server.execute(0, "bash", command="pwd", cwd="/tmp")["stdout"]) == "/tmp\n"
    missing = server.execute(0, "bash", command="echo ran", cwd="nowhere")
    assert missing["exit_code"] == 1 and "ran" not in str(missing["stdout"]) and "nowhere" in str(missing["stderr"])
    assert server.execute(0, "bash_session", command="cd sub && export KEEP=1")["ok"]
    res = server.execute(0, "bash_session", command="pwd; echo $KEEP$ONLY", cwd="/tmp", env={"ONLY": "here"})
    assert str(res["stdout"]) == "/tmp\n1here\n", res
    res = server.execute(0, "bash_session", command="pwd; echo ${ONLY:-unset}")
    assert str(res["stdout"]).splitlines()[0].endswith("/sub") and str(res["stdout"]).endswith("unset\n"), res
    with server.client() as c:
        for args in ({"command": "true", "env": {"1BAD": "x"}}, {"command": "true", "cwd": ""}):
            r = c.post("/execute", json={"slot": 0, "tool": "bash", "args": args})
            assert r.status_code == 422, r.text


def test_session_exit_starts_new_shell(server: RunningServer) -> None:
    server.execute(3, "bash_session", command="cd /; export KEEP=1")
    res = server.execute(3, "bash_session", command="exit 4")
    assert res["exit_code"] == 4 and res["error"]
    res = server.execute(3, "bash_session", command="echo ${KEEP:-unset}")
    assert res["stdout"] == "unset\n"


def test_write_then_read_text_and_binary(server: RunningServer) -> None:
    res = server.execute(0, "write_file", path="a/b/c.txt", content="héllo\n")
    assert res["ok"], res
    assert server.execute(0, "read_file", path="a/b/c.txt")["output"] == "héllo\n"
    blob = bytes(range(256)) * 4
    enc = base64.b64encode(blob).decode()
    assert server.execute(0, "write_file", path="bin.dat", content=enc, encoding="base64")["ok"]
    res = server.execute(0, "read_file", path="bin.dat")
    assert res["ok"] is False and "base64" in str(res["error"])
    res = server.execute(0, "read_file", path="/workspace/bin.dat", encoding="base64")
    assert base64.b64decode(str(res["output"])) == blob
    res = server.execute(0, "write_file", path="run.sh", content="#!/bin/sh\necho ran\n", mode=0o755)
    assert server.execute(0, "bash", command="./run.sh")["stdout"] == "ran\n"


def test_read_limit_and_missing_file(server: RunningServer) -> None:
    server.execute(1, "bash", command="head -c 2000000 /dev/zero > big.bin")
    res = server.execute(1, "read_file", path="big.bin", encoding="base64")
    assert res["ok"] is False and "limit" in str(res["error"])
    res = server.execute(1, "read_file", path="nope.txt")
    assert res["ok"] is False and "no such file" in str(res["error"])
    res = server.execute(1, "read_file", path="big.bin", max_bytes=10, encoding="base64")
    assert res["ok"] is False and "10 bytes" in str(res["error"])


def test_timeout_kills_whole_tree(server: RunningServer) -> None:
    tag = f"3{server.proc.pid % 1000:03d}1"
    cmd = f"sleep {tag} & (sleep {tag} &) ; bash -c 'sleep {tag}' & echo started; wait"
    res = server.execute(2, "bash", timeout=1.0, command=cmd)
    assert res["timed_out"] is True and res["ok"] is False
    assert res["stdout"] == "started\n"  # partial output is returned
    assert wait_until_gone(f"sleep {tag}") == []


def test_session_timeout_keeps_session(server: RunningServer) -> None:
    server.execute(3, "bash_session", command="export STAY=yes")
    res = server.execute(3, "bash_session", timeout=0.5, command="echo before; sleep 30")
    assert res["timed_out"] is True and "before" in str(res["stdout"])
    assert server.execute(3, "bash_session", command="echo $STAY")["stdout"] == "yes\n"
    # a shell busy in a builtin loop cannot be interrupted: it is replaced, and says so
    res = server.execute(3, "bash_session", timeout=0.5, command="while :; do :; done")
    assert res["timed_out"] is True and "restarted" in str(res["error"])
    assert server.execute(3, "bash_session", command="echo alive")["stdout"] == "alive\n"


def test_fork_without_end_is_stopped(server: RunningServer) -> None:
    tag = f"4{server.proc.pid % 1000:03d}2"
    res = server.execute(0, "bash", timeout=1.0, command=f"while :; do sleep {tag} & done")
    # stopped at its timeout, or before it by the slot's process limit (256 by default)
    assert res["ok"] is False and (res["timed_out"] is True or res["limit"] == "processes"), res
    assert wait_until_gone(f"sleep {tag}") == []


def test_output_flood_is_capped(server: RunningServer) -> None:
    res = server.execute(1, "bash", command="yes abcdefghij | head -c 30000000; echo tail-end >&2; echo END")
    assert res["truncated"] is True
    assert res["exit_code"] == 0
    out = str(res["stdout"])
    assert len(out) < 70000  # the server keeps --max-output bytes per stream (65536)
    assert out.startswith("abcdefghij") and out.endswith("END\n") and "omitted" in out
    res = server.execute(1, "bash_session", command="yes xyz | head -c 5000000; echo DONE")
    assert res["truncated"] is True and str(res["stdout"]).endswith("DONE\n")


def test_reset_kills_background_and_empties(server: RunningServer) -> None:
    tag = f"5{server.proc.pid % 1000:03d}3"
    server.execute(2, "bash", command=f"nohup sleep {tag} >/dev/null 2>&1 & setsid sleep {tag} & echo x > f")
    server.execute(2, "bash_session", command=f"sleep {tag} &")
    assert wait_for_pids(f"sleep {tag}", 3) == 3
    with server.client() as c:
        r = c.post("/reset", json={"slot": 2})
    assert r.status_code == 200, r.text
    assert r.json()["killed"] >= 3
    assert wait_until_gone(f"sleep {tag}") == []
    assert server.execute(2, "bash", command="ls -A | wc -l")["stdout"] == "0\n"
    assert server.execute(2, "bash_session", command="pwd")["ok"]


def test_reset_empties_a_tree_deeper_than_python_recursion(server: RunningServer) -> None:
    deep = "import os\nfor _ in range(3000):\n    os.mkdir('d'); os.chdir('d')\nopen('leaf', 'w').write('x')"
    assert server.execute(2, "write_file", path="deep.py", content=deep)["ok"]
    assert server.execute(2, "bash", command="python3 deep.py && chmod 000 d/d/d")["ok"]
    with server.client() as c:
        r = c.post("/reset", json={"slot": 2})
    assert r.status_code == 200, r.text
    assert server.execute(2, "bash", command="ls -A | wc -l")["stdout"] == "0\n"


@pytest.mark.parametrize("tool", ["bash", "bash_session"])
def test_reset_cuts_running_call_short(server: RunningServer, tool: str) -> None:
    result: dict[str, object] = {}

    def long_call() -> None:
        with server.client() as c:
            r = c.post("/execute", json={"slot": 3, "tool": tool, "args": {"command": "sleep 60"}})
            result["status"] = r.status_code
            result["body"] = r.json()

    t = threading.Thread(target=long_call)
    t.start()
    while not pids_with_arg("sleep 60"):
        pass
    with server.client() as c:
        reset = c.post("/reset", json={"slot": 3})
    assert reset.status_code == 200
    # the runner killed the call's processes itself (a runner that did not answer in time is killed
    # by the server instead, and then reports none)
    assert reset.json()["killed"] >= 1, reset.json()
    t.join(20)
    assert result["status"] == 409, result


def test_batch_runs_slots_concurrently_and_in_order(server: RunningServer) -> None:
    stamp = "python3 -c 'import time; print(time.time())'"
    calls = [
        {"slot": 0, "tool": "bash", "args": {"command": f"{stamp}; sleep 1; {stamp}"}},
        {"slot": 1, "tool": "bash", "args": {"command": f"{stamp}; sleep 1; {stamp}"}},
        {"slot": 2, "tool": "bash_session", "args": {"command": "export N=1"}},
        {"slot": 2, "tool": "bash_session", "args": {"command": "echo $N"}},
    ]
    with server.client() as c:
        r = c.post("/batch", json={"calls": calls})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 4
    a = [float(x) for x in results[0]["stdout"].split()]
    b = [float(x) for x in results[1]["stdout"].split()]
    assert a[0] < b[1] and b[0] < a[1], "the two slots' commands did not overlap in time"
    assert results[3]["stdout"] == "1\n"


def test_concurrent_execute_on_different_slots_overlap(server: RunningServer) -> None:
    stamp = "python3 -c 'import time; print(time.time())'"
    spans: dict[int, list[float]] = {}

    def run(slot: int) -> None:
        res = server.execute(slot, "bash", command=f"{stamp}; sleep 1; {stamp}")
        spans[slot] = [float(x) for x in str(res["stdout"]).split()]

    threads = [threading.Thread(target=run, args=(s,)) for s in (0, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    latest_start = max(s[0] for s in spans.values())
    earliest_end = min(s[1] for s in spans.values())
    assert latest_start < earliest_end, spans


def test_openapi_document(server: RunningServer) -> None:
    with server.client() as c:
        doc = c.get("/openapi.json").json()
    assert set(doc["paths"]) == {
        "/health", "/status", "/execute", "/batch", "/reset", "/upload", "/download", "/snapshot", "/snapshots",
        "/snapshots/{name}", "/fork", "/image", "/bridge",
    }  # fmt: skip
    assert "ExecuteResult" in doc["components"]["schemas"]
