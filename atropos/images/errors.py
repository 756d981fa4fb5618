"""Errors of image management; each message says what to do next."""

from __future__ import annotations

__all__ = [
    "ApptainerNotFoundError",
    "ImageBuildError",
    "ImageError",
    "ImageNotFoundError",
    "ImagePullError",
    "InvalidReference",
]


class ImageError(RuntimeError):
    """Base class of every error raised by `atropos.images`."""


class ApptainerNotFoundError(ImageError):
    """Neither `apptainer` nor `singularity` could be found or run."""


class ImageNotFoundError(ImageError):
    """An image path does not exist, or a reference is absent from the cache under policy `never`."""


class ImagePullError(ImageError):
    """`apptainer pull` failed or produced something that is not a SIF."""


class ImageBuildError(ImageError):
    """`apptainer build` failed or produced something that is not a SIF."""


class InvalidReference(ImageError, ValueError):
    """A string that is neither a SIF path nor a pullable reference (`docker://...`, `oras://...`)."""
