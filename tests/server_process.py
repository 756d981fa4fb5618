"""Start a real sandbox server as a child process for tests (real HTTP on loopback)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from atropos.host.procs import read_stat

HIBERNATE_ALL = "ATROPOS_TEST_HIBERNATE_AFTER"
RUNNER_ALL = "ATROPOS_TEST_RUNNER"


@dataclass
class RunningServer:
    url: str
    token: str
    proc: subprocess.Popen[str]
    data_dir: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def execute(self, slot: int, tool: str, timeout: float | None = None, **args: object) -> dict[str, object]:
        body: dict[str, object] = {"slot": slot, "tool": tool, "args": args}
        if timeout is not None:
            body["timeout"] = timeout
        with self.client() as c:
            r = c.post("/execute", json=body)
        assert r.status_code == 200, r.text
        return dict(r.json())


def wait_ready(proc: subprocess.Popen[str], what: str, timeout: float = 30.0) -> str:
    """Read the server's stdout up to its READY line; fail with its stderr if it exits first."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("ATROPOS_SANDBOX_READY "):
            return line.split()[1]
        if not line and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}: {err}")
    raise RuntimeError(f"{what} did not become ready in {timeout}s")


@contextmanager
def run_server(
    data_dir: str, *extra: str, env: dict[str, str] | None = None, cwd: str | None = None, token: str | None = None
) -> Iterator[RunningServer]:
    token = token or secrets.token_hex(16)
    full_env = {**os.environ, "ATROPOS_SANDBOX_TOKEN": token, **(env or {})}
    # $ATROPOS_TEST_HIBERNATE_AFTER: every server of the run sleeps its idle slots this soon (the
    # existing tests, unchanged, against slots that sleep between calls); a test's own option wins
    sleep = ["--hibernate-after", os.environ[HIBERNATE_ALL]] if HIBERNATE_ALL in os.environ else []
    # $ATROPOS_TEST_RUNNER: every server of the run runs this slot runner (python: the fallback's
    # run, the same tests); unset, the default (auto: the compiled runner where it was built)
    runner = ["--runner", os.environ[RUNNER_ALL]] if RUNNER_ALL in os.environ else []
    server = [sys.executable, "-m", "atropos.sandbox.server", "--port", "0", "--data-dir", data_dir]
    proc = subprocess.Popen(
        [*server, *sleep, *runner, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        url = wait_ready(proc, "sandbox server")
        yield RunningServer(url, token, proc, data_dir)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def pids_with_arg(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `marker`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{name}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != b"Z" and int(name) != os.getpid():
            found.append(int(name))
    return found


def is_runner(pid: int) -> bool:
    """`pid` is a slot's runner: the compiled one (its program) or the Python one (its bootstrap, which
    bubblewrap's command line holds too, after its options)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
        with open(f"/proc/{pid}/comm", "rb") as fh:
            comm = fh.read().strip()
    except OSError:
        return False
    if os.path.basename(argv[0]) == b"atropos-runner":
        return True
    return comm != b"bwrap" and any(b"atropos.sandbox.runner.main" in arg for arg in argv)


def runner_above(pid: int) -> int:
    """The slot runner that `pid` descends from (seen from the host): what a test kills to end a
    sandbox, from outside (its own processes cannot: it is the sandbox's pid 1)."""
    while not is_runner(pid):
        info = read_stat(pid)
        assert info is not None and info.ppid > 1, f"no runner above {pid}"
        pid = info.ppid
    return pid


def runner_pids() -> list[int]:
    """Every live slot runner on the machine (a sleeping one is its holder instead: not among them)."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and is_runner(int(name))]


def wait_until_gone(marker: str, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = pids_with_arg(marker)
        if not alive:
            return []
        time.sleep(0.05)
    return pids_with_arg(marker)


def wait_for_pids(marker: str, count: int, timeout: float = 10.0) -> int:
    """Wait until `count` processes match `marker` (they may still be forking); return how many do."""
    deadline = time.monotonic() + timeout
    while len(pids_with_arg(marker)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return len(pids_with_arg(marker))


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def server_pastas(server: int) -> list[int]:
    """The pastas the server `server` started (network `public`: its hub's, one)."""
    return [p for p in pids_with_arg("--config-net") if (info := read_stat(p)) is not None and info.ppid == server]


def hub_holder(pasta: int) -> int:
    """The process whose namespaces are the hub's: the one `pasta` joined (its --netns names it)."""
    with open(f"/proc/{pasta}/cmdline", "rb") as fh:
        args = fh.read().split(b"\0")
    return int(next(a for a in args if a.endswith(b"/ns/net")).split(b"/")[2])
