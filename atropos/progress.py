"""Progress of a long wait (pulling an image, starting servers): one line of text at a time."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]


def no_progress(_message: str) -> None:
    pass
