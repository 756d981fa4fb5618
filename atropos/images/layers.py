"""The layers of a task image, read from the archives users already have.

`docker-archive:PATH` (what `docker save` writes: `manifest.json`, and since Docker 25 an OCI
layout too), `oci-archive:PATH` (`index.json`, as `skopeo copy` or `docker save` write),
`docker-daemon://NAME:TAG` (a local engine, through `docker save`) and `docker://NAME:TAG` (a
registry, through `skopeo copy` into an OCI archive; skopeo's own configuration applies: its
credentials, `registries.conf` for mirrors and plain-HTTP registries, and CONTAINERS_REGISTRIES_CONF,
which skopeo before 1.10 (Debian 12's) reads only as an option). Every layer is named by its
diff id (the sha256 of its uncompressed tar, from the image config's `rootfs.diff_ids`), which is
what lets images that share a layer share its unpacked copy.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from atropos.images.errors import ImageError, ImageNotFoundError, InvalidReference

__all__ = ["ImageArchive", "Layer", "TaskImageRef", "local_image_id", "open_archive", "remote_image_id"]

Kind = Literal["docker", "docker-daemon", "docker-archive", "oci-archive", "sif", "dir"]
_PREFIXES: tuple[tuple[str, Kind], ...] = (
    ("docker://", "docker"),
    ("docker-daemon://", "docker-daemon"),
    ("docker-daemon:", "docker-daemon"),
    ("docker-archive:", "docker-archive"),
    ("oci-archive:", "oci-archive"),
)
_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class TaskImageRef:
    """A task image as the user wrote it: `kind` and what it names (a path, or NAME:TAG)."""

    kind: Kind
    target: str

    @classmethod
    def parse(cls, text: str) -> TaskImageRef:
        for prefix, kind in _PREFIXES:
            if text.startswith(prefix):
                target = text[len(prefix) :]
                if not target:
                    raise InvalidReference(f"image {text!r}: nothing after {prefix!r}")
                return cls(kind, target)
        if text.startswith("/"):
            return cls("sif" if text.endswith(".sif") else "dir", text)
        raise InvalidReference(
            f"image {text!r}: use docker://NAME:TAG (a registry), docker-daemon://NAME:TAG, docker-archive:PATH, "
            "oci-archive:PATH, the absolute path of a SIF file (*.sif) or of a directory holding an unpacked root"
        )

    def __str__(self) -> str:
        if self.kind == "docker":
            return f"docker://{self.target}"
        return self.target if self.kind in ("dir", "sif") else f"{self.kind}:{self.target}"


@dataclass(frozen=True)
class Layer:
    diff_id: str  # "sha256:<hex>" of the uncompressed layer tar
    member: str  # its path inside the archive


@dataclass
class ImageArchive:
    """An image archive opened for reading: its id (the config's digest) and its layers, lowest first."""

    ref: TaskImageRef
    image_id: str
    layers: list[Layer]
    config: dict[str, Any]
    _tar: tarfile.TarFile

    @contextmanager
    def layer_tar(self, layer: Layer) -> Iterator[tarfile.TarFile]:
        """The layer as a tar, gzip undone; zstd layers are refused with the reason."""
        raw = self._tar.extractfile(layer.member)
        if raw is None:
            raise ImageError(f"{self.ref}: layer {layer.member} is not a file in the archive")
        with raw:
            head = raw.read(4)
            raw.seek(0)
            if head.startswith(_ZSTD):
                raise ImageError(f"{self.ref}: layer {layer.diff_id[:19]} is zstd-compressed, which is not supported")
            stream: IO[bytes] | gzip.GzipFile = gzip.GzipFile(fileobj=raw) if head.startswith(_GZIP) else raw
            try:
                with tarfile.open(fileobj=stream, mode="r|") as layer_tar:
                    yield layer_tar
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise ImageError(f"{self.ref}: layer {layer.diff_id[:19]} is not a readable tar: {exc}") from None


@contextmanager
def open_archive(ref: TaskImageRef, scratch: Path) -> Iterator[ImageArchive]:
    """Open a docker-archive, oci-archive, docker-daemon or registry image (the last two saved or
    pulled to `scratch` first)."""
    if ref.kind in ("dir", "sif"):
        raise ValueError(f"a {ref.kind} is not an archive of layers")
    if ref.kind == "docker-daemon":
        path = _saved(ref, scratch)
    else:
        path = _pulled(ref, scratch) if ref.kind == "docker" else Path(ref.target)
    if not path.is_file():
        raise ImageNotFoundError(f"{ref}: no such file {path}")
    try:
        tar = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise ImageError(f"{ref}: not a tar archive ({exc})") from None
    with tar:
        try:
            names = set(tar.getnames())
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ImageError(f"{ref}: the archive is damaged ({exc})") from None
        if ref.kind in ("oci-archive", "docker") or ("manifest.json" not in names and "index.json" in names):
            yield _oci(ref, tar)
        else:
            yield _docker(ref, tar)


def local_image_id(ref: TaskImageRef) -> str | None:
    """The image id a local engine gives `ref` (`docker image inspect`), without saving it; None for
    archives (their id is in them) or when the engine cannot say."""
    if ref.kind != "docker-daemon":
        return None
    try:
        argv = ["docker", "image", "inspect", "--format", "{{.Id}}", ref.target]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    found = done.stdout.strip()
    return found if done.returncode == 0 and found.startswith("sha256:") else None


def _skopeo() -> list[str]:
    conf = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    return ["skopeo", "--registries-conf", conf] if conf else ["skopeo"]


def remote_image_id(ref: TaskImageRef) -> str:
    """The image id (its config's digest) a registry gives `ref` now, without pulling its layers."""
    argv = [*_skopeo(), "inspect", "--config", "--raw", f"docker://{ref.target}"]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=300)
    except FileNotFoundError:
        raise ImageError(f"{ref}: no `skopeo` command to ask its registry (Debian: skopeo)") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{ref}: its registry did not answer within 5 minutes") from None
    if done.returncode != 0:
        why = (done.stderr.decode(errors="replace").strip().splitlines() or ["no error text"])[-1]
        raise ImageNotFoundError(f"{ref}: its registry did not give the image: {why}")
    return "sha256:" + hashlib.sha256(done.stdout).hexdigest()


