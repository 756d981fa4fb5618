"""Tar streams into and out of a directory, never touching anything outside it.

Unpacking (`unpack`) writes below a directory fd, one `openat`/`mkdirat` with O_NOFOLLOW at a time,
so a member can reach nothing outside: names that are absolute or climb with `..` are refused, a
member whose path goes through a symlink (one the archive made, or one already there) is refused,
symlink members are created as links and never followed, a hard link may only name a regular file
this archive already unpacked, and device nodes and FIFOs are refused. Bytes and members are
counted as they arrive, so a member larger than what is left of the budget (or a bomb) is refused
before its data is written. Setuid and setgid bits are dropped.

Packing (`pack`) walks a directory the same way (no symlink followed: links go into the archive as
links), reading each regular file through a descriptor opened with O_NOFOLLOW; sockets and FIFOs are
left out. Both run blocking, in a thread: the caller bridges the streams.

Compression: gzip or zstd, recognised by their magic bytes on the way in, chosen on the way out.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import stat
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Literal, Protocol, cast

import zstandard

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

Compression = Literal["gzip", "zstd", "none"]
# what a walk or a copy keeps: files, dirs and links only, or also what makes a dir an overlayfs
# layer (whiteouts: character devices 0/0; opaque dirs: an `overlay.opaque` xattr, user or trusted)
Keep = Literal["content", "layer"]
_WHITEOUT_DEV = os.makedev(0, 0)
_OVERLAY_XATTRS = ("user.overlay.", "trusted.overlay.")
COMPRESSIONS: tuple[Compression, ...] = ("gzip", "zstd", "none")
MEDIA_TYPES: dict[Compression, str] = {
    "gzip": "application/gzip",
    "zstd": "application/zstd",
    "none": "application/x-tar",
}


def compression_named(text: str) -> Compression:
    for known in COMPRESSIONS:
        if text == known:
            return known
    raise ValueError(f"compression {text!r}: one of {', '.join(COMPRESSIONS)}")


GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
DEFAULT_MAX_MEMBERS = 1_000_000

_CHUNK = 1 << 20
_OPEN_DIRS = 64  # directory fds kept open while unpacking (most archives fill one directory at a time)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MODE_BITS = 0o1777  # permissions and the sticky bit; never setuid or setgid
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class TreeRefused(ValueError):
    """The archive, or the path it goes to, is refused: nothing of it was kept."""


class TreeTooLarge(TreeRefused):
    """Over a size limit (bytes unpacked, or members)."""


@dataclass(frozen=True)
class TreeLimits:
    max_bytes: int
    max_members: int = DEFAULT_MAX_MEMBERS


@dataclass
class Unpacked:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes: int = 0


# -- names -----------------------------------------------------------------------------------


def member_parts(name: str) -> list[str]:
    """The components of a member's name below the destination; TreeRefused if it could leave it."""
    if "\x00" in name:
        raise TreeRefused(f"member {name!r}: the name holds a NUL byte")
    if name.startswith("/"):
        raise TreeRefused(f"member {name!r}: absolute names are refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise TreeRefused(f"member {name!r}: names with '..' are refused")
    return parts


# -- compression -----------------------------------------------------------------------------


def decompressed(raw: Reader) -> IO[bytes]:
    """The tar stream inside `raw`, which may be gzip, zstd or plain (told by its first bytes)."""
    buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(_Raw(raw), _CHUNK)
    head = buffered.peek(4)[:4]
    if head.startswith(GZIP_MAGIC):
        return cast(IO[bytes], gzip.GzipFile(fileobj=buffered, mode="rb"))
    if head == ZSTD_MAGIC:
        return cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True))
    return buffered


def compressed(out: Writer, compression: Compression) -> IO[bytes]:
    """A writer that compresses into `out` (closing it finishes the stream, not `out`)."""
    if compression == "gzip":
        return cast(IO[bytes], gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1))  # speed over size
    if compression == "zstd":
        return cast(IO[bytes], zstandard.ZstdCompressor(level=3).stream_writer(cast(IO[bytes], out), closefd=False))
    return cast(IO[bytes], _Unclosed(out))


class _Raw(io.RawIOBase):
    """Any object with read(n) as a raw stream (for the buffered reader's peek)."""

    def __init__(self, src: Reader) -> None:
        self.src = src

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.src.read(len(view))
        view[: len(data)] = data
        return len(data)


