"""Errors of the pool and its backends, in one place both import.

Infrastructure failures are never a command's failure.
"""

from __future__ import annotations


class SlotPoolError(RuntimeError):
    """Base class of every error the pool raises."""


class PoolConfigError(SlotPoolError, ValueError):
    """The configuration cannot work (missing image, impossible bounds...)."""


class AcquireTimeout(SlotPoolError, TimeoutError):
    """No slot became free within the acquire timeout."""


class PoolClosed(SlotPoolError):
    """The pool is shut down or was never started."""


class LeaseError(SlotPoolError):
    """The slot handle is not (or no longer) leased to the caller."""


class InvalidToolCall(SlotPoolError, ValueError):
    """The server refused the call itself (unknown tool, bad arguments): a caller bug."""


class SetupFailed(SlotPoolError):
    """A task's setup (`SlotPool.prepare`) had a call that failed; the message has its output."""


class InfrastructureError(SlotPoolError):
    """The sandbox failed, not the command. The command may or may not have run; it is never retried."""


class SlotLost(InfrastructureError):
    """The slot's server died or stopped answering; the slot left the pool. Acquire another one."""


class SlotDraining(SlotLost):
    """The slot's server is about to be stopped by its backend (a SLURM job's time limit) and the call
    would not end before that: it did not run. The slot's files are still there for calls that fit
    (`pool.time_left(slot)`); acquire another slot to go on."""


class SlotFailed(InfrastructureError):
    """The slot's sandbox failed during the call (it restarts itself); the lease stays valid."""


class BackendError(InfrastructureError):
    """Sandbox servers could not be started, found or stopped."""
