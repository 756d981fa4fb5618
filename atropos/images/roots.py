"""Task images unpacked as root directories: once per node, shared read-only by every slot of the image.

The cache directory holds
- `layers/<hex>/`: one unpacked layer, named by its diff id, with its whiteouts in `<hex>.json`;
- `images/<hex>/root/`: an image's root, its layers applied in order (files hard-linked from the
  layers, so images that share a layer share its disk), and `images/<hex>/image.json`, what it was
  made from (reference, layers, working directory, environment);
- `images/<hex>.lock`: held shared while a slot (or a snapshot) uses the image, exclusively while
  it is evicted; `images/<hex>.make.lock`: exclusively while it is made (a separate lock: those who
  wait to make it must not wait on the slots that already use it); `cache.lock`: shared while an
  image is made, exclusive while the cache is trimmed.

Everything is made in a hidden partial directory and renamed into place, so a failed or interrupted
unpack leaves nothing half-made. Nothing in an archive can write outside the cache: member paths
with `..` or that would leave the layer through a link are refused (tarfile's `tar` filter), device
nodes are skipped, and whiteouts and later layers never follow a symbolic link an earlier layer left.
Unprivileged throughout: extraction and hard links need no capability.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import posixpath
import secrets
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atropos.images.errors import ImageError, ImageNotFoundError
from atropos.images.layers import ImageArchive, Layer, TaskImageRef, local_image_id, open_archive, remote_image_id
from atropos.images.sif import root_partition, unsquash
from atropos.progress import Progress, no_progress
from atropos.pulls import PullPolicy

__all__ = ["DEFAULT_LIMIT", "CachedImage", "ImageRoot", "RootCache", "default_root_cache_dir"]

DEFAULT_LIMIT = 20 * 1024**3
_OPAQUE = ".wh..wh..opq"
_WHITEOUT = ".wh."


def default_root_cache_dir() -> Path:
    configured = os.environ.get("ATROPOS_ROOT_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "atropos-sandbox" / "roots"


@dataclass(frozen=True)
class ImageRoot:
    """An unpacked image in use: its root directory and what its config says a process starts with."""

    ref: str
    image_id: str
    root: Path
    workdir: str
    env: list[str]

    @property
    def environment(self) -> dict[str, str]:
        """The image's `Env` (`NAME=value` entries) as a mapping."""
        return dict(entry.split("=", 1) for entry in self.env if "=" in entry)


@dataclass(frozen=True)
class CachedImage:
    image_id: str
    ref: str
    size: int  # bytes of its own files (layers shared with other images counted once, with the first)
    last_used: float
    in_use: bool