class _Unclosed(io.RawIOBase):
    """`out` as a writer whose close leaves `out` open."""

    def __init__(self, out: Writer) -> None:
        self.out = out

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        chunk = bytes(data)
        self.out.write(chunk)
        return len(chunk)


# -- unpacking -------------------------------------------------------------------------------


@dataclass
class _Dirs:
    """Directory fds below the destination by relative path, made on the way down, never via a link."""

    root: int
    open: OrderedDict[tuple[str, ...], int] = field(default_factory=OrderedDict)

    def get(self, parts: tuple[str, ...], name: str) -> int:
        if not parts:
            return self.root
        fd = self.open.get(parts)
        if fd is not None:
            self.open.move_to_end(parts)
            return fd
        parent = self.get(parts[:-1], name)
        try:
            os.mkdir(parts[-1], 0o755, dir_fd=parent)
        except FileExistsError:
            pass
        try:
            fd = os.open(parts[-1], _DIR, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise TreeRefused(
                    f"member {name!r}: {'/'.join(parts)} is not a directory (a symlink or a file)"
                ) from None
            raise
        self.open[parts] = fd
        if len(self.open) > _OPEN_DIRS:
            _, old = self.open.popitem(last=False)
            os.close(old)
        return fd

    def close(self) -> None:
        while self.open:
            os.close(self.open.popitem()[1])


def _replace_slot(parent: int, name: str) -> None:
    """Make room for a member: a file or link of an earlier member goes (a later member wins, as
    in tar); a directory stays and is an error for a non-directory member."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise TreeRefused(f"member {name!r}: a directory of that name is already there")
    os.unlink(name, dir_fd=parent)


def _write_member(parent: int, name: str, member: tarfile.TarInfo, data: IO[bytes]) -> int:
    _replace_slot(parent, name)
    fd = os.open(name, _NEW_FILE, 0o600, dir_fd=parent)
    written = 0
    try:
        while written < member.size:
            chunk = data.read(min(_CHUNK, member.size - written))
            if not chunk:
                raise TreeRefused(f"member {member.name!r}: the archive ends inside it")
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            written += len(chunk)
        os.fchmod(fd, member.mode & _MODE_BITS)
        os.utime(fd, (member.mtime, member.mtime))
    finally:
        os.close(fd)
    return written


def _apply_dir_modes(dirs: _Dirs, modes: list[tuple[tuple[str, ...], int]]) -> None:
    """Directory modes last (a read-only directory was still filled), deepest first; the owner
    keeps rwx so that the server can still reset the slot."""
    for parts, mode in sorted(modes, key=lambda pm: -len(pm[0])):
        parent = dirs.get(parts[:-1], "/".join(parts))
        os.chmod(parts[-1], mode | 0o700, dir_fd=parent, follow_symlinks=False)


class _Unpacker:
    def __init__(self, dest: int, limits: TreeLimits) -> None:
        self.dirs = _Dirs(dest)
        self.limits = limits
        self.done = Unpacked()
        self.members = 0
        self.regular: set[tuple[str, ...]] = set()  # files this archive made: the only hard-link targets
        self.dir_modes: list[tuple[tuple[str, ...], int]] = []

    def add(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise TreeTooLarge(f"the archive has more than {self.limits.max_members} members")
        parts = member_parts(member.name)
        if not parts:
            return  # the destination itself (".")
        *where, name = parts
        if member.isdir():
            self.dirs.get(tuple(parts), member.name)
            self.dir_modes.append((tuple(parts), member.mode & _MODE_BITS))
            self.done.dirs += 1
        elif member.isreg():
            left = self.limits.max_bytes - self.done.bytes
            if member.size > left:
                raise TreeTooLarge(
                    f"member {member.name!r} ({member.size} bytes) is over what is left of the "
                    f"{self.limits.max_bytes}-byte limit of one upload ({left} bytes)"
                )
            data = tf.extractfile(member)
            assert data is not None
            self.done.bytes += _write_member(self.dirs.get(tuple(where), member.name), name, member, data)
            self.regular.add(tuple(parts))
            self.done.files += 1
        elif member.issym():
            if "\x00" in member.linkname:
                raise TreeRefused(f"member {member.name!r}: the link target holds a NUL byte")
            parent = self.dirs.get(tuple(where), member.name)
            _replace_slot(parent, name)
            os.symlink(member.linkname, name, dir_fd=parent)
            self.done.symlinks += 1
        elif member.islnk():
            target = tuple(member_parts(member.linkname))
            if target not in self.regular:
                raise TreeRefused(
                    f"member {member.name!r}: a hard link may only name a file of the same archive "
                    f"({member.linkname!r} is not one)"
                )
            parent = self.dirs.get(tuple(where), member.name)
            _replace_slot(parent, name)
            source = self.dirs.get(target[:-1], member.name)
            os.link(target[-1], name, src_dir_fd=source, dst_dir_fd=parent, follow_symlinks=False)
            self.regular.add(tuple(parts))
            self.done.hardlinks += 1
        else:
            kind = "a device node" if member.ischr() or member.isblk() else "a FIFO" if member.isfifo() else "special"
            raise TreeRefused(f"member {member.name!r} is {kind}: only files, directories and links are accepted")

    def finish(self) -> None:
        _apply_dir_modes(self.dirs, self.dir_modes)


def unpack(raw: Reader, dest: int, limits: TreeLimits) -> Unpacked:
    """Unpack the (maybe compressed) tar stream `raw` below the directory fd `dest`.

    TreeRefused for a member that is refused; what was unpacked before it stays in `dest` (unpack
    into a fresh directory and move it into place to keep an archive all or nothing)."""
    unpacker = _Unpacker(dest, limits)
    try:
        with tarfile.open(fileobj=decompressed(raw), mode="r|") as tf:
            for member in tf:
                unpacker.add(tf, member)
        unpacker.finish()
    except tarfile.TarError as exc:
        raise TreeRefused(f"not a valid tar archive: {exc}") from None
    except (EOFError, zstandard.ZstdError) as exc:
        raise TreeRefused(f"the archive is damaged: {exc}") from None
    except OSError as exc:
        if exc.errno is not None:
            raise  # the file system's, not the archive's (gzip's errors have no errno)
        raise TreeRefused(f"the archive is damaged: {exc}") from None
    finally:
        unpacker.dirs.close()
    return unpacker.done


# -- packing ---------------------------------------------------------------------------------


class _Exactly(io.RawIOBase):
    """`size` bytes of an fd: a file that shrank while it was read is padded with zeros, one that
    grew is cut (the header already said its size)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        want = self.left if n < 0 else min(n, self.left)
        data = os.read(self.fd, want) if want else b""
        if want and not data:
            data = bytes(want)
        self.left -= len(data)
        return data


@dataclass
class Entry:
    """One entry of a tree being walked: `name` relative to its top, with '/' between components."""

    name: str
    st: os.stat_result
    fd: int = -1  # a regular file's, open for reading while the consumer holds the entry
    target: str = ""  # a symlink's
    xattrs: tuple[tuple[str, bytes], ...] = ()  # a layer's dir: its overlayfs attributes (opaque)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.st.st_mode)

    @property
    def is_whiteout(self) -> bool:
        return stat.S_ISCHR(self.st.st_mode) and self.st.st_rdev == _WHITEOUT_DEV


def _overlay_xattrs(fd: int) -> tuple[tuple[str, bytes], ...]:
    try:
        names = [n for n in os.listxattr(fd) if n.startswith(_OVERLAY_XATTRS)]
        return tuple((n, os.getxattr(fd, n)) for n in sorted(names))
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            return ()
        raise


def walk(fd: int, prefix: str = "", keep: Keep = "content") -> Iterator[Entry]:
    """Directories (before their contents), regular files and symlinks below the directory fd `fd`,
    never following a link; sockets and FIFOs are left out (they have no content to carry), and an
    entry that changes type while we walk is skipped. With `keep="layer"`, whiteouts too, and each
    directory's overlayfs attributes."""
    for name in sorted(os.listdir(fd)):
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        rel = f"{prefix}{name}"
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, _DIR, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                    continue
                raise
            try:
                yield Entry(rel, st, xattrs=_overlay_xattrs(sub) if keep == "layer" else ())
                yield from walk(sub, f"{rel}/", keep)
            finally:
                os.close(sub)
        elif stat.S_ISLNK(st.st_mode):
            try:
                yield Entry(rel, st, target=os.readlink(name, dir_fd=fd))
            except FileNotFoundError:
                continue
        elif stat.S_ISREG(st.st_mode):
            try:
                file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOENT):
                    continue
                raise
            try:
                st = os.fstat(file_fd)
                if stat.S_ISREG(st.st_mode):
                    yield Entry(rel, st, fd=file_fd)
            finally:
                os.close(file_fd)
        elif keep == "layer" and stat.S_ISCHR(st.st_mode) and st.st_rdev == _WHITEOUT_DEV:
            yield Entry(rel, st)


