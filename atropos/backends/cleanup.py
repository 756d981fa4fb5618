"""`atropos-sandbox cleanup`: remove what pools whose process died left behind.

`--local`: servers started by the local backend (processes, docker containers, data dirs), found
through their records (see `reaping`). `--nomad`: sandbox jobs whose owner process on this
host is gone. Pools of live processes, and jobs owned by other hosts, are never touched. A new pool
does the same when it starts; this command is for when no new pool will.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from atropos.backends.reaping import reap_dead_owners

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "cleanup",
        help="remove servers and Nomad jobs left by pools whose process died",
        description="Remove the local servers, Nomad jobs and SLURM jobs of pools whose owner process "
        "died without stopping them: each of --local, --nomad and --slurm given (any together). "
        "Without any: local, and Nomad too when NOMAD_ADDR is set.",
    )
    p.add_argument("--local", action="store_true", help="local-backend servers of dead pools")
    p.add_argument("--nomad", action="store_true", help="sandbox jobs of dead pools on this host")
    p.add_argument("--slurm", action="store_true", help="this user's SLURM jobs of dead pools on this host")
    p.add_argument("--slurm-job-name", default="atropos-sandbox", help="the pools' job name (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    p.add_argument("--prefix", default="", help="only Nomad jobs whose id starts with this")
    p.add_argument("--nomad-address", help="default $NOMAD_ADDR (token, namespace... from NOMAD_*)")
    p.add_argument("--keep-jobs", action="store_true", help="stop dead pools' Nomad jobs without purging them")
    p.set_defaults(handler=cleanup_from_args)


def cleanup_from_args(args: argparse.Namespace) -> int:
    """Each backend named (`--local`, `--nomad`, `--slurm`, any together); none named: local, and
    Nomad where an address is set. A backend that fails does not stop the others."""
    local, nomad, slurm = args.local, args.nomad, args.slurm
    if not (local or nomad or slurm):
        local, nomad = True, bool(args.nomad_address or os.environ.get("NOMAD_ADDR"))
    verb, done = ("would remove", "would be removed") if args.dry_run else ("removed", "removed")
    statuses = [0]
    if local:
        reaped = reap_dead_owners(dry_run=args.dry_run)
        for item in reaped:
            print(f"local: {verb} {item.describe()}")
        print(f"local: {len(reaped)} server(s) of dead pools {done}")
    if nomad:
        statuses.append(asyncio.run(_cleanup_nomad(args, verb, done)))
    if slurm:
        statuses.append(asyncio.run(_cleanup_slurm(args)))
    return max(statuses)


async def _cleanup_slurm(args: argparse.Namespace) -> int:
    from atropos.errors import BackendError
    from atropos.slurm import cancel_dead_owner_jobs

    try:
        jobs = await cancel_dead_owner_jobs(args.slurm_job_name, dry_run=args.dry_run)
    except BackendError as exc:
        print(f"atropos-sandbox cleanup: error: slurm: {exc}", file=sys.stderr)
        return 1
    for job in jobs:
        print(f"slurm: {'would cancel' if args.dry_run else 'cancelled'} job {job}")
    print(f"slurm: {len(jobs)} job(s) of dead pools {'would be cancelled' if args.dry_run else 'cancelled'}")
    return 0


async def _cleanup_nomad(args: argparse.Namespace, verb: str, done: str) -> int:
    from atropos.nomad.client import NomadClient
    from atropos.nomad.errors import NomadConnectionError, NomadError
    from atropos.nomad.lifecycle import find_dead_owner_jobs, stop_sandbox_job
    from atropos.nomad.settings import NomadSettings

    settings = NomadSettings.from_env(address=args.nomad_address)
    async with NomadClient(settings.model_copy(update={"attempts": 1})) as probe:
        try:  # one look first: an agent that is not there is one line, not four rounds of retries
            await probe.agent_health()
        except NomadConnectionError:
            if args.nomad_address:
                source = "--nomad-address"
            elif os.environ.get("NOMAD_ADDR"):
                source = "NOMAD_ADDR"
            else:
                source = "the default; set NOMAD_ADDR or --nomad-address"
            print(f"atropos-sandbox cleanup: error: no Nomad agent answers at {settings.base_url} ({source})",
                  file=sys.stderr)  # fmt: skip
            return 1
        except NomadError:
            pass  # it answers: the calls below say what is wrong
    async with NomadClient(settings) as client:
        try:
            jobs = await find_dead_owner_jobs(client, args.prefix)
            removed = []
            for job in jobs:
                if args.dry_run or await stop_sandbox_job(client, job.id, purge=not args.keep_jobs):
                    removed.append(job.id)
                    print(f"nomad: {verb} job {job.id} (status {job.status})")
        except NomadError as exc:
            print(f"atropos-sandbox cleanup: error: nomad at {settings.base_url}: {exc}", file=sys.stderr)
            return 1
    print(f"nomad: {len(removed)} job(s) of dead pools {done}")
    return 0
