"""The server logs one line per call: what it came to, never the command at INFO, never the token."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.server_process import RunningServer, run_server

SECRET_COMMAND = "echo do-not-log-$((6*7))"


def _log_of(srv: RunningServer) -> str:
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.stderr is not None
    return srv.proc.stderr.read()


@pytest.mark.parametrize("level", ["INFO", "DEBUG", "WARNING"])
def test_one_line_per_call_at_the_level_asked(tmp_path: Path, level: str) -> None:
    with run_server(str(tmp_path), "--slots", "1", "--isolation", "none", "--log-level", level) as srv:
        assert srv.execute(0, "bash", command=SECRET_COMMAND)["stdout"] == "do-not-log-42\n"
        assert not srv.execute(0, "read_file", path="nope.txt")["ok"]
        log = _log_of(srv)
    calls = [line for line in log.splitlines() if "event=call " in line]
    assert srv.token not in log
    if level == "WARNING":
        assert calls == []
        return
    assert len(calls) == 2, log
    assert "slot=0 tool=bash ok=True exit=0 " in calls[0] and "truncated=False timed_out=False limit=None" in calls[0]
    assert "slot=0 tool=read_file ok=False" in calls[1]
    assert ("do-not-log" in log) is (level == "DEBUG")  # the command's text: at DEBUG only
