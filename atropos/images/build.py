"""Build a SIF from an Apptainer definition file, atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from atropos.images.cache import resolve_runtime
from atropos.images.commands import run_checked
from atropos.images.errors import ImageBuildError, ImageNotFoundError
from atropos.images.runtime import ApptainerRuntime
from atropos.images.staging import locked, staged_file
from atropos.progress import Progress

__all__ = ["build_image", "default_build_output"]


def default_build_output(def_file: str | os.PathLike[str]) -> Path:
    """`images/atropos-sandbox.def` -> `./atropos-sandbox.sif`."""
    return Path(Path(def_file).stem + ".sif")


def build_image(
    def_file: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    runtime: ApptainerRuntime | str | None = None,
    progress: Progress | None = None,
    *,
    build_args: Sequence[str] = (),
    cwd: str | os.PathLike[str] | None = None,
) -> Path:
    """Run `apptainer build` of `def_file` and publish the SIF at `out` (default `./<stem>.sif`).

    The image is built into a temporary file next to `out` and renamed into place only when the
    build (including the definition's `%test`) succeeded, so `out` is never partial and a failed
    build leaves an earlier image untouched. `build_args` go before the output path (for example
    `--fakeroot` on old releases that do not pick it automatically). Relative `%files` sources
    are resolved by Apptainer against `cwd` (default: the current directory).
    """
    definition = Path(def_file)
    if not definition.is_file():
        raise ImageNotFoundError(f"definition file {definition} does not exist")
    dest = Path(out) if out is not None else default_build_output(definition)
    dest = dest.expanduser().absolute()
    resolved = resolve_runtime(runtime)
    label = f"build {definition.name}"
    with locked(dest, progress=progress, label=label), staged_file(dest) as tmp:
        argv = [resolved.binary, "build", *build_args, str(tmp), str(definition.absolute())]
        run_checked(argv, error=ImageBuildError, env=None, progress=progress, label=label, watch=tmp, cwd=cwd)
    if progress is not None:
        progress(f"{label}: done, {dest}")
    return dest
