"""What a slot's root file system holds: an allow-list, never the node's `/` minus exceptions.

Each policy builds the same kind of root: a read-only tmpfs (bubblewrap's) with chosen directories
bound into it. Fresh /dev, /proc, /tmp, an empty /run and the workspace come on top (isolation.py).

- `system` (the default, for servers on a node): what a program needs to run, nothing else:
  /usr, /bin, /sbin, /lib*, /sys, and a curated /etc (the files programs read to run: the loader,
  certificates, time zone, locale, resolver; never secrets such as /etc/shadow or /etc/ssh, and
  passwd, group, hosts and hostname written for the slot instead of the node's; copied once per
  server start into one directory, so that it costs a slot's start one mount). Home directories,
  /opt, /srv, /mnt, /var, shared file systems and the server's working directory stay out.
- `image` (servers in a container: the Docker image and the SIF set it through
  $ATROPOS_SANDBOX_ROOT): the container's root, minus every mount its runtime added (the data dir,
  a job's directory, Nomad's alloc, local and secrets dirs, an Apptainer home), minus /run.
- `host` (asked for by name only): the node's whole root read-only, as before the allow-list.

In every policy the server's own files are hidden wherever they would show: its data dir (every
slot's workspace, the snapshots, the token it generated), the token file, the installed package
(the server's code and the built-in tasks with their hidden checks) and the server's virtualenv.
The slot's runner gets a private read-only copy of itself (`RUNNER_DIR`): the compiled runner's
static binary, or the few stdlib-only modules the Python runner runs, whose interpreter is then bound
by itself when it lives outside the allow-list.
Directories the user declares (`--bind-ro`, `--bind`) come on top; a private path inside one of
them is hidden there too.
"""

from __future__ import annotations

import compileall
import grp
import logging
import os
import pwd
import py_compile
import re
import shutil
import stat
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from atropos.sandbox.image_slots import HostPython, host_python

log = logging.getLogger("atropos.sandbox")

RootPolicy = Literal["system", "image", "host"]
ROOT_POLICIES: tuple[RootPolicy, ...] = ("system", "image", "host")
ROOT_ENV = "ATROPOS_SANDBOX_ROOT"  # the default of --root where set (the Docker image and the SIF: image)

RUNNER_DIR = "/run/atropos-runner"  # the runner's private copy, inside every slot
RUNNER_BINARY = RUNNER_DIR + "/atropos-runner"  # the compiled runner's, run from there

# what the runner imports of the package (tests/test_runner_imports.py holds it to these)
RUNNER_PACKAGES = ("atropos.sandbox.runner", "atropos.host")
RUNNER_MODULES = ("atropos", "atropos.sandbox", "atropos.units")

# top-level entries `system` binds from the node, where they exist
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "sys")
# /sys as bound is the node's view, not the slot's: its network devices (the node's interface names;
# a slot has its own eth0 and lo) and every control group on the node (the other slots' groups, with
# their memory and processes counted); covered with an empty directory wherever /sys shows
SYS_COVERED = ("/sys/class/net", "/sys/devices/virtual/net", "/sys/fs/cgroup")

# /etc entries `system` copies (the rest of the node's /etc stays out); `python3*` and `java*` too
ETC_KEPT = frozenset(
    {
        "alternatives", "bash.bashrc", "ca-certificates", "ca-certificates.conf", "crypto-policies",
        "debian_version", "fonts", "gai.conf", "gitconfig", "host.conf", "inputrc", "ld.so.cache",
        "ld.so.conf", "ld.so.conf.d", "locale.alias", "locale.conf", "localtime", "magic", "magic.mime",
        "manpath.config", "mime.types", "nsswitch.conf", "os-release", "pki", "profile", "profile.d",
        "protocols", "redhat-release", "resolv.conf", "rpc", "services", "shells", "ssl", "subversion",
        "system-release", "terminfo", "timezone", "vim", "vimrc", "wgetrc", "xattr.conf", "lsb-release",
    }
)  # fmt: skip
ETC_KEPT_PREFIXES = ("python3", "java")

