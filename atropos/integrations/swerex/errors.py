"""Errors of the SWE-ReX Apptainer deployment: each says why it could not start and what to do."""

from __future__ import annotations

from swerex.exceptions import DeploymentStartupError

from atropos.images.errors import ApptainerNotFoundError, ImageError, ImageNotFoundError, ImagePullError


class ApptainerDeploymentError(DeploymentStartupError):
    """The Apptainer deployment could not start (the message says why and what to do)."""


class PortInUseError(ApptainerDeploymentError):
    """The configured port is already taken on this host (Apptainer shares the host network)."""


class StartupTimeoutError(ApptainerDeploymentError, TimeoutError):
    """The server did not answer within `startup_timeout`."""


# the image layer's errors, as SWE-ReX's own startup errors (which SWE-agent catches), keeping their
# image types for callers that catch those
class ApptainerMissing(ApptainerDeploymentError, ApptainerNotFoundError):
    """Neither apptainer nor singularity could be found or run."""


class ImageUnavailable(ApptainerDeploymentError, ImageNotFoundError):
    """The SIF does not exist, or a reference is not cached under `pull="never"`."""


class ImagePullFailed(ApptainerDeploymentError, ImagePullError):
    """`apptainer pull` failed."""


class ImageProblem(ApptainerDeploymentError, ImageError):
    """Any other image error."""


def as_startup_error(exc: ImageError) -> ApptainerDeploymentError:
    """The same error (message and image type) as one of SWE-ReX's DeploymentStartupError."""
    for image_type, startup_type in ((ApptainerNotFoundError, ApptainerMissing), (ImageNotFoundError, ImageUnavailable),
                                     (ImagePullError, ImagePullFailed)):  # fmt: skip
        if isinstance(exc, image_type):
            return startup_type(str(exc))
    return ImageProblem(str(exc))
