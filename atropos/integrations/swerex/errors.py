"""Errors of the SWE-ReX Apptainer deployment: each says why it could not start and what to do."""

from __future__ import annotations

from swerex.exceptions import DeploymentStartupError


class ApptainerDeploymentError(DeploymentStartupError):
    """The Apptainer deployment could not start (the message says why and what to do)."""


class PortInUseError(ApptainerDeploymentError):
    """The configured port is already taken on this host (Apptainer shares the host network)."""


class StartupTimeoutError(ApptainerDeploymentError, TimeoutError):
    """The server did not answer within `startup_timeout`."""