def _saved(ref: TaskImageRef, scratch: Path) -> Path:
    """`docker save` of a local engine's image into `scratch`."""
    out = scratch / "docker-save.tar"
    try:
        done = subprocess.run(
            ["docker", "save", "-o", str(out), ref.target], capture_output=True, text=True, timeout=600
        )
    except FileNotFoundError:
        raise ImageNotFoundError(f"{ref}: no `docker` command to read the local engine's images") from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no error text"])[-1]
        raise ImageNotFoundError(f"{ref}: `docker save {ref.target}` failed: {why}")
    return out


def _pulled(ref: TaskImageRef, scratch: Path) -> Path:
    """`skopeo copy` of a registry's image into an OCI archive in `scratch`."""
    out = scratch / "pulled.tar"
    argv = [*_skopeo(), "copy", "--quiet", f"docker://{ref.target}", f"oci-archive:{out}"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    except FileNotFoundError:
        raise ImageError(f"{ref}: no `skopeo` command to pull it from its registry (Debian: skopeo)") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{ref}: `skopeo copy` did not end within an hour") from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no error text"])[-1]
        raise ImageNotFoundError(f"{ref}: `skopeo copy` from its registry failed: {why}")
    return out


def _json(ref: TaskImageRef, tar: tarfile.TarFile, member: str) -> Any:
    try:
        raw = tar.extractfile(member)
    except KeyError:
        raw = None
    if raw is None:
        raise ImageError(f"{ref}: the archive has no {member}")
    with raw:
        try:
            return json.load(raw)
        except ValueError as exc:
            raise ImageError(f"{ref}: {member} is not JSON ({exc})") from None


def _blob(digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    return f"blobs/{algorithm}/{hexdigest}"


def _docker(ref: TaskImageRef, tar: tarfile.TarFile) -> ImageArchive:
    manifest = _json(ref, tar, "manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise ImageError(f"{ref}: manifest.json names no image")
    if len(manifest) > 1:
        raise ImageError(f"{ref}: the archive holds {len(manifest)} images; save one per archive")
    entry = manifest[0]
    config_member = str(entry.get("Config", ""))
    config = _json(ref, tar, config_member)
    members = [str(m) for m in entry.get("Layers") or []]
    image_id = "sha256:" + Path(config_member).name.removesuffix(".json")
    return ImageArchive(ref, image_id, _layers(ref, config, members), config, tar)


def _oci(ref: TaskImageRef, tar: tarfile.TarFile) -> ImageArchive:
    index = _json(ref, tar, "index.json")
    manifests = index.get("manifests") or []
    if len(manifests) != 1:
        raise ImageError(f"{ref}: index.json names {len(manifests)} manifests; one image per archive")
    manifest = _json(ref, tar, _blob(str(manifests[0].get("digest", ""))))
    if "layers" not in manifest:  # an image index (several platforms): not what a task archive holds
        raise ImageError(f"{ref}: the manifest names no layers (a multi-platform index?)")
    config_digest = str(manifest.get("config", {}).get("digest", ""))
    config = _json(ref, tar, _blob(config_digest))
    members = [_blob(str(layer.get("digest", ""))) for layer in manifest["layers"]]
    return ImageArchive(ref, config_digest, _layers(ref, config, members), config, tar)


def _layers(ref: TaskImageRef, config: Any, members: list[str]) -> list[Layer]:
    diff_ids = [str(d) for d in (config.get("rootfs", {}).get("diff_ids") or [])]
    if len(diff_ids) != len(members):
        raise ImageError(f"{ref}: the config lists {len(diff_ids)} layers, the manifest {len(members)}")
    return [Layer(d, m) for d, m in zip(diff_ids, members, strict=True)]
