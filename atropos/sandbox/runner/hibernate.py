"""Hibernation: an idle runner gives its memory back and comes back on the next request.

A Python runner costs ~10 MB of private memory; its slot's floor (bubblewrap and the session's
shell) is under 1 MB. When the server asks (`{"op": "hibernate"}`, sent only to a slot idle for
`--hibernate-after` seconds, with nothing else in flight), a runner whose slot runs nothing but the
session's idle shell answers `{"ok": true}` and execs, in the same process, a holder: a
`/bin/sh` that reads one line from the runner's stdin and then execs the runner again with
`--resume STATE`. The pid stays, so the shell stays this process's child, bubblewrap's sandbox and
its limits stay, and the server's pipes stay; the server writes the wake line before the next
request. STATE carries what the Python process held: the session shell's pid and the three pipe
fds the runner keeps to it, what its background jobs printed and nobody read yet (in a memfd), a
limit trip not yet reported and the workspace size the limit watch last saw.

The runner refuses (`{"ok": false, "why": ...}`) while any other process lives in the slot (a
background job may print, fork or need its limits watched) or while the shell holds a socket (the
server stops the slot's network helper while it sleeps).
"""

from __future__ import annotations

import json
import os
import sys
from typing import TypedDict

from atropos.host import snapshot, tree_members
from atropos.sandbox.runner.protocol import LimitKind

HOLDER = "/bin/sh"
# one line, then the runner again; EOF means the server is gone: the slot ends with us
_HOLD = 'IFS= read -r _ || exit 0; exec "$@"'
RESUME_FLAG = "--resume"


class SessionFds(TypedDict):
    pid: int
    stdout: int
    stderr: int
    control: int


class ResumeState(TypedDict):
    session: SessionFds | None
    session_lost: bool  # the shell died since the last call: the next call says so
    background: int  # memfd with the unread background output, or -1
    dropped: int  # background bytes dropped before hibernation
    unreported: LimitKind | None
    last_size: int


def why_not(shell: int | None) -> str | None:
    """Why this runner cannot hibernate now (None: it can): any process in the slot but the
    session's shell, or a socket that shell holds."""
    others = tree_members(os.getpid(), snapshot(), include_root=False) - ({shell} if shell else set())
    if others:
        return f"{len(others)} other process(es) run in the slot"
    if shell is not None and _holds_socket(shell):
        return "the session's shell holds a socket"
    if not os.access(HOLDER, os.X_OK):
        return f"no {HOLDER} in the sandbox"
    return None


def _holds_socket(pid: int) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"{fd_dir}/{name}").startswith("socket:"):
                return True
        except OSError:
            continue
    return False


def stash(data: bytes) -> int:
    """`data` in an inheritable memfd (it survives exec), or -1 when there is none."""
    if not data:
        return -1
    fd = os.memfd_create("atropos-background", 0)
    os.write(fd, data)
    return fd


def unstash(fd: int) -> bytes:
    if fd < 0:
        return b""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def hold(state: ResumeState) -> None:
    """Exec the holder; it execs this runner's own command line again, with `state`."""
    kept = [state["background"]]
    if state["session"] is not None:
        s = state["session"]
        kept += [s["stdout"], s["stderr"], s["control"]]
    for fd in kept:
        if fd >= 0:
            os.set_inheritable(fd, True)
    argv = [*without_resume(sys.orig_argv), RESUME_FLAG, json.dumps(state, separators=(",", ":"))]
    sys.stdout.flush()
    os.set_blocking(0, True)  # the event loop made it non-blocking: the holder's read would fail at once
    os.execv(HOLDER, [HOLDER, "-c", _HOLD, "atropos-hold", *argv])


def without_resume(argv: list[str]) -> list[str]:
    if RESUME_FLAG in argv:
        at = argv.index(RESUME_FLAG)
        return argv[:at] + argv[at + 2 :]
    return list(argv)
