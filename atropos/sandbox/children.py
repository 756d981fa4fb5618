"""Child processes of the slot runner: spawning, non-blocking pipe reads, and one reaper for all.

The runner is a child subreaper, so orphans of commands are reparented to it and must be
reaped; one SIGCHLD handler reaps everything and hands exit codes to the spawned commands.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


def exit_code_of(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code  # killed by signal N -> 128+N, as shells report it


@dataclass
class Child:
    pid: int
    popen: subprocess.Popen[bytes]
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
    def __init__(self, loop: asyncio.AbstractEventLoop, env: dict[str, str], cwd: str) -> None:
        self.loop = loop
        self.env = env
        self.cwd = cwd
        self._waiting: dict[int, tuple[asyncio.Future[int], subprocess.Popen[bytes]]] = {}
        loop.add_signal_handler(signal.SIGCHLD, self.reap)

    def spawn(self, argv: Sequence[str], *, pass_fds: Sequence[int] = ()) -> Child:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.cwd,
            env=self.env,
            start_new_session=True,  # own session: the tree of a command is findable by sid
            pass_fds=tuple(pass_fds),
        )
        assert popen.stdout is not None and popen.stderr is not None
        # take the raw fds; the file objects must not close them behind our back
        out_fd, err_fd = os.dup(popen.stdout.fileno()), os.dup(popen.stderr.fileno())
        popen.stdout.close()
        popen.stderr.close()
        exited: asyncio.Future[int] = self.loop.create_future()
        self._waiting[popen.pid] = (exited, popen)
        # SIGCHLD handlers run from the loop, so a child that already exited is still reaped
        # after this registration; reap now anyway in case its signal was coalesced.
        self.loop.call_soon(self.reap)
        return Child(popen.pid, popen, out_fd, err_fd, exited)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            entry = self._waiting.pop(pid, None)
            if entry is None:
                continue  # an orphan reparented to us
            fut, popen = entry
            code = exit_code_of(status)
            popen.returncode = code  # so Popen never tries to reap it itself
            if not fut.done():
                fut.set_result(code)
