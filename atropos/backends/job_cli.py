"""`atropos-sandbox job render`: print what a backend submits for its servers, the Nomad job
(`--backend nomad`, the default) or the SLURM batch script (`--backend slurm`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pydantic import ValidationError

from atropos.backends.base import ServerSpec
from atropos.backends.slurm import SlurmBackend, SlurmBackendConfig
from atropos.drivers import DriverConfig, ProcessDriver, SingularityDriver
from atropos.errors import PoolConfigError
from atropos.nomad.cli import add_render_arguments, render_from_args, sif_refusal
from atropos.sandbox.settings import ServerSettings

_PROG = "atropos-sandbox job render"
# a setting -> the flag that gives it (an error names what the user typed)
_FLAG_OF = {
    "slots": "--slots", "cpus_per_server": "--cpus-per-server", "time_limit": "--time", "partition": "--partition",
    "memory_per_server": "--mem", "pool_dir": "--pool-dir", "job_name": "--slurm-job-name",
}  # fmt: skip


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    job = sub.add_parser(
        "job", help="the jobs backends submit for sandbox servers", description="The jobs backends submit."
    )
    actions = job.add_subparsers(dest="job_command", metavar="ACTION", required=True)
    render = actions.add_parser(
        "render",
        help="print the Nomad job (JSON or HCL2) or the SLURM batch script for a driver",
        description="Print what a backend submits. Nomad: JSON is the body of POST /v1/jobs (also `nomad job "
        "run -json FILE`), HCL2 a jobspec for `nomad job run FILE`. SLURM: the batch script of one server, "
        "its sbatch command line in its comments (--driver, --slots, --singularity-image, --apptainer, "
        "--isolation and --network apply to both).",
    )
    render.add_argument("--backend", choices=["nomad", "slurm"], default="nomad")
    add_render_arguments(render)
    slurm = render.add_argument_group("slurm (--backend slurm)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--time", dest="time_limit", metavar="TIME", help="sbatch --time, e.g. 4:00:00")
    slurm.add_argument("--cpus-per-server", type=int, help="sbatch --cpus-per-task")
    slurm.add_argument("--mem", dest="memory_per_server", metavar="MEM", help="sbatch --mem, e.g. 8G")
    slurm.add_argument("--slurm-constraint", metavar="FEATURES", help="sbatch --constraint")
    slurm.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG", help="extra sbatch option")
    slurm.add_argument("--pool-dir", help="the directory the pool and the nodes share (default as the pool's)")
    slurm.add_argument("--host", help="the address the server listens on (default: all)")
    slurm.add_argument("--slurm-job-name", default="atropos-sandbox", help="sbatch --job-name")
    render.set_defaults(handler=_render)


def _render(args: argparse.Namespace) -> int:
    if args.backend == "nomad":
        return render_from_args(args)
    try:
        sys.stdout.write(render_slurm(args))
    except (ValidationError, ValueError) as exc:
        errors: list[Any] = exc.errors() if isinstance(exc, ValidationError) else []
        text = "; ".join(f"{_FLAG_OF.get(str(e['loc'][-1]), e['loc'][-1])}: {e['msg']}" for e in errors) or str(exc)
        print(f"{_PROG}: error: {text}", file=sys.stderr)
        return 2
    return 0


def render_slurm(args: argparse.Namespace) -> str:
    """The batch script of server `slurm-1` in the pool dir; how to submit it by hand on stderr."""
    driver: DriverConfig
    if args.driver == "singularity":
        if not args.sif:
            raise PoolConfigError("--driver singularity needs --singularity-image (an absolute SIF path on the nodes)")
        refused = sif_refusal(args.sif)
        if refused:
            raise PoolConfigError(refused)
        driver = SingularityDriver(image=args.sif, apptainer_binary=args.apptainer)
    elif args.driver == "process":
        driver = ProcessDriver()
    else:
        raise PoolConfigError("--backend slurm runs drivers process and singularity (no Docker on SLURM nodes)")
    config = SlurmBackendConfig(
        partition=args.partition, account=args.account, qos=args.qos, time_limit=args.time_limit,
        cpus_per_server=args.cpus_per_server, memory_per_server=args.memory_per_server,
        constraint=args.slurm_constraint, sbatch_args=args.sbatch_arg, pool_dir=args.pool_dir, host=args.host,
        job_name=args.slurm_job_name,
    )  # fmt: skip
    settings = ServerSettings(slots=args.slots, isolation=args.isolation, network=args.network)
    backend = SlurmBackend(ServerSpec(driver=driver, settings=settings), config)
    directory = backend.pool_dir.parent / "slurm-1"
    batch = backend.batch_job(directory, owned=False)
    print(
        f"# to run it by hand: mkdir -p {directory / 'data'}; (umask 077; openssl rand -hex 32 > "
        f"{directory / 'token'}); save this script as {directory / 'job.sh'}; submit it with the sbatch command "
        f"in its comments; the server prints its address in {directory / 'server.out'}",
        file=sys.stderr,
    )
    return batch.script()
