"""The one place that builds an `apptainer exec` command line for the sandbox server.

Both the local backend's `singularity` driver (a child process) and the Nomad `singularity` job
(`raw_exec` running `/bin/sh -c "exec apptainer exec ..."`) call `build_apptainer_exec_argv`, so
the flags the two use cannot drift apart.

Flags, chosen for rootless HPC nodes:

- no `--net` / `--network-args`: those need root-only CNI; Apptainer shares the host network by
  default, so the server simply binds the port it was given;
- `--containall` (`--contain --cleanenv --ipc --pid`): no host `$HOME`, `/tmp` or environment leaks
  in, and stopping the `apptainer` process ends every process inside (the PID namespace's shim init
  forwards the signal and reaps children). `containall=False` falls back to `--contain --cleanenv`
  for sites where a PID namespace is not allowed;
- `--workdir DIR` (optional): with `--contain`, `/tmp`, `/var/tmp` and `$HOME` are private to the
  container and, without a workdir, live in Apptainer's small session tmpfs; a workdir on the host
  gives them real disk space;
- `--bind SRC:DST` for the writable data dir (`/data` inside the image);
- `--bind /dev/full`: `--contain` gives the container a minimal `/dev` without `/dev/full`, and
  bubblewrap's `--dev` (the slots' sandbox) refuses to start when that node is missing;
- `--bind /dev/net/tun` (`tun=True`): the same minimal `/dev` has no tun device, which network mode
  `public` (the hub's pasta, one network namespace per slot) needs; without it the server falls back to `deny`;
- `--env KEY=VALUE` for plain settings.

Secrets (the server token) must never be on the command line, where `ps` shows them to every user of
the node. Pass them in the *environment of the apptainer process* instead: `apptainer_secret_env`
turns `{"ATROPOS_SANDBOX_TOKEN": t}` into `{"APPTAINERENV_ATROPOS_SANDBOX_TOKEN": t}` (or the
`SINGULARITYENV_` prefix for a `singularity` binary). Apptainer injects such variables into the
container even under `--cleanenv`, and `/proc/PID/environ` is readable only by the same user.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from atropos.sandbox.settings import TUN_DEVICE

__all__ = [
    "CONTAINER_DATA_DIR",
    "SERVER_COMMAND",
    "apptainer_secret_env",
    "build_apptainer_exec_argv",
    "exec_shell_command",
    "runtime_env_prefix",
    "shell_quote_argv",
]

CONTAINER_DATA_DIR = "/data"
SERVER_COMMAND: tuple[str, ...] = ("atropos-sandbox", "server")

_NO_ENV: Mapping[str, str] = MappingProxyType({})
_DEV_FULL = "/dev/full"  # absent from the minimal /dev of --contain; bubblewrap's --dev needs it
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# `--env` is parsed as a comma-separated KEY=VALUE list by apptainer; these characters would be
# split or mangled on the way in, so such values must travel through the process environment.
_ENV_VALUE_FORBIDDEN = (",", '"', "\n", "\0")
_BIND_FORBIDDEN = (":", ",", "\n", "\0")


def build_apptainer_exec_argv(
    binary: str,
    sif: str,
    *,
    binds: Sequence[tuple[str, str]] = (),
    env: Mapping[str, str] = _NO_ENV,
    extra_args: Sequence[str] = (),
    server_args: Sequence[str],
    workdir: str | None = None,
    containall: bool = True,
    tun: bool = False,
    command: Sequence[str] = SERVER_COMMAND,
    mounts: Sequence[tuple[str, bool]] = (),
) -> list[str]:
    """Return `[binary, "exec", <flags>, sif, *command, *server_args]`.

    `binds` are `(host_path, container_path)` pairs; the host side may hold shell references such as
    `${NOMAD_ALLOC_DIR}/data` when the result goes through `shell_quote_argv`. `env` holds plain,
    non-secret settings (they appear in the command line); put secrets in the process environment
    with `apptainer_secret_env`. `extra_args` are passed through before the image (e.g. `--nv`).
    `server_args` are the options after `atropos-sandbox server` (`ServerSettings.to_args()`).
    `mounts` (`ServerSettings.mounts`) are host paths bound at the same path, read-only unless writable.
    """
    if not binary:
        raise ValueError("apptainer binary must not be empty")
    if not sif or sif.startswith("-"):
        raise ValueError(f"invalid image path {sif!r}")
    argv = [binary, "exec"]
    argv += ["--containall"] if containall else ["--contain", "--cleanenv"]
    if workdir is not None:
        argv += ["--workdir", _checked_path(workdir, "workdir")]
    for host, container in binds:
        argv += ["--bind", _bind_spec(host, container)]
    for path, writable in mounts:  # the slots' declared binds (--bind-ro, --bind), at the same path
        argv += ["--bind", _bind_spec(path, path) + ("" if writable else ":ro")]
    argv += ["--bind", _DEV_FULL]
    if tun:
        argv += ["--bind", TUN_DEVICE]
    for name, value in env.items():
        argv += ["--env", _env_spec(name, value)]
    argv += list(extra_args)
    argv.append(sif)
    argv += list(command)
    argv += list(server_args)
    return argv


def runtime_env_prefix(binary: str) -> str:
    """`APPTAINERENV_` for apptainer, `SINGULARITYENV_` for a binary named singularity."""
    name = os.path.basename(binary).lower()
    return "SINGULARITYENV_" if name.startswith("singularity") else "APPTAINERENV_"


def apptainer_secret_env(binary: str, secrets: Mapping[str, str]) -> dict[str, str]:
    """Variables to add to the apptainer *process* environment so `secrets` reach the container.

    Use it for the server token: `apptainer_secret_env(binary, {TOKEN_ENV: token})`. The values never
    appear in the command line.
    """
    prefix = runtime_env_prefix(binary)
    out: dict[str, str] = {}
    for name, value in secrets.items():
        _check_env_name(name)
        if "\0" in value:
            raise ValueError(f"environment value of {name} contains a NUL byte")
        out[prefix + name] = value
    return out


_REFERENCE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
_SAFE_WORD = re.compile(r"[A-Za-z0-9_@%+:,./-]+\Z")  # no "=": a first word must not read as an assignment


def shell_quote_argv(argv: Sequence[str], *, expand: Sequence[str] = ("NOMAD_",)) -> str:
    """Join `argv` into one POSIX shell string.

    Every character is literal except references `$NAME` / `${NAME}` whose NAME starts with one of
    the `expand` prefixes (default: Nomad's `NOMAD_*` variables): those words are double-quoted so
    the shell expands the reference and nothing else. Example:
    `--bind "${NOMAD_ALLOC_DIR}/data:/data"`.
    """
    return " ".join(_quote_word(word, tuple(expand)) for word in argv)


def exec_shell_command(argv: Sequence[str], *, expand: Sequence[str] = ("NOMAD_",)) -> str:
    """`exec <argv>` for `/bin/sh -c`, so the shell is replaced by apptainer (signals reach it)."""
    return "exec " + shell_quote_argv(argv, expand=expand)


def _quote_word(word: str, expand: tuple[str, ...]) -> str:
    if word and _SAFE_WORD.match(word):
        return word
    pieces: list[str] = []
    found = False
    pos = 0
    for match in _REFERENCE.finditer(word):
        name = match.group("braced") or match.group("bare")
        if not name.startswith(expand):
            continue
        pieces.append(_double_quote_literal(word[pos : match.start()]))
        pieces.append("${" + name + "}")
        pos = match.end()
        found = True
    if not found:
        return shlex.quote(word)
    pieces.append(_double_quote_literal(word[pos:]))
    return '"' + "".join(pieces) + '"'


def _double_quote_literal(text: str) -> str:
    """Escape `text` for the inside of a double-quoted shell word."""
    return re.sub(r'([\\"$`])', r"\\\1", text)


def _check_env_name(name: str) -> None:
    if not _ENV_NAME.match(name):
        raise ValueError(f"invalid environment variable name {name!r}")


def _env_spec(name: str, value: str) -> str:
    _check_env_name(name)
    for bad in _ENV_VALUE_FORBIDDEN:
        if bad in value:
            raise ValueError(
                f"value of {name} contains {bad!r}, which apptainer --env cannot carry; "
                "pass it through the process environment with apptainer_secret_env()"
            )
    return f"{name}={value}"


def _checked_path(path: str, what: str) -> str:
    if not path:
        raise ValueError(f"{what} must not be empty")
    for bad in _BIND_FORBIDDEN:
        if bad in path:
            raise ValueError(f"{what} {path!r} contains {bad!r}, which apptainer cannot bind")
    return path


def _bind_spec(host: str, container: str) -> str:
    _checked_path(host, "bind source")
    _checked_path(container, "bind target")
    if not container.startswith("/"):
        raise ValueError(f"bind target {container!r} must be an absolute path inside the container")
    return f"{host}:{container}"
