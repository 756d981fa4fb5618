"""What a pending job's reason (squeue's %r) says about its future."""

from __future__ import annotations

# reasons that waiting does not clear: the job asks for what its partition, account or QOS never
# gives (any per-job limit too), or it is held
_HOPELESS = {
    "PartitionConfig": "it asks for more than any node of its partition has (cpus_per_server, memory_per_server, "
    "constraint) or for a time limit above the partition's",
    "BadConstraints": "no node has its constraint",
    "PartitionNodeLimit": "it asks for more nodes than its partition allows",
    "PartitionTimeLimit": "its time limit is above its partition's",
    "PartitionInactive": "its partition is inactive",
    "InvalidAccount": "its account is not valid here",
    "InvalidQOS": "its QOS is not valid here",
    "DependencyNeverSatisfied": "it depends on a job that can never end as required",
    "JobHeldUser": "it is held (scontrol release, or drop --hold from sbatch_args)",
    "JobHeldAdmin": "an administrator holds it",
}


def hopeless(reason: str) -> str | None:
    """Why a job pending for `reason` will never start, or None if waiting may do (Priority,
    Resources, a group or per-user limit: other jobs end)."""
    if reason in _HOPELESS:
        return _HOPELESS[reason]
    if "PerJob" in reason:  # AssocMaxCpuPerJobLimit, QOSMaxWallDurationPerJobLimit, ...
        return "it asks for more than a per-job limit of its account or QOS allows"
    return None
