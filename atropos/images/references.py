"""Image references (`docker://python:3.11`, `library://...`, bare `python:3.11`) and their SIF names."""

from __future__ import annotations

import hashlib
import re

from atropos.images.errors import InvalidReference

__all__ = [
    "BUILD_SCHEMES",
    "PULL_SCHEMES",
    "is_reference",
    "normalize_reference",
    "reference_scheme",
    "sif_name_for",
]

PULL_SCHEMES: frozenset[str] = frozenset({"docker", "library", "oras", "shub", "http", "https"})
"""Sources `apptainer pull` fetches."""
BUILD_SCHEMES: frozenset[str] = frozenset({"docker-daemon", "docker-archive", "oci-archive", "oci"})
"""Local sources that need `apptainer build` instead of `pull`."""
_SCHEMES = PULL_SCHEMES | BUILD_SCHEMES

# A Docker reference without a scheme: [registry[:port]/]path[:tag][@digest], per the distribution grammar
# (simplified: the first component may carry a registry host with dots, dashes and a port).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOCKER_NAME = re.compile(
    rf"(?:[A-Za-z0-9][A-Za-z0-9.-]*(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?\Z"
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_READABLE_MAX = 80
_HASH_CHARS = 12


def reference_scheme(value: str) -> str | None:
    """The transport of a reference with an explicit scheme (`docker`, `library`, ...), else None."""
    head, sep, _ = value.partition(":")
    return head if sep and head in _SCHEMES else None


def is_reference(value: str) -> bool:
    """True for `scheme://...` with a known scheme, or a bare Docker name such as `python:3.11`."""
    if reference_scheme(value) is not None:
        return bool(_strip_scheme(value))
    return bool(_DOCKER_NAME.match(value))


def normalize_reference(value: str) -> str:
    """`python:3.11` -> `docker://python:3.11`; `docker-daemon:x:1` -> `docker-daemon://x:1`."""
    value = value.strip()
    if not is_reference(value):
        raise InvalidReference(f"{value!r} is not an image reference (e.g. docker://python:3.11)")
    scheme = reference_scheme(value) or "docker"
    rest = value if reference_scheme(value) is None else _strip_scheme(value)
    if scheme == "docker":
        rest = _with_default_tag(rest)
    return f"{scheme}://{rest}"


def sif_name_for(reference: str) -> str:
    """A file name for the SIF of `reference`: readable, filesystem-safe, and unique.

    The readable part keeps letters, digits, `.`, `_` and `-` of the reference (other runs become
    `_`); a hash of the normalized reference follows, so `a/b:c` and `a_b:c` never collide and
    `python:3.11` and `docker://python:3.11` share one file.
    """
    normalized = normalize_reference(reference)
    scheme = reference_scheme(normalized)
    rest = _strip_scheme(normalized)
    readable = _UNSAFE.sub("_", rest).strip("._-")[:_READABLE_MAX] or "image"
    if scheme != "docker":
        readable = f"{scheme}_{readable}"
    digest = hashlib.sha256(normalized.encode()).hexdigest()[:_HASH_CHARS]
    return f"{readable}-{digest}.sif"


def _with_default_tag(name: str) -> str:
    """Docker's implicit `:latest`, so `python` and `python:latest` name one image."""
    last = name.rsplit("/", 1)[-1]
    return name if (":" in last or "@" in last) else f"{name}:latest"


def _strip_scheme(value: str) -> str:
    _, _, rest = value.partition(":")
    return rest[2:] if rest.startswith("//") else rest
