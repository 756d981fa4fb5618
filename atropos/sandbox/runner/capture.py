"""Bounded output capture: keeps the head and the tail of a stream, never the whole of it."""

from __future__ import annotations


class BoundedBuffer:
    """Holds at most `cap` bytes: the first cap/2 and the last cap/2 of everything written.

    Agents need both ends of a long output: the command that started, and the error at the end.
    """

    def __init__(self, cap: int) -> None:
        self.cap = max(cap, 0)
        self._head_cap = self.cap - self.cap // 2
        self._tail_cap = self.cap // 2
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def write(self, data: bytes) -> None:
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