class RootCache:
    def __init__(self, directory: Path | None = None, limit: int = DEFAULT_LIMIT, pull: PullPolicy = "missing") -> None:
        self.directory = directory or default_root_cache_dir()
        self.limit = limit
        self.pull = pull  # registry images (docker://): `missing` pulls one this node lacks, `always`
        # asks the registry each time (pulling when the image changed), `never` takes only what is here
        for sub in ("layers", "images"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)

    @contextmanager
    def use(self, text: str, progress: Progress = no_progress) -> Iterator[ImageRoot]:
        """The image's root, unpacked first if this node has not got it; it cannot be evicted while
        the block runs. A directory reference is used as it is."""
        ref = TaskImageRef.parse(text)
        if ref.kind == "dir":
            yield _directory(ref)
            return
        while True:
            image_dir = self.directory / "images" / (self._known_id(ref) or "").partition(":")[2]
            if image_dir.name == "" or not (image_dir / "image.json").is_file():
                if ref.kind == "docker" and self.pull == "never":
                    raise ImageNotFoundError(f"image {ref}: not on this node, and the pull policy is never")
                try:
                    image_dir = self._unpacked(ref, progress)
                except OSError as exc:  # the image out of the server user's reach, the cache's disk full
                    why = f"image {ref}: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
                    unreachable = exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.ENAMETOOLONG)
                    raise (ImageNotFoundError if unreachable else ImageError)(why) from None
            with _flock(self._lock_of(image_dir), fcntl.LOCK_SH):
                if not (image_dir / "image.json").is_file():
                    continue  # trimmed between its making and this lock: make it again
                meta = json.loads((image_dir / "image.json").read_text())
                os.utime(image_dir / "image.json")  # last used: the trimming order
                yield ImageRoot(str(ref), meta["image_id"], image_dir / "root", meta["workdir"], meta["env"])
                return

    @contextmanager
    def keep(self, image: ImageRoot) -> Iterator[None]:
        """One more hold on an image in use (a snapshot of a slot in it, a fork of that snapshot):
        it cannot be evicted until the block ends. The reference is not resolved again (a tag may
        have moved since): the hold is on this very image."""
        if TaskImageRef.parse(image.ref).kind == "dir":
            yield
            return
        image_dir = image.root.parent
        with _flock(self._lock_of(image_dir), fcntl.LOCK_SH):
            if not (image_dir / "image.json").is_file():
                raise ImageNotFoundError(f"image {image.ref}: no longer on this node (evicted)")
            yield

    def _known_id(self, ref: TaskImageRef) -> str | None:
        """The id of the image `ref` names, where it is known without saving or pulling it."""
        if ref.kind == "docker-daemon":
            return local_image_id(ref)
        if ref.kind in ("docker-archive", "oci-archive"):  # its id is inside: read once, known by the file
            source = _source(ref)
            made = [m for m in self._metas() if m["ref"] == str(ref) and source and m.get("source") == source]
            return made[0]["image_id"] if made else None
        if ref.kind != "docker":
            return None
        if self.pull == "always":
            return remote_image_id(ref)
        made = [meta for meta in self._metas() if meta["ref"] == str(ref)]
        return max(made, key=lambda meta: meta.get("made", 0.0))["image_id"] if made else None

    def _unpacked(self, ref: TaskImageRef, progress: Progress) -> Path:
        if ref.kind == "sif":
            return self._make_sif(ref, progress)
        if ref.kind == "docker":
            progress(f"image {ref}: pulling it from its registry (skopeo copy)")
        with tempfile.TemporaryDirectory(dir=self.directory, prefix=".scratch-") as scratch:
            with open_archive(ref, Path(scratch)) as archive:
                image_dir = self.directory / "images" / archive.image_id.partition(":")[2]
                if not (image_dir / "image.json").is_file():
                    self._make(archive, image_dir, progress)
        return image_dir

    def images(self) -> list[CachedImage]:
        found = []
        for meta_file in sorted((self.directory / "images").glob("*/image.json")):
            meta = json.loads(meta_file.read_text())
            image_dir = meta_file.parent
            found.append(
                CachedImage(
                    meta["image_id"],
                    meta["ref"],
                    _disk_usage(image_dir),
                    meta_file.stat().st_mtime,
                    _in_use(self._lock_of(image_dir)),
                )
            )
        return found

    def held(self) -> dict[str, str]:
        """Reference -> image id of every image unpacked here (no sizes: cheap enough for /health)."""
        return {meta["ref"]: meta["image_id"] for meta in self._metas()}

    def size(self) -> int:
        return _disk_usage(self.directory)

    def trim(self, limit: int | None = None) -> list[str]:
        """Evict the least recently used images no slot uses until the cache is under `limit`
        (default: the cache's), then the layers no image left needs; returns the evicted refs."""
        limit = self.limit if limit is None else limit
        evicted: list[str] = []
        with _flock(self.directory / "cache.lock", fcntl.LOCK_EX):
            size = self.size()
            for image in sorted(self.images(), key=lambda i: i.last_used):
                if size <= limit:
                    break
                image_dir = self.directory / "images" / image.image_id.partition(":")[2]
                if _evict(image_dir, self._lock_of(image_dir)):
                    evicted.append(image.ref)
                    size = self.size()
            needed = {layer for meta in self._metas() for layer in meta["layers"]}
            for layer_dir in (self.directory / "layers").iterdir():
                if layer_dir.is_dir() and not layer_dir.name.startswith(".") and layer_dir.name not in needed:
                    shutil.rmtree(layer_dir)
                    for suffix in (".json", ".lock"):
                        (layer_dir.parent / f"{layer_dir.name}{suffix}").unlink(missing_ok=True)
        return evicted

    # ---------------------------------------------------------------------------- making one

    def _lock_of(self, image_dir: Path) -> Path:
        return image_dir.with_name(image_dir.name + ".lock")

    def _metas(self) -> list[dict[str, Any]]:
        metas = []
        for path in (self.directory / "images").glob("*/image.json"):
            with suppress(FileNotFoundError):  # evicted since the listing
                metas.append(json.loads(path.read_text()))
        return metas

    def _make(self, archive: ImageArchive, image_dir: Path, progress: Progress) -> None:
        """An archive's root: its layers applied in order (each unpacked once, see `_layer`)."""
        config = archive.config.get("config") or {}
        meta = {
            "ref": str(archive.ref),
            "image_id": archive.image_id,
            "layers": [layer.diff_id.partition(":")[2] for layer in archive.layers],
            "workdir": config.get("WorkingDir") or "",
            "env": list(config.get("Env") or []),
            "made": time.time(),
            "source": _source(archive.ref),
        }

        def fill(root: Path) -> None:
            root.mkdir()
            for n, layer in enumerate(archive.layers, 1):
                layer_dir = self._layer(archive, layer, progress, f"layer {n}/{len(archive.layers)}")
                _apply(layer_dir, json.loads(layer_dir.with_name(layer_dir.name + ".json").read_text()), root)

        self._publish(image_dir, meta, fill, progress)

    def _make_sif(self, ref: TaskImageRef, progress: Progress) -> Path:
        """A SIF's root: its squashfs partition, unpacked by unsquashfs (one layer, shared with nothing)."""
        path = Path(ref.target)
        partition = root_partition(path)
        image_dir = self.directory / "images" / partition.image_id.partition(":")[2]
        if not (image_dir / "image.json").is_file():
            progress(f"image {ref}: unpacking its root partition ({partition.size >> 20} MB)")
            meta = {"ref": str(ref), "image_id": partition.image_id, "layers": [], "workdir": "", "env": []}
            self._publish(image_dir, meta, lambda root: unsquash(path, partition, root), progress)
        return image_dir

    def _publish(self, image_dir: Path, meta: dict[str, Any], fill: Callable[[Path], None], progress: Progress) -> None:
        """Make the image under its making lock, in a partial directory renamed into place once
        complete (`fill` makes its root); a process that waited finds it made."""
        making = image_dir.with_name(image_dir.name + ".make.lock")
        with _flock(self.directory / "cache.lock", fcntl.LOCK_SH), _flock(making, fcntl.LOCK_EX):
            if (image_dir / "image.json").is_file():
                return  # another process made it while this one waited
            started = time.monotonic()
            partial = image_dir.with_name(f".{image_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                partial.mkdir()
                fill(partial / "root")
                (partial / "image.json").write_text(json.dumps(meta, indent=1))
                if image_dir.exists():  # a leftover without image.json: never complete
                    shutil.rmtree(image_dir)
                os.rename(partial, image_dir)
            finally:
                if partial.exists():
                    shutil.rmtree(partial, ignore_errors=True)
            progress(f"image {meta['ref']}: unpacked in {time.monotonic() - started:.1f}s")

    def _layer(self, archive: ImageArchive, layer: Layer, progress: Progress, label: str) -> Path:
        """The layer unpacked, from the cache or now, once: two images that share a layer and are
        made at once (in threads or processes) wait for one unpack of it, under its lock."""
        name = layer.diff_id.partition(":")[2]
        layer_dir = self.directory / "layers" / name
        with _flock(layer_dir.with_name(f"{name}.lock"), fcntl.LOCK_EX):
            if layer_dir.is_dir():
                progress(f"image {archive.ref}: {label} {name[:12]} already unpacked")
                return layer_dir
            progress(f"image {archive.ref}: unpacking {label} {name[:12]}")
            partial = layer_dir.with_name(f".{name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                partial.mkdir()
                with archive.layer_tar(layer) as tar:
                    whiteouts = _extract(archive.ref, tar, partial)
                layer_dir.with_name(name + ".json").write_text(json.dumps(whiteouts))
                try:
                    os.rename(partial, layer_dir)
                except OSError:  # made meanwhile by a process that did not take the lock
                    if not layer_dir.is_dir():
                        raise
            finally:
                if partial.exists():
                    shutil.rmtree(partial, ignore_errors=True)
        return layer_dir


def _directory(ref: TaskImageRef) -> ImageRoot:
    root = Path(ref.target)
    if not root.is_dir():
        raise ImageNotFoundError(f"image {ref}: no such directory")
    if not any((root / d).exists() for d in ("bin", "usr")):
        raise ImageError(f"image {ref}: not an unpacked root (no bin or usr in it)")
    return ImageRoot(str(ref), f"dir:{root}", root, "", [])


def _extract(ref: TaskImageRef, tar: tarfile.TarFile, dest: Path) -> list[list[str]]:
    """Extract a layer into `dest`; returns its whiteouts as [kind, path] (kind: remove, opaque).

    Checked here rather than by tarfile's filters (Python 3.11.4+ only, and they refuse the absolute
    symlinks every root file system has): no member path leaves `dest` or passes through a link."""
    whiteouts: list[list[str]] = []
    trusted = getattr(tarfile, "fully_trusted_filter", None)  # what the checks below leave: no filter again
    if trusted is not None:
        tar.extraction_filter = trusted
    for member in tar:
        name = _member_path(ref, member.name)
        if name is None:
            continue
        head, base = posixpath.split(name)
        if base == _OPAQUE:
            whiteouts.append(["opaque", head])
            continue
        if base.startswith(_WHITEOUT):
            whiteouts.append(["remove", posixpath.join(head, base[len(_WHITEOUT) :])])
            continue
        if member.ischr() or member.isblk() or member.isfifo():
            continue  # device nodes: a slot gets its own /dev
        _check_parents(ref, dest, name, name)
        if member.islnk():
            target = _member_path(ref, member.linkname)
            if target is None or not os.path.lexists(dest / target):
                raise ImageError(f"image {ref}: cannot unpack {name!r}: its hard link target is not in the layer")
            _check_parents(ref, dest, target, name)
            member.linkname = target
        member.name = name
        member.mode &= ~(stat.S_ISUID | stat.S_ISGID)
        member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
        try:
            tar.extract(member, dest, numeric_owner=True)
        except OSError as exc:
            raise ImageError(f"image {ref}: cannot unpack {name!r}: {exc.strerror or exc}") from None
    return whiteouts


def _member_path(ref: TaskImageRef, raw: str) -> str | None:
    """A member's path inside the layer (None for the layer's own top); refuses one that climbs out."""
    name = posixpath.normpath(raw.lstrip("/"))
    if name == ".":
        return None
    if name == ".." or name.startswith("../"):
        raise ImageError(f"image {ref}: layer member {raw!r} leaves the image; refusing the image")
    return name


def _check_parents(ref: TaskImageRef, dest: Path, rel: str, member: str) -> None:
    """Every directory on the way to `dest/rel` is a real directory: nothing goes through a link."""
    here = dest
    for part in rel.split("/")[:-1]:
        here = here / part
        if here.is_symlink():
            raise ImageError(f"image {ref}: cannot unpack {member!r}: it would go through the link {part!r}")


def _inside(root: Path, rel: str) -> Path | None:
    """`root/rel` if every directory on the way is a real directory (no symlink an earlier layer
    left can take a removal elsewhere); None when there is no such path."""
    here = root
    parts = [p for p in rel.split("/") if p]
    for part in parts[:-1]:
        here = here / part
        try:
            if not stat.S_ISDIR(os.lstat(here).st_mode):
                return None
        except FileNotFoundError:
            return None
    return here / parts[-1] if parts else root


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _apply(layer_dir: Path, whiteouts: list[list[str]], root: Path) -> None:
    """Lay one layer over `root`: its whiteouts first, then its files (hard links)."""
    for kind, rel in whiteouts:
        target = _inside(root, rel)
        if target is None or not os.path.lexists(target):
            continue
        if kind == "opaque":
            if target.is_dir() and not target.is_symlink():
                for child in list(target.iterdir()):
                    _remove(child)
        else:
            _remove(target)
    for top, dirs, files in os.walk(layer_dir):
        rel = os.path.relpath(top, layer_dir)
        there = root if rel == "." else root / rel
        for name in dirs:
            src, dst = Path(top) / name, there / name
            if os.path.islink(src):
                continue  # a symlink to a directory: os.walk lists it here, linked with the files below
            if os.path.lexists(dst) and not (dst.is_dir() and not dst.is_symlink()):
                _remove(dst)
            if not dst.exists():
                dst.mkdir()
            shutil.copystat(src, dst, follow_symlinks=False)
        for name in [*files, *(d for d in dirs if os.path.islink(Path(top) / d))]:
            src, dst = Path(top) / name, there / name
            if os.path.lexists(dst):
                _remove(dst)
            os.link(src, dst, follow_symlinks=False)


def _source(ref: TaskImageRef) -> list[int] | None:
    """What identifies an archive's file (size, mtime, inode): the same file holds the same image."""
    if ref.kind not in ("docker-archive", "oci-archive"):
        return None
    try:
        st = os.stat(ref.target)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


@contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


def _in_use(lock: Path) -> bool:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _evict(image_dir: Path, lock: Path) -> bool:
    """Remove the image unless a slot uses it (its lock held shared)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        shutil.rmtree(image_dir, ignore_errors=True)
        lock.unlink(missing_ok=True)
        image_dir.with_name(image_dir.name + ".make.lock").unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def _disk_usage(path: Path) -> int:
    """Bytes on disk under `path`, each inode once (hard-linked layers are not counted twice)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for top, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            try:
                st = os.lstat(os.path.join(top, name))
            except FileNotFoundError:  # gone meanwhile: another request's scratch dir, a partial renamed
                continue
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_blocks * 512
    return total
