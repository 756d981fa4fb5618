"""A server started as root never runs a slot as root: it gives up root before any slot starts.

Where the server meets root:
- a root Nomad agent's `raw_exec` task, a root user's local pool, CI: plain root on the node;
- a Docker container, which starts as root so that the steps below can be taken, with
  CAP_SYS_ADMIN added (`--cap-add SYS_ADMIN`, Nomad `cap_add = ["sys_admin"]`).

Steps, in order, while still root:
1. Docker masks parts of /proc (bind mounts over /proc/kcore, /proc/sys, ...). The kernel refuses
   a fresh procfs inside a user namespace while the only procfs in sight has such overmounts, so
   bubblewrap could not give slots their own /proc. With CAP_SYS_ADMIN the server moves into a
   private mount namespace and mounts a fresh, unmasked procfs of the container's PID namespace
   there (what `--security-opt systempaths=unconfined` would do, which Nomad cannot pass). Only
   the server's mount namespace changes; every slot then gets its own /proc of its own PID namespace.
2. The data dir (and the slots' cgroups) are handed to the unprivileged user.
3. Supplementary groups, gid and uid become that user's, which clears every capability, and
   no_new_privs is set: nothing started later (a setuid binary, file capabilities) regains any.
   (A user namespace the server's children create still gives them capabilities inside it, which
   is all that bubblewrap and network `public` need.)

The user defaults to `nobody` (a name that exists on every node and image); `--run-as` picks
another (the Docker image uses its `sandbox` user, the local docker driver the pool's own uid).
"""

from __future__ import annotations

import ctypes
import errno
import grp
import logging
import os
import pwd
from collections.abc import Sequence
from dataclasses import dataclass

from atropos.host.lifetime import die_with_parent, forbid_new_privileges, parent_death_signal

log = logging.getLogger("atropos.sandbox")


_CLONE_NEWNS = 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 8, 0x1000, 0x4000, 1 << 18


class PrivilegeError(RuntimeError):
    """Root could not be given up safely: the server must not start."""


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    name: str

    def describe(self) -> str:
        return f"{self.name} (uid {self.uid}, gid {self.gid})"


def resolve_identity(spec: str) -> Identity:
    """`NAME`, `UID`, `NAME:GROUP` or `UID:GID` -> an unprivileged identity (never uid or gid 0)."""
    user, _, group = spec.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    except KeyError:
        if not user.isdigit():
            raise PrivilegeError(f"--run-as {spec}: no user {user!r} on this machine") from None
        uid, gid, name = int(user), int(user), user  # a bare uid need not be in /etc/passwd
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"--run-as {spec}: no group {group!r} on this machine") from None
    if uid == 0 or gid == 0:
        raise PrivilegeError(f"--run-as {spec}: slots must not run as root; name an unprivileged user")
    return Identity(uid, gid, name)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def proc_is_masked(mountinfo: str = "/proc/self/mountinfo") -> bool:
    """True when something is mounted over a path below /proc (Docker's masked paths)."""
    try:
        with open(mountinfo, encoding="utf-8") as fh:
            return any(line.split()[4].startswith("/proc/") for line in fh if len(line.split()) > 4)
    except OSError:
        return False


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def private_mounts() -> None:
    """A mount namespace of this process's own, nothing in it propagating back to the host's."""
    libc = _libc()
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")


def mount_fresh_proc() -> None:
    """A procfs of this PID namespace on /proc, without a container's masks (see step 1)."""
    _check(_libc().mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None), "mount proc")


