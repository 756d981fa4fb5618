"""One-shot commands (`bash` tool): run, capture bounded output, enforce the timeout on the tree."""

from __future__ import annotations

import time

from atropos.host import kill_tree
from atropos.sandbox.runner.capture import BoundedBuffer, Emit, buffers
from atropos.sandbox.runner.children import Children, PipeReader
from atropos.sandbox.runner.protocol import Outcome


def combine_output(stdout: str, stderr: str) -> str:
    """What an agent reads: stdout, then stderr on a line of its own."""
    if not stdout or not stderr:
        return stdout or stderr
    return stdout + ("" if stdout.endswith("\n") else "\n") + stderr


def outcome_of(
    out: BoundedBuffer,
    err: BoundedBuffer,
    *,
    exit_code: int | None,
    timed_out: bool,
    started: float,
    error: str | None = None,
) -> Outcome:
    stdout, stderr = out.text(), err.text()
    if timed_out and error is None:
        error = "command timed out; its processes were killed"
    return {
        "ok": exit_code == 0 and not timed_out and error is None,
        "output": combine_output(stdout, stderr),
        "stdout": stdout,
        "stderr": stderr,
        "exit_code": exit_code,
        "timed_out": timed_out,
        "truncated": out.truncated or err.truncated,
        "duration_ms": (time.monotonic() - started) * 1000.0,
        "error": error,
    }


async def run_oneshot(
    children: Children, command: str, *, timeout: float, cap: int, emit: Emit | None = None
) -> Outcome:
    started = time.monotonic()
    out, err = buffers(cap, emit)
    child = children.shell(command)
    readers = [
        PipeReader(children.loop, child.stdout_fd, out.write),
        PipeReader(children.loop, child.stderr_fd, err.write),
    ]
    timed_out = False

    def on_timeout() -> None:
        nonlocal timed_out
        timed_out = True
        kill_tree(child.pid)

    timer = children.loop.call_later(timeout, on_timeout)
    try:
        code = await child.exited
    finally:
        timer.cancel()
        # what the command wrote before it exited is in the pipes; background children that
        # still hold them open do not delay the answer
        for reader in readers:
            reader.drain()
            reader.close()
    return outcome_of(out, err, exit_code=code, timed_out=timed_out, started=started)
