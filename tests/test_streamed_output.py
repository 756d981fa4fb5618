"""Streamed output (`POST /execute` with `stream: true`, `pool.execute_stream`) and background jobs'
output read back from a session (`read_background`), on a real server with and without bubblewrap."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator

import httpx
import pytest

from atropos.sandbox.models import ExecuteResult, OutputChunk
from atropos.slots import SlotPool, SlotPoolConfig
from tests.server_process import RunningServer, wait_for_pids, wait_until_gone


def _events(response: httpx.Response) -> Iterator[dict[str, object]]:
    for line in response.iter_lines():
        if line:
            yield json.loads(line)


def _stream(
    c: httpx.Client, slot: int, tool: str, command: str, timeout: float = 20.0, **args: object
) -> httpx.Response:
    body = {"slot": slot, "tool": tool, "stream": True, "timeout": timeout, "args": {"command": command, **args}}
    return c.send(c.build_request("POST", "/execute", json=body), stream=True)


@pytest.mark.parametrize("tool", ["bash", "bash_session"])
def test_output_arrives_while_the_command_runs(server: RunningServer, tool: str) -> None:
    """The command waits for a file that the test makes only once the first line reached it: without
    streaming it would wait until its timeout."""
    go = os.path.join(server.data_dir, "slots", "0", "go")
    command = "rm -f go; echo first; echo to-err >&2; until [ -e go ]; do sleep 0.05; done; echo second; printf 'é'"
    with server.client() as c:
        response = _stream(c, 0, tool, command)
        assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
        events = _events(response)
        first = next(events)
        assert first == {"chunk": {"stream": "stdout", "data": "first\n"}}, first
        with open(go, "w"):
            pass
        rest = list(events)
        response.close()
    chunks = [e["chunk"] for e in rest[:-1]]
    assert {"stream": "stderr", "data": "to-err\n"} in chunks
    assert "".join(str(ch["data"]) for ch in chunks if ch["stream"] == "stdout") == "second\né"  # type: ignore[index]
    result = ExecuteResult.model_validate(rest[-1]["result"])
    assert result.ok and not result.timed_out and result.stdout == "first\nsecond\né"


def test_streamed_output_is_bounded_like_the_result(server: RunningServer) -> None:
    with server.client() as c:
        response = _stream(c, 1, "bash", "head -c 200000 /dev/zero | tr '\\0' x; printf 'ü%.0s' $(seq 40000)")
        events = list(_events(response))
        response.close()
    streamed = "".join(str(e["chunk"]["data"]) for e in events[:-1])  # type: ignore[index]
    assert len(streamed.encode()) == 65536 and set(streamed) == {"x"}  # the fixture's --max-output
    assert events[-1]["result"]["truncated"] is True  # type: ignore[index]


def test_a_client_that_leaves_does_not_keep_the_command_past_its_timeout(server: RunningServer) -> None:
    marker = f"{time.time_ns() % 100000}.25"
    with server.client() as c:
        response = _stream(c, 2, "bash", f"echo started; sleep {marker}", timeout=2.0)
        assert next(_events(response)) == {"chunk": {"stream": "stdout", "data": "started\n"}}
        response.close()  # mid-stream
    assert wait_for_pids(f"sleep {marker}", 1) == 1  # it ran, after the client left too
    assert wait_until_gone(f"sleep {marker}", timeout=15) == []  # and not past its 2 s timeout (+ margin)
    assert server.execute(2, "bash", command="echo next")["stdout"] == "next\n"


def test_what_does_not_stream(server: RunningServer) -> None:
    call = {"slot": 0, "tool": "bash", "stream": True, "args": {"command": "true"}}
    with server.client() as c:
        batched = c.post("/batch", json={"calls": [call]})  # a batch answers once: `stream` is ignored there
        assert batched.status_code == 200 and batched.json()["results"][0]["ok"] is True
        assert c.post("/execute", json={**call, "slot": 99}).status_code == 404
        # a file tool streams nothing: its one line is the result
        body = {"slot": 0, "tool": "read_file", "stream": True, "args": {"path": "no-such-file"}}
        lines = [json.loads(x) for x in c.post("/execute", json=body).text.splitlines()]
        assert len(lines) == 1 and lines[0]["result"]["ok"] is False


def test_background_output_of_a_session_is_read_back(server: RunningServer) -> None:
    # the job prints once told to, and only between session commands (one-shot calls in other
    # shells tell it and wait for it), so each of its lines is background output, none a command's
    job = "rm -f go done; (until [ -e go ]; do sleep 0.01; done; echo bg 1; echo bg 2; echo bg-err >&2; touch done) &"
    launched = server.execute(3, "bash_session", command=job)
    assert (launched["stdout"], launched["stderr"]) == ("", "")
    server.execute(3, "bash", command="touch go; until [ -e done ]; do sleep 0.01; done")
    # what the pipes held before a command was sent is background, never that command's output
    # (also when the runner has just woken up to take the call)
    out = server.execute(3, "bash_session", command="echo fg", read_background=True)
    assert (out["stdout"], out["stderr"], out["background"]) == ("fg\n", "", "bg 1\nbg 2\nbg-err\n")
    assert server.execute(3, "bash_session", command="true", read_background=True)["background"] == ""
    # bounded: the newest 64 KiB, and how much older output went
    job = "rm -f done; (sleep 0.2; head -c 100000 /dev/zero | tr '\\0' y; echo; echo end; touch done) &"
    server.execute(3, "bash_session", command=job)
    server.execute(3, "bash", command="until [ -e done ]; do sleep 0.05; done")  # another shell waits for it
    tail = str(server.execute(3, "bash_session", command="true", read_background=True)["background"])
    assert tail.startswith("[... ") and "older bytes dropped" in tail and tail.endswith("y\nend\n")
    assert server.execute(3, "bash_session", command="true")["background"] is None  # not asked


def test_pool_execute_stream(tmpdir_path: str) -> None:
    async def scenario() -> None:
        async with SlotPool(SlotPoolConfig(slots_per_container=1, min_containers=1, max_containers=1)) as pool:
            async with pool.slot("t") as slot:
                events = [e async for e in pool.execute_stream(slot, "bash", {"command": "echo a; echo b >&2; exit 3"})]
                assert isinstance(events[-1], ExecuteResult) and events[-1].exit_code == 3
                chunks = {(e.stream, e.data) for e in events[:-1] if isinstance(e, OutputChunk)}
                assert chunks == {("stdout", "a\n"), ("stderr", "b\n")} and len(events) == 3
                # leaving early: the slot still answers its next call
                stream = pool.execute_stream(slot, "bash", {"command": "echo x; sleep 1; echo y"}, 5)
                async with contextlib.aclosing(stream):
                    async for event in stream:
                        assert event == OutputChunk(stream="stdout", data="x\n")
                        break
                assert (await pool.execute(slot, "bash", {"command": "echo after"})).stdout == "after\n"

    asyncio.run(scenario())
