"""How long a process lives and what it may gain or show: prctl's parent-death signal, child subreaper,
no_new_privs and dumpable (standard library only, like `atropos.host.procs`)."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
_PR_GET_PDEATHSIG = 2
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38

try:
    _PRCTL: Callable[..., int] | None = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def prctl(option: int, arg: int | ctypes.c_int | object) -> bool:
    """One prctl(2) call; False where it fails or prctl does not exist."""
    return _PRCTL is not None and int(_PRCTL(option, arg, 0, 0, 0)) == 0


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """The kernel sends `sig` to this process when its parent dies."""
    return prctl(_PR_SET_PDEATHSIG, int(sig))


def parent_death_signal() -> int:
    """The signal set by `die_with_parent` (0: none). The kernel forgets it when the uid changes."""
    value = ctypes.c_int(0)
    return value.value if prctl(_PR_GET_PDEATHSIG, ctypes.byref(value)) else 0


def become_subreaper() -> bool:
    """Orphans of our descendants are reparented to us, so we can still find and kill them."""
    return prctl(_PR_SET_CHILD_SUBREAPER, 1)


def forbid_new_privileges() -> bool:
    """no_new_privs: nothing this process executes gains privileges (setuid bits, file capabilities)."""
    return prctl(_PR_SET_NO_NEW_PRIVS, 1)


def forbid_inspection() -> bool:
    """Not dumpable: processes of the same user can no longer open this one's fds through /proc,
    ptrace it or read its memory (what it executes is dumpable again: exec resets it)."""
    return prctl(_PR_SET_DUMPABLE, 0)


def die_with_owner() -> Callable[[], None]:
    """A `preexec_fn` making the child die (SIGKILL) when this process dies. Resolved here, in the
    parent: the child makes one system call between fork and exec, and goes at once if its owner
    died before the setting took effect."""
    owner = os.getpid()

    def arm() -> None:
        die_with_parent(signal.SIGKILL)
        if os.getppid() != owner:
            os.kill(os.getpid(), signal.SIGKILL)

    return arm
