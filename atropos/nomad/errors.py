"""Errors of the Nomad layer. Each names the endpoint it concerns and carries Nomad's own message."""

from __future__ import annotations

__all__ = [
    "NomadAllocationFailed",
    "NomadConnectionError",
    "NomadError",
    "NomadNotFound",
    "NomadPlacementFailed",
    "NomadRequestError",
    "NomadServerError",
    "NomadWaitTimeout",
]


class NomadError(Exception):
    """A failed interaction with Nomad: `endpoint` (e.g. `POST /v1/jobs`) and what went wrong."""

    def __init__(self, endpoint: str, message: str, *, status: int | None = None) -> None:
        self.endpoint = endpoint
        self.message = message
        self.status = status
        suffix = f" (HTTP {status})" if status is not None else ""
        super().__init__(f"{endpoint}: {message}{suffix}")

    @property
    def transient(self) -> bool:
        """True when the same request may succeed later (connection trouble, 5xx)."""
        return False


class NomadConnectionError(NomadError):
    """Nomad could not be reached, or did not answer in time."""

    @property
    def transient(self) -> bool:
        return True


class NomadServerError(NomadError):
    """Nomad answered 5xx."""

    @property
    def transient(self) -> bool:
        return True


class NomadRequestError(NomadError):
    """Nomad refused the request (4xx, or a 500 listing why a job fails validation): retrying the
    same request cannot help."""


class NomadNotFound(NomadRequestError):
    """404: no such job, allocation or node."""


class NomadAllocationFailed(NomadError):
    """An allocation failed to start; the message says why (task events, exit code, stderr tail)."""


class NomadPlacementFailed(NomadError):
    """Nomad cannot place the job on any node (e.g. no node has the driver)."""


class NomadWaitTimeout(NomadError):
    """The allocations did not all run in time; the message says what was still missing."""