def _pack_dir(tf: tarfile.TarFile, fd: int) -> None:
    for entry in walk(fd):
        info = tarfile.TarInfo(entry.name)
        info.mode, info.mtime = stat.S_IMODE(entry.st.st_mode) & _MODE_BITS, int(entry.st.st_mtime)
        if entry.is_dir:
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        elif entry.is_link:
            info.type, info.linkname = tarfile.SYMTYPE, entry.target
            tf.addfile(info)
        else:
            info.size = entry.st.st_size
            tf.addfile(info, cast(IO[bytes], _Exactly(entry.fd, entry.st.st_size)))


def pack(src: int, out: Writer, compression: Compression) -> None:
    """Write the tree below the directory fd `src` to `out` as a tar stream (names relative to it)."""
    with (
        compressed(out, compression) as writer,
        tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tf,
    ):
        _pack_dir(tf, src)


def open_dir(path: str) -> int:
    """A directory fd of a local path (the caller's own directory: symlinks in the path are followed)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TreeRefused(f"{path}: no such directory") from None
    except NotADirectoryError:
        raise TreeRefused(f"{path}: not a directory") from None


# -- copying ---------------------------------------------------------------------------------


def _copy_data(src: int, dst: int, size: int) -> None:
    """In the kernel where it can (copy_file_range: a reflink on btrfs or XFS, a server-side copy
    elsewhere), else through this process."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src, dst, size - done)
            if n == 0:
                break
            done += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    os.lseek(src, done, os.SEEK_SET)
    while chunk := os.read(src, _CHUNK):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]


