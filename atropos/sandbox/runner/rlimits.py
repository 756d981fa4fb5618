"""Resource limits of a slot: how the runner enforces its share (stdlib only: the runner runs
without site-packages). The configuration is `slot_limits.SlotLimits`.

Three layers, each used where it holds:
- rlimits, set as hard limits on the runner at start so every command inherits them and none can
  raise them: memory (RLIMIT_DATA, per process), file size (RLIMIT_FSIZE), core dumps off, and the
  process count (RLIMIT_NPROC, only inside the slot's own user namespace, where the kernel counts
  the slot's processes alone; elsewhere it would count all of the user's processes on the host).
  CPU time (RLIMIT_CPU) is set by each command's own shell before its script runs (`shell_prelude`),
  so the long-lived runner's own CPU never counts against it and nothing the command starts escapes it.
- cgroups (see cgroups.py), when the machine lets the server create them: memory and process
  count for the slot as a whole. Root ignores RLIMIT_NPROC, so for root this is the hard bound.
- a watch in the runner (LimitWatch), while calls run: the workspace's size (no kernel limit
  exists for a directory) and the process count where neither of the above holds.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

from atropos.sandbox.runner.protocol import LimitKind, Outcome
from atropos.units import format_size


@dataclass(frozen=True)
class RunnerLimits:
    """What the runner enforces itself (parsed from its command line)."""

    memory: int | None = None
    file_size: int | None = None
    cpu_seconds: int | None = None
    workspace: int | None = None
    processes: int | None = None
    nproc_rlimit: bool = False

    def apply_to_self(self) -> None:
        """Hard rlimits on the runner, inherited by every command and never raised by one."""
        _set_hard(resource.RLIMIT_CORE, 0)
        if self.memory is not None:
            _set_hard(resource.RLIMIT_DATA, self.memory)
        if self.file_size is not None:
            _set_hard(resource.RLIMIT_FSIZE, self.file_size)
        if self.nproc_rlimit and self.processes is not None:
            _set_hard(resource.RLIMIT_NPROC, self.processes)

    def shell_prelude(self) -> str:
        """Shell that gives the shell running it the CPU time limit: SIGXCPU at the limit, SIGKILL a
        second later (the soft limit first: it must never exceed the hard one). Run by the command's
        own shell before anything else, so nothing it starts escapes it (setting it from the runner
        after the spawn left a window where a child forked at once had none)."""
        if self.cpu_seconds is None:
            return ""
        given = resource.getrlimit(resource.RLIMIT_CPU)[1]  # never above what we were given (a batch system's)
        soft, hard = self.cpu_seconds, self.cpu_seconds + 1
        if given != resource.RLIM_INFINITY:
            soft, hard = min(soft, given), min(hard, given)
        failed = "echo 'atropos-sandbox: cannot set the CPU time limit' >&2; exit 126"
        return f"{{ ulimit -S -t {soft} && ulimit -H -t {hard}; }} || {{ {failed}; }}; "


def _set_hard(which: int, value: int) -> None:
    hard = resource.getrlimit(which)[1]
    if hard != resource.RLIM_INFINITY and hard < value:
        value = hard  # never above what we were given
    resource.setrlimit(which, (value, value))


# exit codes of commands killed by the rlimit signals, as shells report them
_SIGNAL_LIMITS: dict[int, LimitKind] = {128 + 24: "cpu_time", 128 + 25: "file_size"}


# what programs print when an allocation fails under RLIMIT_DATA (Python, C, C++, Go, Node, Rust)
NO_MEMORY = (
    "MemoryError",
    "Cannot allocate memory",
    "std::bad_alloc",
    "out of memory",
    "JavaScript heap out of memory",
    "memory allocation of",
)


def limit_of_result(result: Outcome) -> LimitKind | None:
    """The limit a failed command most likely ran into, judged by its exit and its last words."""
    code = result.get("exit_code")
    if isinstance(code, int) and code in _SIGNAL_LIMITS:
        return _SIGNAL_LIMITS[code]
    if result.get("ok") or code in (0, None):
        return None
    tail = (result.get("stderr") or "")[-2048:]
    return "memory" if any(text in tail for text in NO_MEMORY) else None


def describe_limit(kind: str, value: int | None) -> str:
    """What a result says of the limit `kind` (set to `value`) that a command ran into."""
    size = format_size(value) if value else "?"
    texts = {
        "cpu_time": f"CPU time limit reached ({value or '?'} s per process)",
        "file_size": f"file size limit reached ({size})",
        "processes": f"process limit reached ({value or '?'} per slot)",
        "workspace": f"workspace size limit reached ({size}); delete files to continue",
        "memory": f"memory limit reached ({size})",
    }
    return texts.get(kind, kind)


def workspace_bytes(root: str) -> int:
    """Bytes allocated under `root` (st_blocks: sparse files count as what they use)."""
    total = 0
    stack = [root]
    while stack:
        top = stack.pop()
        try:
            with os.scandir(top) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except OSError:
            continue
    return total


def count_tasks() -> int:
    """Threads of all processes in our PID namespace: inside a slot's sandbox, what its pids cgroup
    and RLIMIT_NPROC count (both count threads, not processes)."""
    total = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                total += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                continue  # exited meanwhile
    return total
