"""SLURM's command line as this project uses it: the queue (`squeue`), submitting and cancelling
(`sbatch --parsable`, `scancel`), what a pending reason means, and the batch script of a server.
SLURM's stable interface is this command line; no Python library for it fits an asyncio pool
that must not block (pyslurm binds one libslurm version and calls it synchronously)."""

from atropos.slurm.batch import BatchJob
from atropos.slurm.commands import QueuedJob, cancel_dead_owner_jobs, queue, run, seconds_of
from atropos.slurm.reasons import hopeless

__all__ = ["BatchJob", "QueuedJob", "cancel_dead_owner_jobs", "hopeless", "queue", "run", "seconds_of"]
