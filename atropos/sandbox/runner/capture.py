"""Bounded output capture: keeps the head and the tail of a stream, never the whole of it; and
the pieces of a streamed call (`stream: true`) as they come, bounded the same way."""

from __future__ import annotations

import codecs
from collections.abc import Callable

# what a streamed call sends: (stream name, text); pieces of at most this many bytes, so that a
# JSON line of one stays well under a line reader's limit (64 KiB in aiohttp) whatever it escapes
STREAM_PIECE = 8 * 1024
Emit = Callable[[str, str], None]


class StreamTee:
    """Forwards what a command writes on one stream, as text, up to `cap` bytes (the rest is in the
    result's head and tail only): UTF-8 split across reads is joined, never replaced."""

    def __init__(self, name: str, cap: int, emit: Emit) -> None:
        self.name = name
        self.left = cap
        self.emit = emit
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, data: bytes) -> None:
        if self.left <= 0:
            return
        data = data[: self.left]
        self.left -= len(data)
        for start in range(0, len(data), STREAM_PIECE):
            last = start + STREAM_PIECE >= len(data)
            text = self._decoder.decode(data[start : start + STREAM_PIECE], final=last and self.left <= 0)
            if text:
                self.emit(self.name, text)


class BoundedBuffer:
    """Holds at most `cap` bytes: the first cap/2 and the last cap/2 of everything written.

    Agents need both ends of a long output: the command that started, and the error at the end.
    """

    def __init__(self, cap: int, tee: Callable[[bytes], None] | None = None) -> None:
        self.cap = max(cap, 0)
        self.tee = tee  # a streamed call's StreamTee
        self._head_cap = self.cap - self.cap // 2
        self._tail_cap = self.cap // 2
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def write(self, data: bytes) -> None:
        if self.tee is not None:
            self.tee(data)
        self.total += len(data)
        room = self._head_cap - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if not data or self._tail_cap == 0:
            return
        if len(data) >= self._tail_cap:
            self._tail[:] = data[-self._tail_cap :]
        else:
            self._tail += data
            excess = len(self._tail) - self._tail_cap
            if excess > 0:
                del self._tail[:excess]

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def text(self) -> str:
        if not self.truncated:
            return (bytes(self._head) + bytes(self._tail)).decode("utf-8", errors="replace")
        dropped = self.total - len(self._head) - len(self._tail)
        head = bytes(self._head).decode("utf-8", errors="replace")
        tail = bytes(self._tail).decode("utf-8", errors="replace")
        return f"{head}\n[... {dropped} bytes of output omitted ...]\n{tail}"


def buffers(cap: int, emit: Emit | None) -> tuple[BoundedBuffer, BoundedBuffer]:
    """stdout's and stderr's buffers of one call; with `emit`, they also stream what they get."""
    if emit is None:
        return BoundedBuffer(cap), BoundedBuffer(cap)
    return BoundedBuffer(cap, StreamTee("stdout", cap, emit)), BoundedBuffer(cap, StreamTee("stderr", cap, emit))


BACKGROUND_LOG = 64 * 1024


class TailBuffer:
    """The newest `cap` bytes written, and how many older ones were dropped; `take` empties it."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._data = bytearray()
        self.dropped = 0

    def write(self, data: bytes) -> None:
        self._data += data
        excess = len(self._data) - self.cap
        if excess > 0:
            del self._data[:excess]
            self.dropped += excess

    def held(self) -> tuple[bytes, int]:
        """What is kept and how much was dropped (for hibernation; see `restore`)."""
        return bytes(self._data), self.dropped

    def restore(self, data: bytes, dropped: int) -> None:
        self._data = bytearray(data)
        self.dropped = dropped

    def take(self) -> str:
        text = bytes(self._data).decode("utf-8", errors="replace")
        if self.dropped:
            text = f"[... {self.dropped} older bytes dropped ...]\n{text}"
        self._data.clear()
        self.dropped = 0
        return text