def _overmount(top: str, keep: list[str]) -> None:
    """Cover `top` with a small world-searchable tmpfs holding only `keep` (paths below it), bound
    from the original. The rest of `top` disappears from this mount namespace."""
    fd = os.open(top, os.O_PATH | os.O_DIRECTORY)
    try:
        _check(
            _libc().mount(b"tmpfs", top.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0755,size=1m"),
            f"mount tmpfs on {top}",
        )
        for path in keep:
            rel = os.path.relpath(path, top)
            target = os.path.join(top, rel)
            source = f"/proc/self/fd/{fd}/{rel}"
            if os.path.isdir(source):
                os.makedirs(target, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "a").close()
            _check(_libc().mount(source.encode(), target.encode(), None, _MS_BIND | _MS_REC, None), f"bind {path}")
    finally:
        os.close(fd)


def expose(paths: Sequence[str], who: Identity) -> None:
    """Make every path reachable by `who` in this (private) mount namespace: an ancestor it may not
    search (root's 0700 home holding pyenv or conda, a pool's 0700 work dir) is covered by
    `_overmount`, keeping only what is needed below it."""
    for _ in range(16):  # each round removes one blocked level
        blocked: dict[str, list[str]] = {}
        for path in paths:
            top = _unreachable_ancestor(path, who)
            if top is not None:
                blocked.setdefault(top, []).append(path)
        if not blocked:
            return
        for top, keep in sorted(blocked.items()):
            _overmount(top, keep)
    raise PrivilegeError(f"cannot make {', '.join(paths)} reachable for {who.describe()}")


def _chown_tree(top: str, who: Identity) -> None:
    os.lchown(top, who.uid, who.gid)
    for parent, dirs, files in os.walk(top):
        for name in dirs + files:
            os.lchown(os.path.join(parent, name), who.uid, who.gid)


def _unreachable_ancestor(path: str, who: Identity) -> str | None:
    """The highest directory above `path` that `who` may not search (x bit), if any."""
    current = os.path.dirname(os.path.realpath(path))
    found = None
    while True:
        st = os.stat(current)
        if st.st_uid == who.uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid == who.gid:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            found = current
        if current == "/":
            return found
        current = os.path.dirname(current)


def give_up_root(who: Identity, *, trees: Sequence[str], files: Sequence[str] = (), reach: Sequence[str] = ()) -> None:
    """Steps 1-3 of the module docstring: `trees` are handed over whole, `files` one by one, and
    `trees` and `reach` (the interpreter and package the slots' runner starts from) made reachable.
    Raises PrivilegeError if any step fails."""
    try:
        for path in trees:
            _chown_tree(path, who)
        for path in files:
            os.lchown(path, who.uid, who.gid)
    except OSError as exc:
        hint = (
            (
                " (root without capabilities, e.g. apptainer run as root where apptainer.conf grants root none: "
                "run apptainer as an unprivileged user)"
            )
            if exc.errno == errno.EPERM
            else ""
        )
        raise PrivilegeError(f"cannot hand {exc.filename} to {who.describe()}: {exc.strerror}{hint}") from None
    masked = proc_is_masked()
    hidden = [p for p in (*trees, *reach) if _unreachable_ancestor(p, who) is not None]
    if masked or hidden:
        try:
            private_mounts()
            if masked:
                mount_fresh_proc()
                log.info("mounted an unmasked /proc in the server's own mount namespace")
            expose(hidden, who)
        except OSError as exc:
            what = (
                "/proc is masked (a container's masked paths), so slots could not get their own /proc"
                if masked
                else f"{', '.join(hidden)} cannot be reached by {who.describe()}"
            )
            raise PrivilegeError(
                f"{what}, and the server could not fix that in a mount namespace of its own ({exc}). "
                'In a container, add --cap-add SYS_ADMIN (Nomad: cap_add = ["sys_admin"]); elsewhere pick '
                "paths that user can reach, or --run-as another user"
            ) from None
    parent, death_signal = os.getppid(), parent_death_signal()
    try:
        os.setgroups([])
        os.setresgid(who.gid, who.gid, who.gid)
        os.setresuid(who.uid, who.uid, who.uid)
    except OSError as exc:
        raise PrivilegeError(
            f"cannot switch to {who.describe()}: {exc.strerror} (root without "
            "CAP_SETUID/CAP_SETGID, e.g. apptainer as root with no capabilities: run "
            "it as an unprivileged user instead)"
        ) from None
    if os.getuid() == 0 or os.geteuid() == 0:
        raise PrivilegeError("still root after switching users")
    if not forbid_new_privileges():
        raise PrivilegeError("cannot set no_new_privs")
    # the kernel forgets a parent-death signal when the uid changes: a server that must die with
    # its pool (the local backend's) sets it again, and goes at once if the pool died meanwhile
    if death_signal:
        if not die_with_parent(death_signal):
            raise PrivilegeError("cannot set PR_SET_PDEATHSIG again after switching users")
        if os.getppid() != parent:
            os.kill(os.getpid(), death_signal)
