"""The batch job of one sandbox server: the `sbatch` command line that submits it and the script it runs."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from atropos.images.apptainer import shell_quote_argv

SCRIPT = "job.sh"
OUTPUT = "server.out"


@dataclass(frozen=True)
class BatchJob:
    """Options go on sbatch's command line, so they win over `SBATCH_*` variables, which win over
    the cluster's defaults; an option that is None is not given (the variable or default holds)."""

    command: list[str]
    directory: Path  # the job's directory in the pool dir: its script, output, token and data
    job_name: str
    options: dict[str, str | None] = field(default_factory=dict)  # "--partition" -> "gpu"
    extra: list[str] = field(default_factory=list)
    comment: str | None = None  # the owner, for dead-owner cleanup (a job submitted by hand has none)

    def sbatch_argv(self) -> list[str]:
        argv = ["sbatch", "--parsable", f"--job-name={self.job_name}"]
        if self.comment is not None:
            argv.append(f"--comment={self.comment}")
        argv += [f"--output={self.directory / OUTPUT}", f"--chdir={self.directory}"]
        argv += [f"{flag}={value}" for flag, value in self.options.items() if value]
        return [*argv, *self.extra, str(self.directory / SCRIPT)]

    def script(self) -> str:
        return (
            "#!/bin/sh\n"
            "# an atropos-sandbox server, submitted as\n"
            f"#   {shlex.join(self.sbatch_argv())}\n"
            "# exec: SLURM's signals (scancel, the time limit) reach the server itself\n"
            f"exec {shell_quote_argv(self.command)}\n"
        )
