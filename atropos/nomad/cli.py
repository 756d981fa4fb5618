"""`atropos-sandbox job render --backend nomad` (`atropos/backends/job_cli.py` registers it): print
the Nomad job for a driver, as JSON or HCL2."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import sys
from typing import Any

from pydantic import ValidationError

from atropos.nomad.builder import create_sandbox_job
from atropos.nomad.hcl import render_job_hcl
from atropos.nomad.models import Constraint
from atropos.nomad.spec import DEFAULT_BASE_PORT, SandboxJobSpec

__all__ = ["add_render_arguments", "render_from_args", "sif_refusal", "spec_from_args"]


def add_render_arguments(p: argparse.ArgumentParser) -> None:
    """The Nomad job's flags (`--driver` and the image flags are shared with SLURM's)."""
    p.add_argument("--driver", choices=["docker", "singularity", "process"], required=True)
    p.add_argument("--format", choices=["json", "hcl"], default="hcl")
    p.add_argument("--job-id", default="atropos-sandbox")
    p.add_argument("--count", type=int, default=1, help="containers (allocations)")
    p.add_argument("--slots", type=int, default=8, help="slots per container")
    p.add_argument(
        "--task-user",
        default="nobody",
        help="raw_exec: the user a task started as root becomes (default nobody; 'none': the agent's user)",
    )
    p.add_argument("--image", default="atropos-sandbox:latest", help="docker image")
    p.add_argument(
        "--singularity-image",
        "--sif",
        dest="sif",
        metavar="SIF",
        help="SIF image path on the nodes (driver singularity)",
    )
    p.add_argument("--apptainer", default="apptainer", help="apptainer (or singularity) binary on the nodes")
    p.add_argument(
        "--apptainer-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra apptainer exec flag (repeatable), e.g. --apptainer-arg=--nv",
    )
    p.add_argument("--apptainer-cache-dir", help="APPTAINER_CACHEDIR of the task")
    p.add_argument("--server-command", help="the server command, default 'atropos-sandbox server'")
    p.add_argument(
        "--base-port",
        type=int,
        default=DEFAULT_BASE_PORT,
        help="static host port of container 0, container i gets base+i (singularity, process)",
    )
    p.add_argument(
        "--dynamic-ports",
        action="store_true",
        help="singularity/process: one group with a Nomad-chosen host port instead",
    )
    p.add_argument("--container-port", type=int, default=None, help="server port inside a docker container")
    p.add_argument("--isolation", choices=["auto", "bwrap", "none"], default="auto")
    p.add_argument("--network", choices=["auto", "public", "allow", "deny"], default="auto")
    p.add_argument("--cpu", type=int, default=1000, help="MHz per container")
    p.add_argument("--memory", type=int, default=2048, help="MB per container")
    p.add_argument("--datacenter", action="append", default=[], help="repeatable")
    p.add_argument("--namespace")
    p.add_argument("--region")
    p.add_argument("--node-pool")
    p.add_argument(
        "--constraint",
        action="append",
        default=[],
        nargs=3,
        metavar=("ATTRIBUTE", "OPERATOR", "VALUE"),
        help="e.g. --constraint '${attr.kernel.name}' = linux (repeatable)",
    )
    p.add_argument("--service", action="store_true", help="register a Nomad service with a health check")


def spec_from_args(args: argparse.Namespace) -> SandboxJobSpec:
    # the token is not part of the job (the tasks read it from a Nomad Variable): a random one
    # satisfies the spec and is never shown
    token = secrets.token_urlsafe(32)
    values: dict[str, Any] = {
        "job_id": args.job_id,
        "driver": args.driver,
        "count": args.count,
        "slots_per_container": args.slots,
        "token": token,
        "image": args.image,
        "singularity_image": args.sif,
        "apptainer_binary": args.apptainer,
        "apptainer_args": args.apptainer_arg,
        "apptainer_cache_dir": args.apptainer_cache_dir,
        "base_port": args.base_port,
        "static_ports": not args.dynamic_ports,
        "isolation": args.isolation,
        "network": args.network,
        "cpu": args.cpu,
        "memory": args.memory,
        "datacenters": args.datacenter,
        "namespace": args.namespace,
        "region": args.region,
        "node_pool": args.node_pool,
        "constraints": [Constraint(l_target=a, operand=o, r_target=v) for a, o, v in args.constraint],
        "service": args.service,
        "task_user": None if args.task_user.lower() == "none" else args.task_user,
        "owner": None,  # a job rendered for a person has no owner process to outlive
    }
    if args.server_command:
        values["server_command"] = shlex.split(args.server_command)
    if args.container_port is not None:
        values["container_port"] = args.container_port
    return SandboxJobSpec(**values)


# where a spec field comes from on this command line (the error names what the user typed)
_FLAG_OF = {
    "count": "--count", "slots": "--slots", "slots_per_container": "--slots", "job_id": "--job-id",
    "task_user": "--task-user", "base_port": "--base-port", "cpu": "--cpu", "memory": "--memory",
    "container_port": "--container-port", "image": "--image", "server_command": "--server-command",
}  # fmt: skip


def _problem(error: Any) -> str:
    text = str(error["msg"]).removeprefix("Value error, ")
    flag = next((_FLAG_OF[str(part)] for part in reversed(error["loc"]) if str(part) in _FLAG_OF), None)
    return f"{flag}: {text}" if flag and not text.startswith(flag) else text


def sif_refusal(sif: str | None) -> str | None:
    """A SIF no node can resolve (a relative path), said in the flag's name."""
    if sif and "://" not in sif and not os.path.isabs(sif):  # apptainer exec takes docker://...
        return (
            f"--singularity-image {sif}: a relative path, which a node cannot resolve; "
            "give its absolute path on the nodes"
        )
    return None


def _refusal(args: argparse.Namespace) -> str | None:
    """What the spec would accept but makes no job a person can run."""
    if args.count < 1:
        return f"--count {args.count}: a rendered job needs at least one container"
    return sif_refusal(args.sif)


def render_from_args(args: argparse.Namespace) -> int:
    try:
        refused = _refusal(args)
        if refused is not None:
            raise ValueError(refused)
        spec = spec_from_args(args)
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        print(f"atropos-sandbox job render: error: {problems}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"atropos-sandbox job render: error: {exc}", file=sys.stderr)
        return 2
    job = create_sandbox_job(spec)
    print(
        f"# the servers read their token from the Nomad Variable {spec.token_variable} (item token), which "
        f"a pool writes before it submits the job; to run it by hand: nomad var put {spec.token_variable} "
        "token=$(openssl rand -hex 32)",
        file=sys.stderr,
    )
    if args.format == "json":
        sys.stdout.write(json.dumps(job.to_api(), indent=2) + "\n")
    else:
        sys.stdout.write(render_job_hcl(job.to_json()))
    return 0
