"""Configured resource limits of a slot (`SlotLimits`): server options, pool and job settings."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, Field

from atropos.units import GiB, MiB, parse_size

# server option, SlotLimits field, how the option's text is read, help
LIMIT_FLAGS: tuple[tuple[str, str, Callable[[str], int], str], ...] = (
    ("--limit-memory", "memory", parse_size, "memory per process, per slot where cgroups work"),
    ("--limit-processes", "processes", int, "processes in a slot"),
    ("--limit-cpu", "cpu_seconds", int, "CPU seconds per process"),
    ("--limit-file-size", "file_size", parse_size, "largest file a command may write"),
    ("--limit-workspace", "workspace", parse_size, "bytes in a slot's workspace"),
    ("--limit-tmp", "tmp", parse_size, "size of a slot's private /tmp, held in RAM"),
)


class SlotLimits(BaseModel):
    """Per-slot limits; None turns one off. Defaults fit a coding agent on a shared node."""

    memory: int | None = Field(
        default=2 * GiB, ge=64 * MiB, description="bytes of memory per process (per slot with cgroups)"
    )
    processes: int | None = Field(default=256, ge=8, description="processes and threads in a slot")
    cpu_seconds: int | None = Field(default=600, ge=1, description="CPU seconds per process")
    file_size: int | None = Field(default=1 * GiB, ge=1 * MiB, description="largest file a command may write")
    workspace: int | None = Field(default=4 * GiB, ge=1 * MiB, description="bytes in a slot's workspace")
    tmp: int | None = Field(default=1 * GiB, ge=1 * MiB, description="size of a slot's private /tmp (in RAM)")

    def runner_args(self, *, nproc_rlimit: bool) -> tuple[str, ...]:
        """Options telling the runner what to enforce itself.

        `nproc_rlimit`: the slot has its own user namespace and is not root, so RLIMIT_NPROC counts
        the slot's processes alone (elsewhere it would count all of the user's processes).
        """
        values = {
            "--limit-memory": self.memory,
            "--limit-file-size": self.file_size,
            "--limit-cpu": self.cpu_seconds,
            "--limit-workspace": self.workspace,
            "--limit-processes": self.processes,
        }
        args = [part for flag, value in values.items() if value is not None for part in (flag, str(value))]
        if self.processes is not None and nproc_rlimit:
            args.append("--nproc-rlimit")
        return tuple(args)

    def server_args(self) -> list[str]:
        """The `atropos-sandbox server` options for the limits that differ from the defaults ('none' for
        one turned off). Defaults are left out, so a pool still starts servers of images built before
        these options existed; asking such an image for other limits fails with its usage error."""
        changed = self.model_dump(exclude_defaults=True)
        args: list[str] = []
        for flag, name, _, _ in LIMIT_FLAGS:
            if name in changed:
                value = changed[name]
                args += [flag, "none" if value is None else str(value)]
        return args
