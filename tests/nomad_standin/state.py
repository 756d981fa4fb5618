"""The stand-in's records (jobs, allocations, evaluations, its one node) and their JSON, shaped like
Nomad's: list stubs without resources, full allocations with `AllocatedResources`."""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

NODE_IP = "127.0.0.1"
DATACENTER = "dc1"
REGION = "global"
ZERO_TIME = "0001-01-01T00:00:00Z"


def new_id() -> str:
    return str(uuid.uuid4())


def now_ns() -> int:
    return time.time_ns()


def rfc3339(ns: int | None) -> str:
    if not ns:
        return ZERO_TIME
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Index:
    """Nomad's raft index: one counter for every change, and a wake-up for blocking queries."""

    def __init__(self) -> None:
        self.value = 1
        self.closed = False
        self._changed = asyncio.Event()

    def close(self) -> None:
        """Release every blocking query (the stand-in is stopping)."""
        self.closed = True
        self._changed.set()

    def bump(self) -> int:
        self.value += 1
        self._changed.set()
        self._changed = asyncio.Event()
        return self.value

    async def wait_beyond(self, index: int, timeout: float, current: Callable[[], int]) -> None:
        """Return once `current()` (the resource's index) exceeds `index`, or after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while current() <= index and not self.closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return


@dataclass
class JobRecord:
    spec: dict[str, Any]
    version: int
    create_index: int
    modify_index: int
    job_modify_index: int
    submit_time: int
    stop: bool = False

    @property
    def id(self) -> str:
        return str(self.spec["ID"])

    @property
    def namespace(self) -> str:
        return str(self.spec.get("Namespace") or "default")

    def groups(self) -> list[dict[str, Any]]:
        return list(self.spec.get("TaskGroups") or [])

    def status(self, allocs: list[AllocRecord]) -> str:
        if self.stop:
            return "dead"
        mine = [a for a in allocs if a.job_id == self.id]
        return "running" if any(a.client_status in ("running", "pending") for a in mine) else "pending"

    def to_json(self, allocs: list[AllocRecord]) -> dict[str, Any]:
        out = copy.deepcopy(self.spec)
        out.setdefault("Name", self.id)
        out.setdefault("Namespace", "default")
        out.setdefault("Region", REGION)
        out.setdefault("Datacenters", ["*"])
        out.setdefault("Priority", 50)
        out.update(
            Status=self.status(allocs),
            Stop=self.stop,
            Version=self.version,
            CreateIndex=self.create_index,
            ModifyIndex=self.modify_index,
            JobModifyIndex=self.job_modify_index,
            SubmitTime=self.submit_time,
        )
        return out

    def to_stub(self, allocs: list[AllocRecord], *, meta: bool) -> dict[str, Any]:
        summary = {}
        for group in self.groups():
            counts = dict.fromkeys(("Queued", "Complete", "Failed", "Running", "Starting", "Lost", "Unknown"), 0)
            for alloc in allocs:
                if alloc.job_id == self.id and alloc.group_name == group["Name"]:
                    key = {
                        "running": "Running",
                        "pending": "Starting",
                        "failed": "Failed",
                        "complete": "Complete",
                        "lost": "Lost",
                    }.get(alloc.client_status, "Unknown")
                    counts[key] += 1
            summary[group["Name"]] = counts
        stub: dict[str, Any] = {
            "ID": self.id,
            "ParentID": "",
            "Name": self.spec.get("Name") or self.id,
            "Namespace": self.namespace,
            "Datacenters": self.spec.get("Datacenters") or ["*"],
            "Type": self.spec.get("Type") or "service",
            "Priority": self.spec.get("Priority") or 50,
            "Periodic": False,
            "ParameterizedJob": False,
            "Stop": self.stop,
            "Status": self.status(allocs),
            "StatusDescription": "",
            "JobSummary": {
                "JobID": self.id,
                "Namespace": self.namespace,
                "Summary": summary,
                "CreateIndex": self.create_index,
                "ModifyIndex": self.modify_index,
            },
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
            "JobModifyIndex": self.job_modify_index,
            "SubmitTime": self.submit_time,
        }
        if meta:
            stub["Meta"] = dict(self.spec.get("Meta") or {})  # `?meta=true`; newer than the spec
        return stub


@dataclass
class TaskRecord:
    state: str = "pending"
    failed: bool = False
    restarts: int = 0
    started_at: int = 0
    finished_at: int = 0
    last_restart: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)

    def event(self, kind: str, message: str, **extra: Any) -> None:
        event: dict[str, Any] = {
            "Type": kind,
            "Time": now_ns(),
            "DisplayMessage": message,
            "Message": "",
            "Details": {k: str(v) for k, v in extra.pop("details", {}).items()},
            "FailsTask": False,
            "ExitCode": 0,
            "Signal": 0,
            "DriverError": "",
            "SetupError": "",
            "KillTimeout": 0,
            "RestartReason": "",
        }
        event.update(extra)
        self.events.append(event)

    def to_json(self) -> dict[str, Any]:
        return {
            "State": self.state,
            "Failed": self.failed,
            "Restarts": self.restarts,
            "LastRestart": rfc3339(self.last_restart),
            "StartedAt": rfc3339(self.started_at),
            "FinishedAt": rfc3339(self.finished_at),
            "Events": copy.deepcopy(self.events),
        }


@dataclass
class PortRecord:
    label: str
    value: int
    to: int
    reserved: bool


@dataclass
class AllocRecord:
    id: str
    eval_id: str
    job_id: str
    namespace: str
    job: dict[str, Any]
    job_version: int
    group: dict[str, Any]
    index: int
    node_id: str
    node_name: str
    ports: list[PortRecord]
    alloc_dir: str
    create_index: int
    modify_index: int
    create_time: int
    modify_time: int
    client_status: str = "pending"
    client_description: str = "No tasks have started"
    desired_status: str = "run"
    desired_description: str = ""
    tasks: dict[str, TaskRecord] = field(default_factory=dict)

    @property
    def group_name(self) -> str:
        return str(self.group["Name"])

    @property
    def name(self) -> str:
        return f"{self.job_id}.{self.group_name}[{self.index}]"

    def to_stub(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "EvalID": self.eval_id,
            "Name": self.name,
            "Namespace": self.namespace,
            "NodeID": self.node_id,
            "NodeName": self.node_name,
            "JobID": self.job_id,
            "JobType": "service",
            "JobVersion": self.job_version,
            "TaskGroup": self.group_name,
            "DesiredStatus": self.desired_status,
            "DesiredDescription": self.desired_description,
            "ClientStatus": self.client_status,
            "ClientDescription": self.client_description,
            "TaskStates": {name: task.to_json() for name, task in self.tasks.items()},
            "FollowupEvalID": "",
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
            "CreateTime": self.create_time,
            "ModifyTime": self.modify_time,
        }

    def to_json(self) -> dict[str, Any]:
        network = {
            "Mode": "host",
            "IP": NODE_IP,
            "MBits": 0,
            "ReservedPorts": [{"Label": p.label, "Value": p.value, "To": p.to} for p in self.ports if p.reserved],
            "DynamicPorts": [{"Label": p.label, "Value": p.value, "To": p.to} for p in self.ports if not p.reserved],
        }
        tasks = {}
        cpu = memory = 0
        for task in self.group.get("Tasks") or []:
            res = task.get("Resources") or {}
            cpu += int(res.get("CPU", 100))
            memory += int(res.get("MemoryMB", 300))
            tasks[task["Name"]] = {
                "Cpu": {"CpuShares": int(res.get("CPU", 100))},
                "Memory": {"MemoryMB": int(res.get("MemoryMB", 300))},
                "Networks": [],
            }
        disk = int((self.group.get("EphemeralDisk") or {}).get("SizeMB", 300))
        full = {k: v for k, v in self.to_stub().items() if k not in ("JobType", "JobVersion")}
        full.update(
            Job=copy.deepcopy(self.job),
            AllocModifyIndex=self.modify_index,
            DesiredTransition={},
            PreviousAllocation="",
            NextAllocation="",
            DeploymentID="",
            Metrics={
                "NodesEvaluated": 1,
                "NodesFiltered": 0,
                "NodesAvailable": {DATACENTER: 1},
                "NodesExhausted": 0,
                "AllocationTime": 1000,
                "CoalescedFailures": 0,
            },
            AllocatedResources={
                "Shared": {
                    "DiskMB": disk,
                    "Networks": [network],
                    "Ports": [{"Label": p.label, "Value": p.value, "To": p.to, "HostIP": NODE_IP} for p in self.ports],
                },
                "Tasks": tasks,
            },
            # The legacy top-level resources carry no networks on current Nomad.
            Resources={"CPU": cpu, "MemoryMB": memory, "DiskMB": disk, "Networks": []},
        )
        return full


@dataclass
class EvalRecord:
    id: str
    job_id: str
    namespace: str
    triggered_by: str
    job_modify_index: int
    create_index: int
    modify_index: int
    status: str = "complete"
    status_description: str = ""
    failed_tg_allocs: dict[str, dict[str, Any]] = field(default_factory=dict)
    queued: dict[str, int] = field(default_factory=dict)
    blocked_eval: str = ""
    previous_eval: str = ""
    create_time: int = field(default_factory=now_ns)

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Namespace": self.namespace,
            "Priority": 50,
            "Type": "service",
            "TriggeredBy": self.triggered_by,
            "JobID": self.job_id,
            "JobModifyIndex": self.job_modify_index,
            "Status": self.status,
            "StatusDescription": self.status_description,
            "BlockedEval": self.blocked_eval,
            "PreviousEval": self.previous_eval,
            "FailedTGAllocs": copy.deepcopy(self.failed_tg_allocs),
            "QueuedAllocations": dict(self.queued),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
            "CreateTime": self.create_time,
            "ModifyTime": self.create_time,
        }
