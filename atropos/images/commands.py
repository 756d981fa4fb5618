"""Run the runtime as a child process, streaming its output as progress lines."""

from __future__ import annotations

import collections
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from atropos.images.errors import ImageError
from atropos.progress import HEARTBEAT_SECONDS, Progress
from atropos.units import format_size

__all__ = [
    "HEARTBEAT_SECONDS",
    "RunResult",
    "heartbeat",
    "run_checked",
    "run_streaming",
]

"""How often a long wait reports that it is still going (module attribute: tests may lower it)."""

_TAIL_LINES = 40
_STOP_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class RunResult:
    returncode: int
    tail: tuple[str, ...]
    """The last lines of output, for error messages."""

    def summary(self) -> str:
        return "\n".join(self.tail[-15:]) or "(no output)"


def run_streaming(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None,
    progress: Progress | None,
    label: str,
    watch: Path | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> RunResult:
    """Run `argv`, pass each output line (split on CR or LF) to `progress`, return exit code and tail.

    While it runs, a heartbeat line every `HEARTBEAT_SECONDS` says how long it has taken and, when
    `watch` exists, how large that file has grown. The child is stopped if this call is interrupted.
    """
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)

    def emit(line: str) -> None:
        tail.append(line)
        if progress is not None:
            progress(line)

    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=None if env is None else dict(env),
        cwd=cwd,
    )
    try:
        with heartbeat(progress, label, watch):
            assert proc.stdout is not None
            _pump(proc.stdout.fileno(), emit)
            returncode = proc.wait()
    finally:
        _stop(proc)
    return RunResult(returncode=returncode, tail=tuple(tail))


def run_checked(
    argv: Sequence[str],
    *,
    error: type[ImageError],
    env: Mapping[str, str] | None,
    progress: Progress | None,
    label: str,
    watch: Path | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> None:
    """`run_streaming`, raising `error` with the command's last output lines when it fails."""
    if progress is not None:
        progress(f"{label}: running {' '.join(argv[:2])}")
    result = run_streaming(argv, env=env, progress=progress, label=label, watch=watch, cwd=cwd)
    if result.returncode != 0:
        raise error(f"{label} failed ({argv[0]} exited with {result.returncode}):\n{result.summary()}")


def _pump(fd: int, emit: Callable[[str], None]) -> None:
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        pending += chunk.replace(b"\r", b"\n")
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            _emit_raw(raw, emit)
    _emit_raw(pending, emit)


def _emit_raw(raw: bytes, emit: Callable[[str], None]) -> None:
    line = raw.decode("utf-8", "replace").rstrip()
    if line:
        emit(line)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=_STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@contextmanager
def heartbeat(progress: Progress | None, label: str, watch: Path | None = None) -> Iterator[None]:
    """Report `label: still running after N s` periodically while the block runs."""
    if progress is None:
        yield
        return
    stop = threading.Event()
    started = time.monotonic()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            elapsed = int(time.monotonic() - started)
            size = _size_note(watch)
            progress(f"{label}: still running after {elapsed} s{size}")

    thread = threading.Thread(target=beat, name="atropos-images-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _size_note(watch: Path | None) -> str:
    if watch is None:
        return ""
    try:
        size = watch.stat().st_size
    except OSError:
        return ""
    return f", {format_size(size)} written"
