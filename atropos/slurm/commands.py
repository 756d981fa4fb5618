"""SLURM's commands, each run as a subprocess of the event loop: nothing blocks it."""

from __future__ import annotations

import asyncio
import json
import shlex
from typing import NamedTuple

from atropos.errors import BackendError
from atropos.host import owner_state


async def run(*argv: str, timeout: float = 60.0) -> str:
    """One SLURM command's stdout; BackendError with its stderr when it fails."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except FileNotFoundError:
        raise BackendError(f"backend slurm needs `{argv[0]}` on PATH (the SLURM client commands)") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise BackendError(f"{argv[0]} did not answer within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise BackendError(f"{shlex.join(argv)}: {err.decode(errors='replace').strip() or proc.returncode}")
    return out.decode(errors="replace")


class QueuedJob(NamedTuple):
    state: str
    reason: str
    node: str
    name: str
    time_left: str
    comment: str


def seconds_of(duration: str) -> float | None:
    """SLURM's `[days-][[hours:]minutes:]seconds` (squeue's %L) in seconds; None for no limit
    (UNLIMITED, NOT_SET, INVALID) or anything else."""
    days, _, clock = duration.strip().rpartition("-")
    parts = clock.split(":")
    if not all(p.isdigit() for p in parts) or len(parts) > 3 or (days and not days.isdigit()):
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return float(seconds + int(days or 0) * 86400)


async def queue(job_ids: list[str] | None = None) -> dict[str, QueuedJob]:
    """Jobs in the queue (these, or all of this user's), by id. The comment comes last: it is free text."""
    argv = ["squeue", "-h", "-o", "%i|%T|%r|%N|%j|%L|%k"]
    argv += ["-j", ",".join(job_ids)] if job_ids else ["--me"]
    try:
        text = await run(*argv)
    except BackendError as exc:
        if job_ids and "Invalid job id" in str(exc):  # all of them are gone
            return {}
        raise
    jobs = {}
    for line in text.splitlines():
        parts = line.split("|", 6)
        if len(parts) == 7:
            jobs[parts[0]] = QueuedJob(*parts[1:])
    return jobs


async def cancel_dead_owner_jobs(job_name: str, *, dry_run: bool = False) -> list[str]:
    """This user's jobs named `job_name` whose owner process (on this host) is dead: cancelled."""
    stale = []
    for job_id, job in (await queue()).items():
        try:
            meta = json.loads(job.comment)
        except ValueError:
            continue
        if job.name == job_name and isinstance(meta, dict) and owner_state(meta) == "dead":
            stale.append(job_id)
    if stale and not dry_run:
        await run("scancel", *stale)
    return stale
