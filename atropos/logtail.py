"""The end of a log file, for an error message: what a server, a job or a deployment printed last."""

from __future__ import annotations

import os

_MAX_BYTES = 64 * 1024  # never more of a file than this is read, however large it grew


def tail(path: str | os.PathLike[str], *, lines: int | None = None, max_bytes: int = _MAX_BYTES) -> str:
    """The last `max_bytes` of the file (its last `lines` lines of those, if given), decoded as
    UTF-8 with bad bytes replaced; "" when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_bytes))
            data = handle.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    return text if lines is None else "".join(text.splitlines(keepends=True)[-lines:])