# top-level entries `image` and `host` never bind: fresh mounts replace them, or nothing does
_NEVER_BOUND = frozenset({"proc", "dev", "tmp", "run", "workspace"})
# mounts a container runtime adds that a program expects to read (kept in `image`)
_RUNTIME_FILES = frozenset(
    {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/etc/localtime", "/etc/passwd", "/etc/group"}
)
_RESERVED_TARGETS = ("/", "/proc", "/dev", "/tmp", "/workspace", "/run", RUNNER_DIR)


class RootError(ValueError):
    """A declared bind that cannot be honoured (the message names it and why)."""


@dataclass(frozen=True)
class Bind:
    """A directory (or file) the user declared: `source` on the node (or in the container) shown
    at `target` in every slot, read-only unless `writable` (then every slot shares it)."""

    source: str
    target: str
    writable: bool = False

    @classmethod
    def parse(cls, text: str, *, writable: bool) -> Bind:
        flag = "--bind" if writable else "--bind-ro"
        source, _, target = text.partition(":")
        target = target or source
        for what, path in (("source", source), ("target", target)):
            if not path.startswith("/"):
                raise RootError(f"{flag} {text}: the {what} must be an absolute path (SRC[:DST])")
            if "\0" in path or "\n" in path or ":" in path:
                raise RootError(f"{flag} {text}: the {what} holds a character a bind cannot carry")
        target = os.path.normpath(target)
        reserved = next((r for r in _RESERVED_TARGETS if target == r or (r != "/" and _under(target, r))), None)
        if reserved is not None:
            raise RootError(f"{flag} {text}: {target} is the slot's own {reserved} (choose another target)")
        return cls(os.path.normpath(source), target, writable)

    def describe(self) -> str:
        where = self.source if self.source == self.target else f"{self.source}:{self.target}"
        return f"{where} ({'rw' if self.writable else 'ro'})"


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def package_dir() -> str:
    """The installed `atropos` package (its code and the built-in tasks)."""
    import atropos

    return os.path.dirname(os.path.realpath(atropos.__file__))


def private_paths(data_dir: str, token_files: Iterable[str]) -> list[str]:
    """What of the server no slot ever reads: its data dir, token files, package and virtualenv."""
    paths = [os.path.realpath(data_dir), package_dir(), *(os.path.realpath(p) for p in token_files)]
    if sys.prefix != sys.base_prefix:  # the server's own virtualenv: its dependencies and scripts
        paths.append(os.path.realpath(sys.prefix))
    return sorted(set(paths))


def copy_runner(dest: str, binary: str | None = None) -> str:
    """A fresh copy of the runner under `dest` (what RUNNER_DIR shows): the compiled runner `binary`,
    or without one the Python runner's modules; returns `dest`."""
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    if binary is not None:
        os.makedirs(dest)
        shutil.copy(binary, os.path.join(dest, os.path.basename(RUNNER_BINARY)))  # with its mode
        return dest
    parent = os.path.dirname(package_dir())
    names = []
    for module in RUNNER_MODULES:
        path = module.replace(".", "/")
        names.append(f"{path}/__init__.py" if os.path.isdir(os.path.join(parent, path)) else f"{path}.py")
    for package in RUNNER_PACKAGES:
        folder = package.replace(".", "/")
        names += [f"{folder}/{n}" for n in sorted(os.listdir(os.path.join(parent, folder))) if n.endswith(".py")]
    for name in names:
        os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
        shutil.copyfile(os.path.join(parent, name), os.path.join(dest, name))
    # compiled once here, not at every runner's start (the copy is read-only in the slot, so a
    # runner could never cache its own): a third of the runner's imports. Never checked against
    # the sources, which no one changes after this copy.
    compileall.compile_dir(dest, quiet=2, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    return dest


@dataclass(frozen=True)
class _Shown:
    """`source` on the node shows at `target` in the slot."""

    source: str
    target: str


class _Builder:
    def __init__(self) -> None:
        self.args: list[str] = []
        self.maps: list[_Shown] = []
        self.hidden: list[str] = []
        self.sealed: list[str] = []  # tmpfs covers, read-only once everything is mounted

    def bind(self, source: str, target: str, *, writable: bool = False) -> None:
        self.args += ["--bind" if writable else "--ro-bind", source, target]
        self.maps.append(_Shown(os.path.realpath(source), target))

    def top_level(self, name: str) -> None:
        host = "/" + name
        if os.path.islink(host):
            self.args += ["--symlink", os.readlink(host), host]
        elif os.path.exists(host):
            self.bind(host, host)

    def shown_at(self, path: str) -> list[str]:
        """Where node path `path` shows in the slot (through any bind above it)."""
        return [m.target + path[len(m.source) :] for m in self.maps if _under(path, m.source)]

    def visible(self, path: str) -> bool:
        return any(_under(path, m.source) for m in self.maps)

    def hide(self, path: str, target: str, empty_dir: str) -> None:
        """Cover `target` (where node path `path` shows) with an empty directory, or an empty file."""
        if any(_under(target, done) for done in self.hidden) or not os.path.lexists(path):
            return  # hidden already, with what holds it
        self.args += ["--ro-bind", empty_dir if os.path.isdir(path) else "/dev/null", target]
        self.hidden.append(target)

    def hide_mount(self, point: str) -> None:
        """Cover a runtime's mount point with an empty tmpfs, made read-only by `seal` once the
        declared binds are in: a bind under it (Apptainer's home, /var/tmp) still finds its mount point."""
        if any(_under(point, done) for done in self.hidden):
            return
        if not os.path.isdir(point):
            self.hide(point, point, "")
            return
        self.args += ["--tmpfs", point]
        self.hidden.append(point)
        self.sealed.append(point)

    def seal(self) -> None:
        self.args += [arg for point in self.sealed for arg in ("--remount-ro", point)]


@dataclass(frozen=True)
class RootLayout:
    """bubblewrap's arguments for a slot's root (all but /dev, /proc, /tmp and the workspace), made
    once per server, and what `/health` says of it."""

    policy: RootPolicy
    args: tuple[str, ...]
    binds: tuple[Bind, ...]
    hidden: tuple[str, ...]  # where the server's own files would have shown: covered
    # a slot in a task's image (atropos.sandbox.image_slots): what goes over the image's root, and
    # the runner's program there (in place of its argv[0]: the Python runner runs from the node's files)
    image_args: tuple[str, ...] = ()
    image_runner: tuple[str, ...] = ()


def _system_etc(b: _Builder, state_dir: str, private: list[str]) -> None:
    """The curated /etc: kept entries of the node's, and identity files written for the slot, copied
    into one directory the slot gets as a single mount. Binding each entry by itself cost bubblewrap a
    mount per entry (about 45 on Debian), two thirds of a slot's start; the copy is taken once per
    server start. Nothing the server cannot read and none of its private files is copied."""
    etc = os.path.join(state_dir, "etc")
    _remove_copy(etc)
    os.makedirs(etc)
    hidden = [os.path.realpath(p) for p in private]

    def skipped(folder: str, names: list[str]) -> set[str]:
        """The server's private files, and what not everyone may read: a copy belongs to the server's
        user, which the slot's user is, where the node's file may have been readable by its owner or
        group alone (a key in /etc/ssl/private readable by the group ssl-cert)."""
        out = set()
        for name in names:
            path = os.path.join(folder, name)
            if any(_under(os.path.realpath(path), p) for p in hidden) or not _world_readable(path):
                out.add(name)
        return out

    for name in sorted(os.listdir("/etc")) if os.path.isdir("/etc") else []:
        path = "/etc/" + name
        # a dangling link (resolv.conf of a stopped resolver) is left out
        if not (name in ETC_KEPT or name.startswith(ETC_KEPT_PREFIXES)) or not os.path.exists(path):
            continue
        if skipped("/etc", [name]) or not _world_readable(os.path.realpath(path)):
            continue
        try:  # the entry as a bind showed it: what a link at the top points to; links inside stay links
            if os.path.isdir(path):
                shutil.copytree(path, os.path.join(etc, name), symlinks=True, ignore=skipped)
            else:
                shutil.copy2(path, os.path.join(etc, name))
        except (OSError, shutil.Error) as exc:
            # what the server's user cannot read was unreadable in the slot too: left out
            log.debug("slot /etc: %s copied in part: %s", path, exc)
    for name, text in _identity_files().items():
        with open(os.path.join(etc, name), "w", encoding="utf-8") as fh:
            fh.write(text)
    b.args += ["--ro-bind", etc, "/etc"]


def _world_readable(path: str) -> bool:
    """A link (its target is judged where it leads), or a file anyone may read, a directory anyone may list."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISLNK(st.st_mode):
        return True
    need = stat.S_IROTH | stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else stat.S_IROTH
    return st.st_mode & need == need


def _remove_copy(top: str) -> None:
    """Remove an earlier server's copy of /etc, whose directories may have kept read-only modes:
    each directory made the owner's to change first (top-down, so before it is listed), links left
    as they are, then one rmtree."""
    if not os.path.lexists(top):
        return
    if os.path.islink(top) or not os.path.isdir(top):
        os.unlink(top)
        return
    os.chmod(top, 0o700)
    for folder, subfolders, _files in os.walk(top):
        for name in subfolders:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)
    shutil.rmtree(top)


def _identity_files() -> dict[str, str]:
    """passwd, group, hosts and hostname of a slot: its own user, root and nobody; no node names."""
    uid, gid = os.getuid(), os.getgid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = "sandbox"
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = user
    shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
    users = {0: "root:x:0:0:root:/root:" + shell, 65534: "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin"}
    users.setdefault(uid, f"{user}:x:{uid}:{gid}:{user}:/workspace:{shell}")
    groups = {0: "root:x:0:", 65534: "nogroup:x:65534:"}
    groups.setdefault(gid, f"{group}:x:{gid}:")
    return {
        "passwd": "\n".join(users.values()) + "\n",
        "group": "\n".join(groups.values()) + "\n",
        "hosts": "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        "hostname": "sandbox\n",
    }


def _interpreter(b: _Builder) -> list[str]:
    """Bind the Python that runs the runner where the allow-list leaves it out (pyenv, conda, uv);
    returns the directories of it to hide (its site-packages)."""
    python = os.path.realpath(sys.executable)
    if b.visible(python):
        return []
    b.bind(python, python)
    lib = os.path.join(os.path.realpath(sys.base_prefix), "lib")  # the stdlib, and libpython where shared
    if os.path.isdir(lib) and not b.visible(lib):
        b.bind(lib, lib)
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    return [os.path.realpath(sysconfig.get_paths(vars=base)[key]) for key in ("purelib", "platlib")]


_OCTAL = re.compile(r"\\([0-7]{3})")


def _runtime_mounts() -> list[str]:
    """Mount points a container runtime added on top of the image's root (from mountinfo)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])  # mountinfo escapes: \040 for a space
        if point == "/" or point in _RUNTIME_FILES or any(_under(point, "/" + t) for t in ("proc", "dev", "sys")):
            continue
        points.append(point)
    return sorted(set(points))


def _check_source(bind: Bind) -> None:
    flag = "--bind" if bind.writable else "--bind-ro"
    try:
        os.stat(bind.source)
    except FileNotFoundError:
        raise RootError(f"{flag} {bind.source}: no such file or directory") from None
    except OSError as exc:
        raise RootError(
            f"{flag} {bind.source}: the server's user (uid {os.getuid()}) cannot reach it: {exc.strerror}"
        ) from None


def build_layout(
    policy: RootPolicy,
    *,
    state_dir: str,
    private: Iterable[str],
    binds: Iterable[Bind] = (),
    runner_binary: str | None = None,
) -> RootLayout:
    """The root of every slot of this server, whose runner is the compiled `runner_binary` or, without
    one, the Python runner; `state_dir` (inside the data dir, never shown to a slot) receives the
    written /etc files, an empty dir to hide others with and the runner's copy."""
    os.makedirs(state_dir, exist_ok=True)
    empty = os.path.join(state_dir, "empty")
    os.makedirs(empty, exist_ok=True)
    b = _Builder()
    private = list(private)
    hide = list(private)
    if policy == "system":
        for name in SYSTEM_DIRS:
            b.top_level(name)
        _system_etc(b, state_dir, private)
    else:
        for name in sorted(os.listdir("/")):
            if name not in _NEVER_BOUND:
                b.top_level(name)
        if policy == "image":
            for point in _runtime_mounts():
                if b.visible(point):
                    b.hide_mount(point)
    if runner_binary is None:
        hide += _interpreter(b)
    b.args += ["--dir", "/run"]
    runner = copy_runner(os.path.join(state_dir, "runner"), runner_binary)
    b.args += ["--ro-bind", runner, RUNNER_DIR]
    declared = tuple(binds)
    for bind in declared:
        _check_source(bind)
        b.bind(bind.source, bind.target, writable=bind.writable)
    for path in sorted(set(hide)):
        for target in b.shown_at(path):
            b.hide(path, target, empty)
    own_files_covered = tuple(b.hidden)
    for path in SYS_COVERED:
        for target in b.shown_at(path):
            b.hide(path, target, empty)
    b.seal()
    host = host_python() if runner_binary is None else None
    return RootLayout(
        policy,
        tuple(b.args),
        declared,
        own_files_covered,
        _image_args(private, declared, runner, empty, host),
        host.prefix if host is not None else (RUNNER_BINARY,),
    )


def _image_args(
    private: Iterable[str], binds: tuple[Bind, ...], runner: str, empty: str, host: HostPython | None
) -> tuple[str, ...]:
    """What a slot in a task's image gets over the image's root: the runner's copy, the node's Python
    `host` for the Python runner (atropos.sandbox.image_slots; the compiled one is static and needs
    nothing of the node), the declared binds; the server's own files and the interpreter's
    site-packages covered wherever they would show."""
    b = _Builder()
    for source, target in host.binds if host is not None else ():
        b.bind(source, target)
    b.args += ["--ro-bind", runner, RUNNER_DIR]
    for bind in binds:
        b.bind(bind.source, bind.target, writable=bind.writable)
    for path in sorted({*private, *(host.site if host is not None else ())}):
        for target in b.shown_at(path):
            b.hide(path, target, empty)
    return tuple(b.args)
