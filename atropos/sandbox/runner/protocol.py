"""The pipe between the server and a slot's runner: one typed request per tool, one result shape.

Requests are JSON lines on the runner's stdin, `{"id": N, "op": ..., "timeout": s, ...}`; answers
are JSON lines on its stdout, `{"id": N, "result": Outcome}` or `{"id": N, "error": "..."}`, after
`{"id": N, "chunk": {...}}` lines for a command asked to stream its output.
The op of a tool call is the tool's own name (`bash`, `bash_session`, `read_file`, `write_file`);
`reset`, `ping`, `hibernate` and `listen` are the server's. An `Outcome` carries the fields of the HTTP API's
`ExecuteResult` (atropos.sandbox.models); everything that adds to one after the command ran (a
limit it hit, a note from the sandbox) goes through the three functions at the end of this module.

Standard library only (TypedDicts): the runner runs without site-packages.
"""

from __future__ import annotations

import json
import os
import shlex
from typing import Literal, TypedDict

LimitKind = Literal["memory", "processes", "cpu_time", "file_size", "workspace"]


class _Streamed(TypedDict, total=False):
    # true: the runner also answers `{"id": N, "chunk": {"stream": "stdout"|"stderr", "data": text}}`
    # lines as the command writes, before its result (at most max-output bytes of each stream)
    stream: bool


class _Placed(_Streamed, total=False):
    cwd: str  # where the command runs: relative to the workspace, or absolute as the slot sees it
    env: dict[str, str]  # variables for this command alone


class BashOp(_Placed):
    op: Literal["bash"]
    command: str
    timeout: float


class _SessionOptions(_Placed, total=False):
    read_background: bool  # the result's `background`: what the session's background jobs printed


class SessionOp(_SessionOptions):
    op: Literal["bash_session"]
    command: str
    timeout: float


class ReadFileOp(TypedDict):
    op: Literal["read_file"]
    path: str
    encoding: Literal["text", "base64"]
    max_bytes: int | None
    timeout: float


class WriteFileOp(TypedDict):
    op: Literal["write_file"]
    path: str
    content: str
    encoding: Literal["text", "base64"]
    mode: int | None
    timeout: float


class ResetOp(TypedDict):
    op: Literal["reset"]
    timeout: float


class PingOp(TypedDict):
    op: Literal["ping"]
    timeout: float


class ListenOp(TypedDict):
    op: Literal["listen"]  # see atropos.sandbox.runner.bridge
    port: int
    channel: str  # the server's Unix socket, as the slot sees it, that takes the listening socket
    timeout: float


class HibernateOp(TypedDict):
    op: Literal["hibernate"]  # see atropos.sandbox.runner.hibernate
    timeout: float


ToolOp = BashOp | SessionOp | ReadFileOp | WriteFileOp
Op = ToolOp | ResetOp | PingOp | HibernateOp | ListenOp


class _Ok(TypedDict):
    ok: bool


class Outcome(_Ok, total=False):
    """What one tool call came to (the fields of `ExecuteResult`; absent ones take its defaults)."""

    output: str
    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    truncated: bool
    duration_ms: float
    error: str | None
    limit: LimitKind | None
    background: str | None


class ResetOutcome(TypedDict):
    ok: bool
    killed: int
    duration_ms: float


class PingOutcome(TypedDict):
    ok: bool
    pid: int


class ListenOutcome(TypedDict):
    ok: bool
    port: int


class HibernateOutcome(TypedDict, total=False):
    ok: bool  # true: the runner is asleep; the server writes a line to wake it
    why: str  # why it stays awake


def request_line(rid: int, op: Op) -> bytes:
    return json.dumps({"id": rid, **op}, separators=(",", ":")).encode() + b"\n"


# -- enriching an outcome: the only places that change one after its command ran ----------------


def add_note(outcome: Outcome, text: str) -> None:
    """A line from the sandbox itself (not the command) at the end of what the agent reads."""
    line = f"[sandbox] {text}\n"
    output = outcome.get("output") or ""
    outcome["output"] = output + ("\n" if output and not output.endswith("\n") else "") + line
    outcome["stderr"] = (outcome.get("stderr") or "") + line


def prepend_error(outcome: Outcome, text: str) -> None:
    """`text` first in the outcome's error, before what the command's own failure said."""
    outcome["error"] = text + (f"; {outcome['error']}" if outcome.get("error") else "")


def stopped_by(outcome: Outcome, kind: LimitKind, description: str) -> None:
    """The command was stopped by a limit: it failed, and says which limit in words an agent can act on."""
    outcome["limit"] = kind
    outcome["ok"] = False
    prepend_error(outcome, f"stopped: {description}")


def placed_command(command: str, cwd: str | None, env: dict[str, str] | None, root: str, *, scoped: bool) -> str:
    """`command` run in `cwd` (relative: to the workspace `root`) with `env` added, as shell text.
    `scoped`: in a subshell, so that a session's own directory and variables stay as they were.
    A `cwd` that cannot be entered fails the command (bash's message, exit status 1)."""
    if cwd is None and not env:
        return command
    lines = []
    if cwd is not None:
        lines.append(f"cd -- {shlex.quote(os.path.join(root, cwd))} || exit")
    lines += [f"export {name}={shlex.quote(value)}" for name, value in (env or {}).items()]
    body = "\n".join([*lines, command])
    return f"(\n{body}\n)" if scoped else body