def copy_tree(src: int, dest: int, limits: TreeLimits, keep: Keep = "content") -> Unpacked:
    """Copy the tree below the directory fd `src` into the (empty) directory fd `dest`, with the
    confinement of `unpack` on both sides: nothing followed, nothing special, within `limits`.
    With `keep="layer"` the tree is an overlayfs layer (a slot's writes over its image): its
    whiteouts (which an unprivileged process may make) and opaque dirs are kept too."""
    dirs = _Dirs(dest)
    done = Unpacked()
    modes: list[tuple[tuple[str, ...], int]] = []
    members = 0
    try:
        for entry in walk(src, keep=keep):
            members += 1
            if members > limits.max_members:
                raise TreeTooLarge(f"the tree has more than {limits.max_members} entries")
            *where, name = parts = entry.name.split("/")
            mode = stat.S_IMODE(entry.st.st_mode) & _MODE_BITS
            if entry.is_dir:
                made = dirs.get(tuple(parts), entry.name)
                for key, value in entry.xattrs:
                    os.setxattr(made, key, value)
                modes.append((tuple(parts), mode))
                done.dirs += 1
                continue
            parent = dirs.get(tuple(where), entry.name)
            if entry.is_whiteout:
                os.mknod(name, stat.S_IFCHR, _WHITEOUT_DEV, dir_fd=parent)
                continue
            if entry.is_link:
                os.symlink(entry.target, name, dir_fd=parent)
                done.symlinks += 1
                continue
            if done.bytes + entry.st.st_size > limits.max_bytes:
                raise TreeTooLarge(f"the tree is over the limit of {limits.max_bytes} bytes (at {entry.name!r})")
            fd = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent
            )
            try:
                _copy_data(entry.fd, fd, entry.st.st_size)
                os.fchmod(fd, mode)
                os.utime(fd, ns=(entry.st.st_atime_ns, entry.st.st_mtime_ns))
            finally:
                os.close(fd)
            done.files += 1
            done.bytes += entry.st.st_size
        _apply_dir_modes(dirs, modes)
    finally:
        dirs.close()
    return done
