"""This host's processes and who owns what: /proc reading, killing trees, prctl, owner records.

Standard library only: the slot runner imports it inside the sandbox.
"""

from atropos.host.lifetime import (
    become_subreaper,
    die_with_owner,
    die_with_parent,
    forbid_inspection,
    forbid_new_privileges,
    parent_death_signal,
)
from atropos.host.owner import OWNER_META_KEYS, OwnerMeta, OwnerState, owner_state
from atropos.host.procs import (
    START_TOLERANCE_S,
    ProcInfo,
    boot_id,
    command_line,
    kill_child_tree,
    kill_tree,
    kill_trees,
    pid_exists,
    read_stat,
    same_process,
    signal_group,
    signal_pids,
    snapshot,
    start_time,
    tree_members,
)

__all__ = [
    "OWNER_META_KEYS",
    "START_TOLERANCE_S",
    "OwnerMeta",
    "OwnerState",
    "ProcInfo",
    "become_subreaper",
    "boot_id",
    "command_line",
    "die_with_owner",
    "die_with_parent",
    "forbid_inspection",
    "forbid_new_privileges",
    "kill_child_tree",
    "kill_tree",
    "kill_trees",
    "owner_state",
    "parent_death_signal",
    "pid_exists",
    "read_stat",
    "same_process",
    "signal_group",
    "signal_pids",
    "snapshot",
    "start_time",
    "tree_members",
]
