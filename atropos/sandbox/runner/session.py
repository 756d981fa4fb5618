"""A persistent bash per slot (`bash_session` tool): cwd and environment survive between calls.

Commands reach the shell on a private control pipe as NUL-terminated (marker, command) pairs;
the shell `eval`s each in its own context, then prints the marker with the exit code on stdout
and the marker alone on stderr. A command is done when both markers arrived: no sleeps, no
prompt scraping, and the marker is random per command so output cannot fake it.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

from atropos.host import kill_tree
from atropos.sandbox.runner.capture import BACKGROUND_LOG, BoundedBuffer, Emit, TailBuffer, buffers
from atropos.sandbox.runner.children import Child, Children, PipeReader
from atropos.sandbox.runner.hibernate import SessionFds
from atropos.sandbox.runner.oneshot import outcome_of
from atropos.sandbox.runner.protocol import Outcome, add_note

_LOOP = (
    "while IFS= read -r -d '' -u {fd} __atropos_mark && IFS= read -r -d '' -u {fd} __atropos_cmd; do "
    'eval "$__atropos_cmd" {fd}<&- </dev/null; '
    "__atropos_rc=$?; "
    'printf \'%s %d\\n\' "$__atropos_mark" "$__atropos_rc"; '
    "printf '%s\\n' \"$__atropos_mark\" >&2; "
    "done"
)

SESSION_RESTARTED = (
    "the session's shell had ended since the last call; this is a new shell "
    "(working directory and environment are back to their start)"
)

# how long a timed-out command's shell gets to print its marker once the command's processes
# are dead; a shell still busy after that (a builtin loop) is itself killed and replaced
_SHELL_GRACE = 1.0


class _MarkerScanner:
    """Splits a stream into command output and the end marker, across chunk boundaries."""

    def __init__(self, marker: bytes, buf: BoundedBuffer, want_code: bool) -> None:
        self.marker = marker
        self.buf = buf
        self.want_code = want_code
        self.pending = bytearray()
        self.done: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    def feed(self, chunk: bytes) -> bytes:
        """Take the command's part of `chunk`; what follows its end marker (a background job's
        output) is returned."""
        if self.done.done():
            return chunk
        self.pending += chunk
        idx = self.pending.find(self.marker)
        if idx < 0:
            # hold back only what could be the start of the marker: output reaches a streamed
            # call as it comes, not once some more has followed it
            flush = len(self.pending) - self._partial_marker()
            if flush > 0:
                self.buf.write(bytes(self.pending[:flush]))
                del self.pending[:flush]
            return b""
        rest = bytes(self.pending[idx + len(self.marker) :])
        nl = rest.find(b"\n")
        if nl < 0:
            return b""  # the exit code line is not complete yet
        self.buf.write(bytes(self.pending[:idx]))
        code: int | None = None
        if self.want_code:
            try:
                code = int(rest[:nl].strip())
            except ValueError:
                code = None
        self.pending.clear()
        self.done.set_result(code)
        return rest[nl + 1 :]

    def _partial_marker(self) -> int:
        """How many bytes at the end of what is pending could begin the marker (the longest such
        end; only where the marker's first byte occurs is a start tried)."""
        pending, first = self.pending, self.marker[:1]
        at = pending.find(first, max(0, len(pending) - len(self.marker) + 1))
        while at >= 0:
            if self.marker.startswith(pending[at:]):
                return len(pending) - at
            at = pending.find(first, at + 1)
        return 0

    def flush_rest(self) -> None:
        self.buf.write(bytes(self.pending))
        self.pending.clear()


class BashSession:
    def __init__(self, children: Children) -> None:
        self.children = children
        self.child: Child | None = None
        self._ctrl_w = -1
        self._sinks: list[_MarkerScanner | None] = [None, None]
        self._readers: list[PipeReader] = []
        # what the shell's background jobs print between and after commands: kept for
        # `read_background` (the newest BACKGROUND_LOG bytes), else unread
        self.background = TailBuffer(BACKGROUND_LOG)
        self._lost_earlier = False  # the shell died before this runner hibernated (see `lost`)

    @property
    def alive(self) -> bool:
        return self.child is not None and not self.child.exited.done()

    @property
    def lost(self) -> bool:
        """The shell died since the last call, not closed by us: the next call says so. A runner
        that hibernated meanwhile passes it on to the one it resumes as (`lost_earlier`)."""
        return self._lost_earlier or (self.child is not None and not self.alive)

    def lost_earlier(self) -> None:
        self._lost_earlier = True

    def _start(self) -> None:
        ctrl_r, ctrl_w = os.pipe()
        os.set_inheritable(ctrl_r, True)
        try:
            self.child = self.children.shell(
                _LOOP.format(fd=ctrl_r), options=("--noprofile", "--norc"), pass_fds=(ctrl_r,)
            )
        except OSError:
            os.close(ctrl_w)
            raise
        finally:
            os.close(ctrl_r)
        self._ctrl_w = ctrl_w
        self._read(self.child)

    def _read(self, child: Child) -> None:
        self._readers = [
            PipeReader(self.children.loop, child.stdout_fd, lambda b: self._feed(0, b)),
            PipeReader(self.children.loop, child.stderr_fd, lambda b: self._feed(1, b)),
        ]

    def drain(self) -> None:
        """Take in now what the shell's pipes hold (between commands: background output)."""
        for reader in self._readers:
            reader.drain()

    def fds(self) -> SessionFds | None:
        """The live shell and the pipes to it, for hibernation (None: no shell)."""
        if not self.alive or self.child is None:
            return None
        return {
            "pid": self.child.pid,
            "stdout": self.child.stdout_fd,
            "stderr": self.child.stderr_fd,
            "control": self._ctrl_w,
        }

    def adopt(self, fds: SessionFds) -> None:
        """The shell a hibernated runner kept (its state is the shell's own: cwd, variables)."""
        self.child = self.children.adopt(fds["pid"], fds["stdout"], fds["stderr"])
        self._ctrl_w = fds["control"]
        self._read(self.child)

    def _feed(self, stream: int, chunk: bytes) -> None:
        sink = self._sinks[stream]
        after = sink.feed(chunk) if sink is not None else chunk
        if after:
            self.background.write(after)

    def close(self) -> int:
        """Kill the shell and everything it started; returns how many processes died."""
        killed = 0
        if self.child is not None and not self.child.exited.done():
            killed = kill_tree(self.child.pid)
        for reader in self._readers:
            reader.close()
        if self._ctrl_w >= 0:
            os.close(self._ctrl_w)
            self._ctrl_w = -1
        self.child = None
        return killed

    async def run(
        self, command: str, *, timeout: float, cap: int, emit: Emit | None = None, read_background: bool = False
    ) -> Outcome:
        started = time.monotonic()
        out, err = buffers(cap, emit)
        if "\x00" in command:
            return outcome_of(
                out, err, exit_code=None, timed_out=False, started=started, error="command contains a NUL byte"
            )
        lost, self._lost_earlier = self.lost, False
        if not self.alive:
            self.close()
            self._start()
        child = self.child
        assert child is not None
        marker = f"__ATROPOS_END_{uuid.uuid4().hex}__".encode()
        self.drain()  # what the pipes hold now was printed before this command: background output
        scan_out = _MarkerScanner(marker, out, want_code=True)
        scan_err = _MarkerScanner(marker, err, want_code=False)
        self._sinks = [scan_out, scan_err]
        os.write(self._ctrl_w, marker + b"\0" + command.encode() + b"\0")
        both = asyncio.gather(scan_out.done, scan_err.done)
        waiters: set[asyncio.Future[Any]] = {both, child.exited}
        error: str | None = None
        timed_out = False
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                timed_out = True
                kill_tree(child.pid, include_root=False)  # the command, not the shell
                done, _ = await asyncio.wait(waiters, timeout=_SHELL_GRACE, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    error = "command timed out and the shell itself was busy: the session was restarted"
                    self.close()
            if both.done():
                code = scan_out.done.result()
            else:
                for reader in self._readers:
                    reader.drain()
                scan_out.flush_rest()
                scan_err.flush_rest()
                code = child.exited.result() if child.exited.done() else None
                if error is None:
                    error = "the session's shell exited; the next call starts a new shell"
                self.close()
        finally:
            both.cancel()
            self._sinks = [None, None]
        result = outcome_of(out, err, exit_code=code, timed_out=timed_out, started=started, error=error)
        if lost:
            add_note(result, SESSION_RESTARTED)
        if read_background:
            result["background"] = self.background.take()
        return result
