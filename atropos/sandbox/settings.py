"""The sandbox server's contract with whoever starts it (the local backend, Nomad jobs, images, tests).

`ServerSettings` is every `atropos-sandbox server` option: `to_args()` renders the command line a
launcher runs, `from_args()` / `from_namespace()` read it back in the server, and both share the
option table below, so a launcher and the server cannot disagree on a flag. The token never goes
on a command line: it comes from `--token-file` or `$ATROPOS_SANDBOX_TOKEN`.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from atropos.pulls import PULL_POLICIES, PullPolicy
from atropos.sandbox.limits import LIMIT_FLAGS, SlotLimits
from atropos.sandbox.rootfs import ROOT_ENV, ROOT_POLICIES, Bind, RootError, RootPolicy
from atropos.sandbox.runner_choice import RUNNER_BIN_ENV, RUNNER_OPTIONS, RunnerOption
from atropos.units import format_size, parse_size

TOKEN_ENV = "ATROPOS_SANDBOX_TOKEN"
RUN_AS_ENV = "ATROPOS_SANDBOX_RUN_AS"  # the default of --run-as where set (the Docker image: sandbox)
DEFAULT_RUN_AS = "nobody"
DEFAULT_PORT = 8080
DEFAULT_WARM = 32  # warm slots of a server when not set: enough for a burst, bounded in memory
DEFAULT_HIBERNATE_AFTER = 30.0  # an RL turn's model call is shorter: slots between turns stay awake
READY_PREFIX = "ATROPOS_SANDBOX_READY"  # the line the server prints once it listens: `<prefix> <url>`
TUN_DEVICE = "/dev/net/tun"  # network `public` needs it inside the container (the hub's pasta opens it)

Isolation = Literal["auto", "bwrap", "none"]
Network = Literal["auto", "public", "allow", "deny"]

_SHELL_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}\Z")


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int | str = Field(
        default=DEFAULT_PORT,
        description="0 picks a free one; a launcher may write a "
        "shell reference such as ${NOMAD_PORT_http} that its shell fills in",
    )
    slots: int = Field(default=4, ge=1, le=4096)
    data_dir: str = "./sandbox-data"
    token_file: str | None = None
    isolation: Isolation = "auto"
    runner: RunnerOption = Field(
        default="auto",
        description="the slots' runner: compiled (the static binary the package's build makes), python, or "
        "auto: compiled where its binary is found, else python",
    )
    network: Network = "auto"
    root: RootPolicy = Field(
        default_factory=lambda: os.environ.get(ROOT_ENV) or "system",
        validate_default=True,
        description="what a slot's root holds: system (the node's system dirs only), image (the "
        "container's root minus what its runtime mounted), host (the node's whole root, by name only)",
    )
    bind_ro: tuple[str, ...] = Field(default=(), description="SRC[:DST] shown read-only in every slot")
    bind: tuple[str, ...] = Field(default=(), description="SRC[:DST] shown writable in every slot (shared by all)")
    image_cache_gb: float = Field(default=20.0, gt=0, description="size the image cache is trimmed to")
    image_cache: str | None = Field(
        default=None,
        description="where task images are unpacked for image slots (shared by the servers on a node that "
        "name the same dir); None: DATA_DIR/images",
    )
    image_pull: PullPolicy = Field(default="missing", description="when a registry's task image (docker://) is pulled")
    run_as: str = Field(
        default_factory=lambda: os.environ.get(RUN_AS_ENV) or DEFAULT_RUN_AS,
        description="the user a server started as root becomes",
    )
    timeout: float = Field(default=120.0, gt=0, description="default per-call timeout, seconds")
    max_output: int = Field(default=1 << 20, ge=1024, description="bytes kept per stream per call")
    max_file_bytes: int = Field(default=16 << 20, ge=1, description="read_file/write_file size limit")
    max_body: int = Field(default=64 << 20, ge=1024, description="request body limit, bytes")
    max_upload: int = Field(
        default=4 << 30, ge=1024, description="bytes one upload may unpack (a workspace limit also bounds it)"
    )
    max_snapshots: int = Field(default=16, ge=0, le=1024, description="snapshots one server holds at once")
    limits: SlotLimits = Field(default_factory=SlotLimits)
    warm_slots: int | None = Field(
        default=None,
        ge=0,
        description=f"slots kept started ahead of their first call; None: up to {DEFAULT_WARM} (each holds a "
        "runner's memory: a server of a thousand slots does not spend it all at start)",
    )
    hibernate_after: float = Field(
        default=DEFAULT_HIBERNATE_AFTER,
        ge=0,
        description="seconds a used slot that runs nothing but its idle session shell waits before its runner "
        "sleeps (its next call wakes it); 0: never",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("port")
    @classmethod
    def _port(cls, value: int | str) -> int | str:
        if isinstance(value, str):
            if not _SHELL_REFERENCE.match(value):
                raise ValueError(f"{value!r} is neither a port number nor a shell reference like ${{NOMAD_PORT_http}}")
        elif not 0 <= value <= 65535:
            raise ValueError(f"{value} is not a port (0-65535)")
        return value

    @field_validator("bind_ro", "bind")
    @classmethod
    def _binds(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        for text in value:
            try:
                Bind.parse(text, writable=info.field_name == "bind")
            except RootError as exc:
                raise ValueError(str(exc)) from None
        return value

    @property
    def user_binds(self) -> tuple[Bind, ...]:
        """`--bind-ro` and `--bind`, parsed."""
        return tuple(Bind.parse(t, writable=False) for t in self.bind_ro) + tuple(
            Bind.parse(t, writable=True) for t in self.bind
        )

    @property
    def mounts(self) -> list[tuple[str, bool]]:
        """Each declared bind's source and whether it is writable: what a container launcher mounts at
        the same path, so that the server inside finds it where the user named it."""
        return [(b.source, b.writable) for b in self.user_binds]

    @property
    def image_cache_dir(self) -> str:
        return os.path.abspath(self.image_cache or os.path.join(self.data_dir, "images"))

    @property
    def warm_target(self) -> int:
        """How many slots the server keeps warm."""
        return min(self.slots, DEFAULT_WARM) if self.warm_slots is None else self.warm_slots

    def placed(self, *, host: str, port: int | str, data_dir: str, token_file: str | None = None) -> ServerSettings:
        """These settings for a server listening on `host:port` with its data in `data_dir`: where a
        server listens and keeps its data is its launcher's choice, the rest the pool's."""
        placed: dict[str, object] = {"host": host, "port": port, "data_dir": data_dir}
        if token_file is not None:
            placed["token_file"] = token_file
        return type(self).model_validate({**self.model_dump(exclude_unset=True), **placed})

    def to_args(self) -> list[str]:
        """The server's options: where it listens and keeps its data always, everything else only
        where it was set (so an image built before an option existed still starts)."""
        args = ["--host", self.host, "--port", str(self.port), "--data-dir", self.data_dir]
        for option in _OPTIONS:
            if option.field in self.model_fields_set and option.field not in ("host", "port", "data_dir"):
                value = getattr(self, option.field)
                if option.repeat:
                    args += [word for item in value for word in (option.flag, str(item))]
                elif value is not None:
                    args += [option.flag, str(value)]
        return args + self.limits.server_args()

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> ServerSettings:
        """From what `add_arguments` parsed: only the options given, the rest take their defaults."""
        given: dict[str, Any] = {
            o.field: tuple(getattr(args, o.field)) if o.repeat else getattr(args, o.field)
            for o in _OPTIONS
            if hasattr(args, o.field)
        }
        limits = {
            field: getattr(args, f"limit_{field}") for _, field, _, _ in LIMIT_FLAGS if hasattr(args, f"limit_{field}")
        }
        return cls(**given, limits=SlotLimits(**limits))

    @classmethod
    def from_args(cls, argv: Sequence[str]) -> ServerSettings:
        parser = argparse.ArgumentParser(prog="atropos-sandbox server")
        add_arguments(parser)
        return cls.from_namespace(parser.parse_args(list(argv)))


class _Option:
    def __init__(
        self,
        flag: str,
        help: str,
        *,
        type: Callable[[str], Any] = str,
        choices: Sequence[str] | None = None,
        repeat: bool = False,
    ) -> None:
        self.flag, self.help, self.type, self.choices, self.repeat = flag, help, type, choices, repeat
        self.field = flag[2:].replace("-", "_")


def _port(text: str) -> int | str:
    return text if text.startswith("${") else int(text)


_OPTIONS: tuple[_Option, ...] = (
    _Option("--host", "address to listen on"),
    _Option("--port", "port; 0 picks a free one", type=_port),
    _Option("--slots", "number of slots", type=int),
    _Option("--data-dir", "slots live in DATA_DIR/slots/<n>"),
    _Option("--token-file", f"file holding the bearer token (or set {TOKEN_ENV})"),
    _Option(
        "--isolation",
        "bwrap: refuse to start without bubblewrap; auto: fall back to plain processes when it cannot work here",
        choices=["auto", "bwrap", "none"],
    ),
    _Option(
        "--runner",
        "the program in every slot that runs its calls: compiled: the static binary the package's build "
        f"makes (atropos-runner, next to this command; ${RUNNER_BIN_ENV} names another), refuse to start "
        "without it; python: the Python runner; auto: compiled where its binary is found, else python",
        choices=list(RUNNER_OPTIONS),
    ),
    _Option(
        "--network",
        "public: each slot has its own network namespace reaching public addresses only "
        "(needs pasta); deny: no network; allow: the node's network, its loopback and private services "
        "included; auto: public where it works, else deny",
        choices=["auto", "public", "allow", "deny"],
    ),
    _Option(
        "--root",
        "what a slot's root file system holds besides its workspace, /tmp, /dev and /proc: system: the "
        "node's /usr, /bin, /sbin, /lib*, /sys and a curated /etc, nothing else; image: the container's "
        "root minus every mount its runtime added and the server's own files; host: the node's whole root "
        f"read-only minus the server's own files (slots read every world-readable file) (default: ${ROOT_ENV}, "
        "else system)",
        choices=list(ROOT_POLICIES),
    ),
    _Option(
        "--bind-ro",
        "SRC[:DST]: show SRC read-only at DST (default SRC) in every slot; repeat for more",
        repeat=True,
    ),
    _Option(
        "--bind",
        "SRC[:DST]: show SRC writable at DST in every slot (every slot shares it); repeat for more",
        repeat=True,
    ),
    _Option(
        "--image-cache",
        "directory of unpacked task images for slots in their task's own image; servers of one node "
        "that name the same one unpack an image once (default: DATA_DIR/images)",
    ),
    _Option(
        "--image-cache-gb",
        "size of the image cache: past it, the least recently used images no slot uses are removed",
        type=float,
    ),
    _Option(
        "--image-pull",
        "a registry's task image (docker://NAME:TAG, pulled by skopeo): missing pulls it where this node "
        "lacks it, always asks the registry each time (pulling what changed), never takes only what is here",
        choices=list(PULL_POLICIES),
    ),
    _Option(
        "--run-as",
        "started as root, the server becomes this unprivileged user (NAME, UID, NAME:GROUP or "
        f"UID:GID) before any slot starts (default: ${RUN_AS_ENV}, else {DEFAULT_RUN_AS})",
    ),
    _Option("--timeout", "default per-call timeout in seconds", type=float),
    _Option("--max-output", "bytes of stdout and of stderr kept per call", type=int),
    _Option("--max-file-bytes", "size limit of read_file/write_file", type=int),
    _Option("--max-body", "request body limit in bytes (JSON calls; uploads stream, see --max-upload)", type=int),
    _Option("--max-upload", "bytes of file content one POST /upload may unpack", type=int),
    _Option("--max-snapshots", "workspace snapshots this server holds at once (POST /snapshot)", type=int),
    _Option("--log-level", "log level", choices=["DEBUG", "INFO", "WARNING", "ERROR"]),
    _Option(
        "--warm-slots",
        "slots whose sandbox is started before their first call, and kept so as they are used; 0: "
        f"each slot starts on its first call (default: up to {DEFAULT_WARM})",
        type=int,
    ),
    _Option(
        "--hibernate-after",
        "seconds after its last call before a slot that runs nothing but its idle session shell gives back "
        "its runner's memory; its next call wakes it (tens of ms); 0: never",
        type=float,
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every server option; an option not given is absent from the parsed namespace (its default
    then comes from `ServerSettings`, and `to_args` of the result leaves it out again)."""
    defaults = ServerSettings()
    for option in _OPTIONS:
        default = getattr(defaults, option.field)
        quiet = ("run_as", "token_file", "warm_slots", "root", "bind_ro", "bind", "image_cache")
        shown = "" if option.field in quiet else f" (default {default})"
        parser.add_argument(
            option.flag,
            dest=option.field,
            type=option.type,
            choices=option.choices,
            default=argparse.SUPPRESS,
            action="append" if option.repeat else "store",
            help=option.help + shown,
        )
    group = parser.add_argument_group("limits per slot", "sizes take K, M, G suffixes; 'none' turns a limit off")
    for flag, field, parse, text in LIMIT_FLAGS:
        value = getattr(defaults.limits, field)
        shown = format_size(value) if parse is parse_size and value else value
        group.add_argument(
            flag, dest=f"limit_{field}", type=_limit(parse), default=argparse.SUPPRESS, help=f"{text} (default {shown})"
        )


def _limit(parse: Callable[[str], int]) -> Callable[[str], int | None]:
    def convert(text: str) -> int | None:
        if text.strip().lower() in ("none", "off", "unlimited"):
            return None
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def problem_of(error: Mapping[str, Any]) -> str:
    """One pydantic error in its validator's own words (without pydantic's "Value error, ")."""
    return str(error.get("ctx", {}).get("error", error["msg"]))


def flag_of(loc: tuple[int | str, ...]) -> str:
    """The server option a validation error's location names (`("limits", "memory")` -> `--limit-memory`)."""
    limit_flags = {field: flag for flag, field, _, _ in LIMIT_FLAGS}
    if loc and loc[-1] in limit_flags and (len(loc) == 1 or loc[0] == "limits"):
        return limit_flags[str(loc[-1])]
    return "--" + "-".join(str(p) for p in loc).replace("_", "-")
