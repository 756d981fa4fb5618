"""What a sandbox server container needs from Docker so that bubblewrap can isolate its slots.

One place for the `docker run` options (local backend) and the Nomad docker driver settings, so the
two cannot drift apart. Each option, what it opens, and why it is still safe:

- the container starts as root (`--user 0:0`) with every capability dropped but SYS_ADMIN, CHOWN,
  DAC_OVERRIDE, FOWNER, SETUID and SETGID. The server uses them once, at start-up: SYS_ADMIN to
  mount an unmasked /proc in a mount namespace of its own (the kernel refuses a slot a fresh /proc
  in a user namespace while Docker's masked /proc is the only one in sight), the others to hand
  the data dir to an unprivileged user and become that user (atropos/sandbox/privileges.py).
  Changing uid clears every capability before any slot starts; slots run without any, in their
  own user, PID, mount, IPC and UTS namespaces.
- seccomp: Docker's default profile refuses pivot_root and the namespace calls bubblewrap and the hub need, so the
  profile `seccomp-sandbox.json` beside this file is used instead. It allows everything but calls
  that reach kernel-wide state no sandbox needs (modules, kexec, clock, swap, keyring, eBPF, perf,
  file handles, userfaultfd, ...): a refusal list, where Docker's is an allow list. What the slots
  can do is still bounded by having no capabilities and an unprivileged uid.
- `apparmor=unconfined`: Docker's default AppArmor profile forbids mount(), which bubblewrap needs;
  on hosts without AppArmor it changes nothing.
- `/dev/net/tun`: network mode `public` runs the slots behind one pasta (the hub's), which needs a tun device. Without
  it the server falls back to `deny` and says so in /health.
"""

from __future__ import annotations

import json
import os
from importlib import resources

from atropos.sandbox.settings import TUN_DEVICE

SECCOMP_PROFILE_NAME = "seccomp-sandbox.json"
# the default path of the profile on Nomad docker clients (Nomad reads it from the client's disk)
NODE_SECCOMP_PROFILE = "/etc/atropos-sandbox/seccomp-sandbox.json"

CAPABILITIES = ("SYS_ADMIN", "CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID")


def seccomp_profile_path() -> str:
    """The profile shipped with this package, as a file `docker run --security-opt` can read."""
    return str(resources.files("atropos.images").joinpath(SECCOMP_PROFILE_NAME))


def seccomp_profile_text() -> str:
    """The profile, compact (for printing it onto a node)."""
    with open(seccomp_profile_path(), encoding="utf-8") as fh:
        return json.dumps(json.load(fh), indent=2) + "\n"


def volume(path: str, writable: bool) -> str:
    """A declared bind (`ServerSettings.mounts`) as a Docker volume at the same path."""
    return f"{path}:{path}" if writable else f"{path}:{path}:ro"


def docker_run_options(*, tun: bool | None = None) -> list[str]:
    """`docker run` options for a sandbox server container (see the module docstring)."""
    options = ["--user", "0:0", "--cap-drop", "ALL"]
    for cap in CAPABILITIES:
        options += ["--cap-add", cap]
    options += ["--security-opt", f"seccomp={seccomp_profile_path()}", "--security-opt", "apparmor=unconfined"]
    if os.path.exists(TUN_DEVICE) if tun is None else tun:
        options += ["--device", TUN_DEVICE]
    return options


def nomad_docker_config(seccomp_profile: str = NODE_SECCOMP_PROFILE) -> dict[str, object]:
    """The Nomad docker driver's task config for the same container. The client must list
    `sys_admin` in `allow_caps` (nomad/nomad-docker.hcl) and hold the profile at `seccomp_profile`."""
    return {
        "cap_drop": ["all"],
        "cap_add": [cap.lower() for cap in CAPABILITIES],
        "security_opt": [f"seccomp={seccomp_profile}", "apparmor=unconfined"],
        "devices": [{"host_path": TUN_DEVICE, "container_path": TUN_DEVICE}],
    }
