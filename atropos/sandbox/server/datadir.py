"""One server per data dir: the server holds an exclusive lock on `DATA_DIR/server.lock` while it
runs (the kernel drops it when the process dies, however it dies) and writes its pid and port
there, so a second server on the same data dir is refused with whom it would collide. A data dir
left by a server that died is taken over: its old slot workspaces are emptied first, so no
slot starts with another run's files."""

from __future__ import annotations

import fcntl
import os

from atropos.sandbox.runner.files import empty_dir

LOCK_NAME = "server.lock"


class DataDirInUse(RuntimeError):
    pass


class DataDirLock:
    def __init__(self, data_dir: str, fd: int) -> None:
        self.data_dir = data_dir
        self._fd = fd

    @classmethod
    def claim(cls, data_dir: str) -> DataDirLock:
        """Lock the data dir for this process and empty what a dead server left in its slots."""
        path = os.path.join(data_dir, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            who = f"server pid {holder[0]} on port {holder[1]}" if len(holder) >= 2 else "another server (starting)"
            raise DataDirInUse(
                f"--data-dir {data_dir} is in use by {who}: one server per data dir (its slots' files would be "
                "shared); give this server a data dir of its own"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        slots = os.path.join(data_dir, "slots")
        if os.path.isdir(slots):
            empty_dir(slots)  # left by a server that is gone (it held the lock until it died)
        return cls(data_dir, fd)

    def announce(self, port: int) -> None:
        """Say which server holds the data dir, once it listens."""
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()} {port}\n".encode(), 0)
