"""Which image the SWE-ReX server runs from: a SIF, a reference pulled per policy (optionally for
another platform, into a cache of its own), and a standalone Python for images without one."""

from __future__ import annotations

from pathlib import Path

from atropos.images.cache import default_cache_dir
from atropos.images.references import is_reference, reference_scheme
from atropos.integrations.swerex.errors import ApptainerDeploymentError

_SIF_SUFFIXES = (".sif", ".simg", ".img")


def names_a_pull(image: str) -> bool:
    """True when `image` is a reference to pull, not a file (a bare `x.sif` is a missing file)."""
    if reference_scheme(image) is not None:
        return True
    if Path(image).expanduser().exists() or image.endswith(_SIF_SUFFIXES):
        return False
    return is_reference(image)


def platform_pull_args(platform: str | None) -> list[str]:
    """`linux/arm/v7` -> `--arch arm --arch-variant 7`; Apptainer runs Linux images only."""
    if platform is None:
        return []
    parts = platform.split("/")
    if len(parts) not in (2, 3) or parts[0] != "linux" or not all(parts):
        raise ValueError(f"platform must look like linux/amd64 or linux/arm/v7, not {platform!r}")
    args = ["--arch", parts[1]]
    if len(parts) == 3:
        args += ["--arch-variant", parts[2].removeprefix("v")]
    return args


def platform_cache_dir(platform: str | None) -> Path | None:
    """A separate cache per platform: the cache names files by reference alone."""
    if platform is None:
        return None
    return default_cache_dir() / ("platform-" + platform.replace("/", "_"))


def standalone_prefix(root: Path) -> Path:
    if any(bad in str(root) for bad in (":", ",")):
        raise ApptainerDeploymentError(f"python_standalone_dir {root} contains ':' or ',', which apptainer cannot bind")
    for prefix in (root / "python3.11", root):
        if (prefix / "bin" / "python3").is_file():
            return prefix
    raise ApptainerDeploymentError(
        f"python_standalone_dir {root} holds no Python: expected {root}/python3.11/bin/python3 (the layout "
        f"of SWE-ReX's Docker deployment) or {root}/bin/python3, with swe-rex installed"
    )
