"""The root file system of a SIF image (Apptainer's format), unpacked without Apptainer.

A SIF is a global header, a table of object descriptors and the objects; the root file system is
the descriptor of type "partition" whose partition type is "primary system", a squashfs image at a
byte offset of the file. `unsquashfs -o OFFSET` extracts it, unprivileged.

Layouts, as Apptainer's `sif` library writes them (little-endian, packed): the header holds at 0x30
the image's 16-byte id and at 0x58..0x68 the descriptor count and the table's offset; a descriptor
is 585 bytes: type (int32) at 0, in-use flag at 4, data offset (int64) at 17, size at 25, and its
type-specific `extra` at 201, which for a partition starts with file system type and partition type
(int32 each).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from atropos.images.errors import ImageError, ImageNotFoundError

__all__ = ["SifPartition", "root_partition", "unsquash"]

_MAGIC = b"SIF_MAGIC\0"
_HEADER = 128
_DESCRIPTOR = 585
_PARTITION = 0x4004
_SQUASHFS = 1
_PRIMARY_SYSTEM = 2


@dataclass(frozen=True)
class SifPartition:
    image_id: str  # "sif:<the image's id, hex>"
    offset: int
    size: int


def root_partition(path: Path) -> SifPartition:
    """Where the root file system (a squashfs) sits in the SIF at `path`."""
    if not path.is_file():
        raise ImageNotFoundError(f"{path}: no such SIF file")
    with path.open("rb") as fh:
        head = fh.read(_HEADER)
        if len(head) < _HEADER or head[32:42] != _MAGIC:
            raise ImageError(f"{path}: not a SIF image (no SIF header)")
        ident = head[0x30:0x40].hex()
        (count, table) = struct.unpack_from("<qq", head, 0x58)
        if not 0 < count < 4096 or table < _HEADER:
            raise ImageError(f"{path}: a damaged SIF header ({count} descriptors at {table})")
        fh.seek(table)
        raw = fh.read(count * _DESCRIPTOR)
    if len(raw) < count * _DESCRIPTOR:
        raise ImageError(f"{path}: the SIF's descriptor table is cut short")
    size_of_file = path.stat().st_size
    for i in range(count):
        base = i * _DESCRIPTOR
        (kind,) = struct.unpack_from("<i", raw, base)
        used = raw[base + 4]
        offset, size = struct.unpack_from("<qq", raw, base + 17)
        fstype, parttype = struct.unpack_from("<ii", raw, base + 201)
        if used and kind == _PARTITION and fstype == _SQUASHFS and parttype == _PRIMARY_SYSTEM:
            if offset < 0 or size <= 0 or offset + size > size_of_file:
                raise ImageError(f"{path}: the SIF's root partition lies outside the file")
            return SifPartition(f"sif:{ident}", offset, size)
    raise ImageError(f"{path}: the SIF holds no squashfs root partition (an encrypted or ext3 one is not supported)")


def unsquash(path: Path, partition: SifPartition, dest: Path) -> None:
    """Extract the partition into `dest` (which must not exist), as the calling user."""
    binary = shutil.which("unsquashfs")
    if binary is None:
        raise ImageError(f"{path}: unpacking a SIF needs `unsquashfs` (Debian/Ubuntu: squashfs-tools)")
    argv = [binary, "-no-progress", "-quiet", "-no-xattrs", "-offset", str(partition.offset), "-dest", str(dest)]
    done = subprocess.run([*argv, str(path)], capture_output=True, text=True, timeout=3600)
    # 2: some entries could not be written (device nodes, unprivileged): a slot has its own /dev
    if done.returncode not in (0, 2) or not dest.is_dir():
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise ImageError(f"{path}: unsquashfs failed: {why}")
