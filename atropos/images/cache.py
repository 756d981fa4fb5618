"""The SIF cache: where pulled images live, pulling them per a policy, listing and removing them."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from atropos.images.commands import run_checked
from atropos.images.errors import ImageNotFoundError, ImagePullError
from atropos.images.references import BUILD_SCHEMES, normalize_reference, reference_scheme, sif_name_for
from atropos.images.runtime import ApptainerRuntime, find_runtime
from atropos.images.staging import locked, staged_file
from atropos.progress import Progress
from atropos.pulls import PULL_POLICIES, PullPolicy

__all__ = [
    "CACHE_ENV",
    "PULL_POLICIES",
    "PullPolicy",
    "cached_image_path",
    "default_cache_dir",
    "list_images",
    "pull_image",
    "pulled_images",
    "remove_images",
    "resolve_runtime",
    "resolve_singularity_image",
]

CACHE_ENV = "ATROPOS_SIF_CACHE"
_IMAGE_SUFFIXES = (".sif", ".simg", ".img")

_pulled: set[Path] = set()
_pulled_guard = threading.Lock()


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """`$ATROPOS_SIF_CACHE`, else `$APPTAINER_CACHEDIR/sif`, else `~/.cache/atropos-sandbox/sif`."""
    environ = os.environ if env is None else env
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV]).expanduser()
    if environ.get("APPTAINER_CACHEDIR"):
        return Path(environ["APPTAINER_CACHEDIR"]).expanduser() / "sif"
    return Path.home() / ".cache" / "atropos-sandbox" / "sif"


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def cached_image_path(ref: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the SIF of `ref` lives in the cache (whether or not it is there)."""
    return _cache_dir(cache_dir) / sif_name_for(ref)


def resolve_runtime(runtime: ApptainerRuntime | str | None) -> ApptainerRuntime:
    """An `ApptainerRuntime` from itself, a binary path or name, or discovery."""
    return runtime if isinstance(runtime, ApptainerRuntime) else find_runtime(runtime)


def pull_image(
    ref: str,
    policy: PullPolicy = "missing",
    cache_dir: str | os.PathLike[str] | None = None,
    runtime: ApptainerRuntime | str | None = None,
    progress: Progress | None = None,
    *,
    lock_timeout: float | None = None,
    pull_args: Sequence[str] = (),
) -> Path:
    """Return the cached SIF of `ref`, pulling it first as `policy` says.

    - `missing`: pull only when the SIF is not in the cache;
    - `always`: pull again (a process that waited while another one re-pulled uses that result);
    - `never`: never pull; `ImageNotFoundError` when absent.

    Safe to call from many threads and processes at once: one of them pulls, under a lock, into a
    temporary file that is renamed into place when complete; the others wait and reuse it.
    Blocking: from async code run it with `asyncio.to_thread`.
    """
    if policy not in PULL_POLICIES:
        raise ValueError(f"pull policy must be one of {', '.join(PULL_POLICIES)}, not {policy!r}")
    reference = normalize_reference(ref)
    dest = cached_image_path(reference, cache_dir)
    if dest.is_file() and policy != "always":
        return dest
    if policy == "never":
        raise ImageNotFoundError(
            f"{reference} is not in the SIF cache ({dest}) and the pull policy is 'never'; "
            f"run `atropos-sandbox image pull {reference}` first or use policy 'missing'"
        )
    seen_before = _signature(dest)
    resolved = resolve_runtime(runtime)
    label = f"pull {reference}"
    with locked(dest, progress=progress, label=label, timeout=lock_timeout):
        current = _signature(dest)
        if current is not None and (policy == "missing" or current != seen_before):
            return dest  # another process published it while this one waited
        with staged_file(dest) as tmp:
            verb = "build" if reference_scheme(reference) in BUILD_SCHEMES else "pull"
            argv = [resolved.binary, verb, *pull_args, str(tmp), reference]
            env = _pull_env(resolved, dest.parent)
            run_checked(argv, error=ImagePullError, env=env, progress=progress, label=label, watch=tmp)
    with _pulled_guard:
        _pulled.add(dest)
    if progress is not None:
        progress(f"{label}: done, {dest}")
    return dest


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns)


def _pull_env(runtime: ApptainerRuntime, cache_dir: Path) -> dict[str, str]:
    """Keep the runtime's layer cache next to the SIF cache unless the user chose one."""
    env = dict(os.environ)
    key = f"{runtime.env_prefix}CACHEDIR"
    if not env.get(key):
        env[key] = str(cache_dir / ".layers")
    return env


def pulled_images() -> list[Path]:
    """The images this process pulled (not those it found in the cache)."""
    with _pulled_guard:
        return sorted(_pulled)


def remove_images() -> list[Path]:
    """Delete the images this process pulled; return what was removed."""
    with _pulled_guard:
        targets = sorted(_pulled)
        _pulled.clear()
    removed: list[Path] = []
    for path in targets:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def list_images(cache_dir: str | os.PathLike[str] | None = None) -> list[tuple[Path, int]]:
    """The SIF files in the cache with their sizes in bytes, by name (temporary files excluded)."""
    root = _cache_dir(cache_dir)
    if not root.is_dir():
        return []
    found: list[tuple[Path, int]] = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or path.suffix not in _IMAGE_SUFFIXES or not path.is_file():
            continue
        found.append((path, path.stat().st_size))
    return found


def resolve_singularity_image(
    value: str,
    policy: PullPolicy = "missing",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    runtime: ApptainerRuntime | str | None = None,
    progress: Progress | None = None,
) -> Path:
    """A runnable image for the pool's `singularity_image` setting, before anything is scheduled.

    `value` is an existing image file (or sandbox directory), or a reference pulled per `policy`:
    `docker://...`, `library://...`, `oras://...`, or a bare Docker name such as `python:3.11`.
    Raises `ImageNotFoundError` for a path that does not exist and is not a reference.
    """
    text = value.strip()
    if not text:
        raise ImageNotFoundError("no singularity image given: a SIF path or a reference such as docker://...")
    if reference_scheme(text) is None:
        path = Path(text).expanduser()
        if path.exists():
            return path.resolve()
        if _looks_like_path(text):
            raise ImageNotFoundError(
                f"singularity image {text!r} does not exist; give an existing SIF file or a reference "
                "such as docker://python:3.11"
            )
    try:
        reference = normalize_reference(text)
    except ValueError:
        raise ImageNotFoundError(
            f"singularity image {text!r} is neither an existing file nor an image reference "
            "(docker://..., library://..., oras://..., or a Docker name such as python:3.11)"
        ) from None
    return pull_image(reference, policy, cache_dir, runtime, progress)


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text.endswith(_IMAGE_SUFFIXES)
