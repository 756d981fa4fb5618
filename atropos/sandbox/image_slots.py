"""A slot in its task's own image: the image's root under the slot's own writable layer, and the
runner brought in from the node.

The root is an overlay mounted at `/` by bubblewrap: the unpacked image (atropos.images.roots,
shared read-only by every slot of it) below, the slot's `upper` dir above, so an agent may install
packages or edit `/etc` and nothing reaches the image or another slot; a reset drops the layer.
Where overlays cannot be mounted in a slot (bubblewrap before 0.11, a kernel before 5.11, an
overlay file system as the data dir), the slot gets a copy of the image's root instead: a start
that costs the image's size in time and disk, said in the answer of POST /image.
The image's files belong to the server's user, which is the slot's own user in its namespace.

The compiled runner is static: its copy is all a slot in an image needs of the node. The Python
runner is the server's Python, which the image may lack or have in another version: it runs
from the node's files, bound under `HOST` (its binary, its standard library, the node's loader and
shared libraries), started by the node's loader with the node's library path, so the image's own C
library never meets it. What the runner starts (the agent's shell and tools) is the image's.
"""

from __future__ import annotations

import os
import struct
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # atropos.images imports the server's settings, which import this module's importers
    from atropos.images.roots import ImageRoot

__all__ = ["HOST", "HostPython", "SlotImage", "host_python"]

HOST = "/run/atropos-host"  # where the node's files the runner needs show in an image slot

_PT_INTERP = 3


@dataclass(frozen=True)
class SlotImage:
    """The image a slot runs in now, and the slot's own layer over it (`work`: overlayfs's scratch);
    a fork of a snapshot has that snapshot's `layers` (topmost first) between the two. Where no
    overlay can be mounted in a slot, `upper` is instead a whole copy of the image's root, bound at
    `/` (`work` then empty)."""

    image: ImageRoot
    upper: str
    work: str
    layers: tuple[str, ...] = ()

    @property
    def copied(self) -> bool:
        return not self.work


@dataclass(frozen=True)
class HostPython:
    """How the runner's interpreter runs inside an image: `prefix` goes before its arguments."""

    prefix: tuple[str, ...]
    binds: tuple[tuple[str, str], ...]  # (node path, slot path), read-only
    site: tuple[str, ...]  # node paths of the interpreter's site-packages: covered where they show


def elf_interpreter(path: str) -> str | None:
    """The dynamic loader an ELF executable names (PT_INTERP); None for a static one."""
    with open(path, "rb") as fh:
        head = fh.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
            return None
        order = "<" if head[5] == 1 else ">"
        (phoff,) = struct.unpack_from(order + "Q", head, 0x20)
        phentsize, phnum = struct.unpack_from(order + "HH", head, 0x36)
        for i in range(phnum):
            fh.seek(phoff + i * phentsize)
            (kind,) = struct.unpack(order + "I", fh.read(4))
            if kind == _PT_INTERP:
                fh.seek(phoff + i * phentsize + 8)
                (offset,) = struct.unpack(order + "Q", fh.read(8))
                fh.seek(phoff + i * phentsize + 32)
                (size,) = struct.unpack(order + "Q", fh.read(8))
                fh.seek(offset)
                return fh.read(size).rstrip(b"\0").decode()
    return None


@lru_cache(maxsize=1)
def host_python() -> HostPython:
    python = os.path.realpath(sys.executable)
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    libdirs: list[str] = []
    for candidate in ("/lib64", f"/lib/{multiarch}", f"/usr/lib/{multiarch}", "/usr/lib64"):
        real = os.path.realpath(candidate)
        if candidate.rstrip("/") not in ("/lib", "/usr/lib") and os.path.isdir(real) and real not in libdirs:
            libdirs.append(real)
    stdlib = os.path.join(os.path.realpath(sys.base_prefix), "lib")  # the stdlib, and libpython where shared
    binds = [(python, HOST + python), *((d, HOST + d) for d in libdirs)]
    if stdlib not in libdirs:
        binds.append((stdlib, HOST + stdlib))
    interpreter = elf_interpreter(python)
    prefix: list[str] = []
    if interpreter is not None:
        loader = os.path.realpath(interpreter)
        if not any(loader.startswith(d + "/") for d in libdirs):
            binds.append((loader, HOST + loader))
        prefix = [HOST + loader, "--library-path", ":".join(HOST + d for d in [*libdirs, stdlib])]
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    site = {os.path.realpath(sysconfig.get_paths(vars=base)[key]) for key in ("purelib", "platlib")}
    return HostPython((*prefix, HOST + python), tuple(binds), tuple(sorted(p for p in site if os.path.isdir(p))))
