"""Child processes of the slot runner: spawning, non-blocking pipe reads, and one reaper for all.

The runner is a child subreaper, so orphans of commands are reparented to it and must be
reaped; one SIGCHLD handler reaps everything and hands exit codes to the spawned commands.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Python ignores these at start-up and an ignored signal stays ignored across exec: without the
# reset, `yes | head` ends with "Broken pipe" errors and a file over RLIMIT_FSIZE is an EFBIG
# error instead of SIGXFSZ (what subprocess's restore_signals does for Popen)
_PYTHON_IGNORED = (signal.SIGPIPE, signal.SIGXFSZ)


def exit_code_of(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code  # killed by signal N -> 128+N, as shells report it


@dataclass
class Child:
    pid: int
    stdout_fd: int
    stderr_fd: int
    exited: asyncio.Future[int]
    extra_fds: list[int] = field(default_factory=list)


class PipeReader:
    """Reads a non-blocking pipe from the event loop, feeding each chunk to `sink`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, sink: Callable[[bytes], None]) -> None:
        self.loop = loop
        self.fd = fd
        self.sink = sink
        self.eof = loop.create_future()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        self.drain()

    def drain(self) -> None:
        """Read everything available now (also used after the writer exited)."""
        if self.eof.done():
            return
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                return
            self.sink(chunk)

    def close(self) -> None:
        if not self.eof.done():
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.eof.set_result(None)


class Children:
    def __init__(self, loop: asyncio.AbstractEventLoop, env: dict[str, str], prelude: str = "") -> None:
        self.loop = loop
        self.env = env
        # shell every `shell` child runs before its script (the CPU time limit): in the child itself,
        # so not one instruction of the script, nor a process it forks, runs without it
        self.prelude = prelude
        self._waiting: dict[int, asyncio.Future[int]] = {}
        loop.add_signal_handler(signal.SIGCHLD, self.reap)

    def shell(self, script: str, *, options: Sequence[str] = (), pass_fds: Sequence[int] = ()) -> Child:
        """`bash OPTIONS -c SCRIPT`, the prelude first (on the script's first line: its line numbers stay)."""
        return self.spawn(["bash", *options, "-c", self.prelude + script], pass_fds=pass_fds)

    def spawn(self, argv: Sequence[str], *, pass_fds: Sequence[int] = ()) -> Child:
        """Start `argv` in its own session (its tree is findable by sid), stdin from /dev/null.

        posix_spawn (vfork + exec in libc) costs the runner a fraction of subprocess.Popen's CPU;
        the runner already sits in the workspace, so the child inherits the right cwd. Every fd we
        own is close-on-exec (PEP 446) except `pass_fds`, which the caller made inheritable.
        """
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
        ]
        try:
            pid = os.posix_spawnp(
                argv[0],
                list(argv),
                self.env,
                file_actions=actions,
                setsid=True,
                setsigdef=_PYTHON_IGNORED,
                setsigmask=(),
            )
        except OSError:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        finally:
            for fd in pass_fds:
                os.set_inheritable(fd, False)
        os.close(out_w)
        os.close(err_w)
        exited: asyncio.Future[int] = self.loop.create_future()
        self._waiting[pid] = exited
        # SIGCHLD handlers run from the loop, so a child that already exited is still reaped
        # after this registration; reap now anyway in case its signal was coalesced.
        self.loop.call_soon(self.reap)
        return Child(pid, out_r, err_r, exited)

    def adopt(self, pid: int, stdout_fd: int, stderr_fd: int) -> Child:
        """A child this process started before it exec'd again (see runner.hibernate): waited for
        like one spawned now; one that already exited is reaped at once."""
        exited: asyncio.Future[int] = self.loop.create_future()
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not ours any more (reaped meanwhile): it is gone
            exited.set_result(-1)
        else:
            if done:
                exited.set_result(exit_code_of(status))
            else:
                self._waiting[pid] = exited
        return Child(pid, stdout_fd, stderr_fd, exited)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            fut = self._waiting.pop(pid, None)
            if fut is None:
                continue  # an orphan reparented to us
            if not fut.done():
                fut.set_result(exit_code_of(status))
