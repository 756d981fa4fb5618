"""The SWE-ReX server as a process of this host: its port, its start, its end (the whole tree)
and what its output says when it failed."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from swerex.utils.free_port import find_free_port

from atropos import logtail
from atropos.host import read_stat, signal_group, signal_pids, snapshot, tree_members
from atropos.integrations.swerex.errors import PortInUseError

TOKEN_VAR = "SWEREX_AUTH_TOKEN"
"""The variable that carries the token into the container (as `APPTAINERENV_SWEREX_AUTH_TOKEN`)."""

# Runs `swerex-remote` (its `main`) with the token taken from the environment: sys.argv is changed in
# memory only, so /proc/PID/cmdline never holds the token, and popping the variable keeps it out of
# the shells SWE-ReX starts for the agent.
BOOTSTRAP = (
    "import os, sys; "
    f"token = os.environ.pop({TOKEN_VAR!r}); "
    # `--auth-token=T`: a token_urlsafe token may start with '-', which argparse would take for an option
    "sys.argv = ['swerex-remote', '--auth-token=' + token, *sys.argv[1:]]; "
    "from swerex.server import main; main()"
)
HOST = "127.0.0.1"
_STOP_GRACE_SECONDS = 10.0
_TAIL_BYTES = 4000


def claim_port(port: int | None) -> int:
    """`port` if nothing listens on it here (host network: a clash is a clash), else a free one."""
    if port is None:
        return find_free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            raise PortInUseError(
                f"port {port} is already in use on this host ({exc.strerror}); Apptainer shares the host "
                "network, so pick another port or set port=None for a free one"
            ) from None
    return port


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start `argv` in its own process group, its output in `log` (a pipe nobody reads would fill up)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


_GONE_SECONDS = 5.0


def end_process_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it after a grace period, then any descendant that left it.

    What really ends everything is Apptainer's PID namespace (`--containall`): when its init exits,
    the kernel kills every process inside, even ones orphaned after `setsid`. The group signal and the
    snapshot of descendants (SWE-ReX's shells call setsid but stay children of the server) are for
    the runtime's own processes outside that namespace.
    """
    procs = snapshot()
    tree = {pid: procs[pid].start_ticks for pid in tree_members(proc.pid, procs, include_root=False)}
    signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=_STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    signal_group(proc.pid, signal.SIGKILL)  # members that outlived the leader
    signal_pids(_alive(tree), signal.SIGKILL)  # the same processes, not reused pids
    # a killed process dies a moment later: return once every one has (or is a zombie, dead and
    # waiting for a parent, often PID 1 after a reparenting, to reap it)
    deadline = time.monotonic() + _GONE_SECONDS
    while _alive(tree) and time.monotonic() < deadline:
        time.sleep(0.01)


def _alive(tree: dict[int, int]) -> set[int]:
    """The processes of `tree` (pid -> start ticks) still running: not gone, not reused, not zombies."""
    return {
        pid
        for pid, ticks in tree.items()
        if (now := read_stat(pid)) is not None and now.start_ticks == ticks and now.state != "Z"
    }


def read_tail(path: Path) -> str:
    return logtail.tail(path, max_bytes=_TAIL_BYTES).strip()


_HINTS: tuple[tuple[Callable[[str], bool], str], ...] = (
    (
        lambda tail: "No module named 'swerex'" in tail,
        "the image's python3 has no swe-rex: use an image with swe-rex installed (e.g. the project's "
        "air-gapped SIF) or set python_standalone_dir to a standalone Python that has it",
    ),
    (
        lambda tail: "executable file not found" in tail,
        "the image has no usable python3: set python_standalone_dir to a standalone Python with swe-rex",
    ),
    (
        lambda tail: "address already in use" in tail.lower(),
        "the port was taken before the server bound it: start again (port=None picks another)",
    ),
)


def diagnosis(tail: str) -> str:
    for matches, hint in _HINTS:
        if matches(tail):
            return f": {hint}"
    return ""
