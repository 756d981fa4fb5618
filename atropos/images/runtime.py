"""Find the container runtime: `apptainer`, else `singularity`, and its version."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from atropos.images.errors import ApptainerNotFoundError

__all__ = ["RUNTIME_ENV", "ApptainerRuntime", "find_runtime"]

RUNTIME_ENV = "ATROPOS_APPTAINER"
_CANDIDATES = ("apptainer", "singularity")
_VERSION = re.compile(r"version\s+v?(?P<version>[0-9][^\s]*)")
_INSTALL_HINT = (
    "install Apptainer (https://apptainer.org/docs/admin/main/installation.html; e.g. "
    "`apt-get install apptainer` from the Apptainer PPA, `dnf install apptainer` from EPEL, "
    "or `module load apptainer` on a cluster), or point ATROPOS_APPTAINER at the binary"
)


@dataclass(frozen=True)
class ApptainerRuntime:
    """A runnable container runtime binary."""

    binary: str
    """Absolute path of the binary."""
    flavor: str
    """What the binary calls itself: `apptainer`, `singularity-ce`, `singularity`."""
    version: str
    """Version string as reported, e.g. `1.3.4`."""

    @property
    def name(self) -> str:
        """`apptainer` or `singularity`: decides the `APPTAINER_*` / `SINGULARITY_*` variable names."""
        return "singularity" if self.flavor.startswith("singularity") else "apptainer"

    @property
    def env_prefix(self) -> str:
        """Prefix of the runtime's own settings variables, e.g. `APPTAINER_` for `APPTAINER_CACHEDIR`."""
        return self.name.upper() + "_"

    def describe(self) -> str:
        return f"{self.flavor} {self.version} ({self.binary})"


def find_runtime(explicit: str | None = None, *, env: Mapping[str, str] | None = None) -> ApptainerRuntime:
    """Locate and probe the runtime.

    Order: `explicit` (a path or a command name), then `$ATROPOS_APPTAINER`, then `apptainer` on
    PATH, then `singularity` on PATH. Raises `ApptainerNotFoundError` with an install hint.
    """
    environ = os.environ if env is None else env
    requested = explicit or environ.get(RUNTIME_ENV) or None
    search_path = environ.get("PATH")
    if requested is not None:
        path = shutil.which(requested, path=search_path)
        if path is None:
            source = "the given runtime" if explicit else f"${RUNTIME_ENV}"
            raise ApptainerNotFoundError(f"{source} {requested!r} is not an executable file; {_INSTALL_HINT}")
        return _probe(os.path.abspath(path))
    for name in _CANDIDATES:
        path = shutil.which(name, path=search_path)
        if path is not None:
            return _probe(os.path.abspath(path))
    raise ApptainerNotFoundError(f"neither apptainer nor singularity is on PATH; {_INSTALL_HINT}")


def _probe(binary: str) -> ApptainerRuntime:
    stat = os.stat(binary)
    return _probe_cached(binary, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=32)
def _probe_cached(binary: str, _mtime_ns: int, _size: int) -> ApptainerRuntime:
    try:
        done = subprocess.run(
            [binary, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ApptainerNotFoundError(f"cannot run {binary} --version: {exc}; {_INSTALL_HINT}") from exc
    output = (done.stdout + done.stderr).strip()
    match = _VERSION.search(output)
    if done.returncode != 0 or match is None:
        raise ApptainerNotFoundError(
            f"{binary} --version failed (exit {done.returncode}): {output[:300]!r}; {_INSTALL_HINT}"
        )
    first_word = output[: match.start()].strip().split()
    flavor = first_word[-1].lower() if first_word else os.path.basename(binary)
    return ApptainerRuntime(binary=binary, flavor=flavor, version=match.group("version"))
