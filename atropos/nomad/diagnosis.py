"""Readable reasons why sandbox allocations do not run, from Nomad's own records.

- A task that fails to start leaves events in the allocation's `TaskStates`: `Driver Failure`
  (e.g. the command does not exist, the image cannot be pulled), `Setup Failure`, `Terminated` with
  an exit code (127 from `/bin/sh` when `apptainer` is not installed)... `allocation_failure` turns
  the latest such event into a sentence and a hint.
- A group that cannot be placed at all leaves a `blocked` evaluation whose `FailedTGAllocs` metric
  counts the nodes filtered out (`missing drivers`, constraints) or exhausted (`reserved port
  collision http=19000`, memory). `placement_problems` describes them; a problem is `permanent` when
  every node was filtered out (waiting cannot help), not when resources may yet free up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict

from atropos.nomad.responses import AllocationMetric, AllocationStub, Evaluation, TaskEvent

__all__ = ["AllocationFailure", "PlacementProblem", "allocation_failure", "placement_problems"]

# Task event types after which the task is not (or no longer) running.
_FATAL_EVENTS = frozenset(
    {
        "Setup Failure",
        "Driver Failure",
        "Failed Validation",
        "Failed Artifact Download",
        "Task hook failed",
        "Terminated",
        "Not Restarting",
        "Sibling Task Failed",
    }
)


class AllocationFailure(BaseModel):
    model_config = ConfigDict(frozen=True)

    alloc_id: str
    alloc_name: str
    group: str
    node_name: str
    task: str
    reason: str
    hint: str | None = None
    stderr_tail: str = ""

    def describe(self) -> str:
        where = f" on node {self.node_name}" if self.node_name else ""
        text = f"allocation {self.alloc_name or self.alloc_id} (task {self.task}){where}: {self.reason}"
        if self.hint:
            text += f" -- {self.hint}"
        if self.stderr_tail:
            text += "\n  stderr: " + "\n          ".join(self.stderr_tail.splitlines())
        return text

    def with_stderr(self, tail: str) -> AllocationFailure:
        tail = tail.strip()
        hint = self.hint or _hint(tail, None)
        return self.model_copy(update={"stderr_tail": tail, "hint": hint})


class PlacementProblem(BaseModel):
    model_config = ConfigDict(frozen=True)

    group: str
    message: str
    permanent: bool

    def describe(self) -> str:
        return f"task group {self.group} not placed: {self.message}"


def allocation_failure(alloc: AllocationStub) -> AllocationFailure | None:
    """Why `alloc` is not running, if it failed: its latest fatal task event not followed by a start."""
    for task, state in sorted(alloc.task_states.items()):
        fatal: TaskEvent | None = None
        for event in state.events:
            if event.type == "Started":
                fatal = None
            elif event.type in _FATAL_EVENTS and (fatal is None or event.type != "Not Restarting"):
                fatal = event  # "Not Restarting" says less than the failure before it
        if fatal is None and not (state.failed or alloc.client_status == "failed"):
            continue
        reason = _event_text(fatal) if fatal is not None else (alloc.client_description or "failed")
        return AllocationFailure(
            alloc_id=alloc.id,
            alloc_name=alloc.name,
            group=alloc.task_group,
            node_name=alloc.node_name,
            task=task,
            reason=reason,
            hint=_hint(reason, fatal.exit_code if fatal is not None else None),
        )
    if alloc.client_status == "failed":
        return AllocationFailure(
            alloc_id=alloc.id,
            alloc_name=alloc.name,
            group=alloc.task_group,
            node_name=alloc.node_name,
            task="",
            reason=alloc.client_description or "allocation failed",
        )
    return None


def _event_text(event: TaskEvent) -> str:
    if event.type == "Terminated":
        text = f"Terminated with exit code {event.exit_code}"
        if event.signal:
            text += f" (signal {event.signal})"
        if event.details.get("oom_killed") == "true":
            text += ", killed for exceeding its memory limit"
        return text
    detail = (
        event.driver_error
        or event.setup_error
        or event.validation_error
        or event.download_error
        or event.display_message
        or event.message
    )
    return f"{event.type}: {detail}" if detail else event.type


def _hint(text: str, exit_code: int | None) -> str | None:
    lower = text.lower()
    if (
        exit_code == 127
        or "executable file not found" in lower
        or "command not found" in lower
        or ": not found" in lower
    ):
        return (
            "a command was not found on the node: check that it is installed and on the PATH the "
            "Nomad client gives its tasks (apptainer for driver singularity, the server command "
            "for driver process)"
        )
    if exit_code == 126 or "permission denied" in lower:
        return "a command or file could not be used: permission denied on the node"
    if "pull" in lower or "manifest unknown" in lower or "repository does not exist" in lower:
        return "the docker image could not be pulled: check its name and the node's registry access"
    if "image format not recognized" in lower:
        return (
            "apptainer cannot open the image: the file is there but is not a SIF (or a format this "
            "apptainer reads); rebuild it, e.g. scripts/build-sif.sh"
        )
    if ".sif" in lower and ("no such file" in lower or "could not open" in lower or "not exist" in lower):
        return "the SIF image is missing on the node: it must exist at the same path on every node"
    if "address already in use" in lower:
        return "the server's port is taken on the node by a process Nomad does not manage"
    return None


def placement_problems(evaluations: Iterable[Evaluation]) -> list[PlacementProblem]:
    """Problems recorded by `blocked` evaluations (one per group that Nomad could not place)."""
    problems: dict[str, PlacementProblem] = {}
    for evaluation in sorted(evaluations, key=lambda e: e.modify_index):
        if evaluation.status != "blocked":
            continue
        for group, metric in evaluation.failed_tg_allocs.items():
            problems[group] = _describe_metric(group, metric)
    return [problems[g] for g in sorted(problems)]


def _describe_metric(group: str, metric: AllocationMetric) -> PlacementProblem:
    parts: list[str] = []
    if metric.nodes_evaluated == 0:
        parts.append(
            "no node is in the job's datacenters and node pool"
            + _counts(" (nodes per datacenter: ", metric.nodes_available, ")")
        )
    filters = _merge(metric.constraint_filtered, metric.class_filtered)
    parts += [f"{reason}: {count} node(s) filtered out" for reason, count in sorted(filters.items())]
    parts += [f"{dim}: exhausted on {count} node(s)" for dim, count in sorted(metric.dimension_exhausted.items())]
    parts += [f"quota exhausted: {q}" for q in metric.quota_exhausted]
    if not parts:
        parts.append(f"{metric.nodes_filtered} node(s) filtered, {metric.nodes_exhausted} exhausted")
    message = "; ".join(parts) + _placement_hint(filters, metric.dimension_exhausted)
    permanent = metric.nodes_exhausted == 0 and not metric.quota_exhausted
    return PlacementProblem(group=group, message=message, permanent=permanent)


def _placement_hint(filters: Mapping[str, int], exhausted: Mapping[str, int]) -> str:
    if any("missing drivers" in reason for reason in filters):
        return (
            " -- enable the task's driver on the clients (raw_exec for singularity/process, see "
            "nomad/nomad-singularity.hcl; a Docker engine for docker)"
        )
    if any("port collision" in dim for dim in exhausted):
        return " -- another allocation holds that port on every eligible node: free it or change base_port"
    return ""


def _merge(*maps: Mapping[str, int]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for mapping in maps:
        for key, count in mapping.items():
            merged[key] = merged.get(key, 0) + count
    return merged


def _counts(prefix: str, counts: Mapping[str, int], suffix: str) -> str:
    if not counts:
        return ""
    return prefix + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) + suffix
