"""The stand-in's scheduler and client in one: a single node that places task groups the way Nomad
does (drivers, datacenters, simple constraints, port bookkeeping) and runs `raw_exec` tasks.

Groups that cannot be placed leave a `blocked` evaluation with `FailedTGAllocs`, like Nomad: a
docker group on this node (no Docker engine) is filtered out with `missing drivers`; a static port
already held by another allocation is a `reserved port collision`. Blocked groups are placed when an
allocation stops and frees its ports.

`set_node_status` plays a node that Nomad marks down (its allocations are lost, nothing is placed on
it) and back up. As in Nomad, a job update whose constraints exclude a running allocation's node
replaces that allocation (a destructive update); other changes to job-level constraints are in place.
"""

from __future__ import annotations

import asyncio
import copy
import fnmatch
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from tests.nomad_standin.state import (
    DATACENTER,
    NODE_IP,
    AllocRecord,
    EvalRecord,
    Index,
    JobRecord,
    PortRecord,
    new_id,
    now_ns,
)
from tests.nomad_standin.tasks import TaskRunner

NODE_NAME = "standin-node"
_DYNAMIC_PORTS = range(20000, 32000)
# Group fields whose change does not replace running allocations.
_IN_PLACE = ("Count", "Scaling", "Update", "ReschedulePolicy", "Meta")


class Cluster:
    def __init__(self, data_dir: str, *, agent_env: Mapping[str, str], docker: str = "missing") -> None:
        self.data_dir = data_dir
        self.agent_env = dict(agent_env)
        self.index = Index()
        self.node_id = new_id()
        self.docker = docker  # "missing": no engine (not placed); "broken": placed, fails on start
        self.jobs: dict[str, JobRecord] = {}
        self.allocs: dict[str, AllocRecord] = {}
        self.evals: dict[str, EvalRecord] = {}
        self.runners: dict[str, list[TaskRunner]] = {}
        self.variables: dict[str, dict[str, str]] = {}  # path -> items (Nomad Variables, one namespace)
        self.start_failures: list[tuple[str, str, str]] = []  # (job id, event type, message)
        self.node_status = "ready"  # "down": Nomad stopped hearing from the node
        self.status_updated_at = int(time.time())  # the node's StatusUpdatedAt
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------------------ node facts

    @property
    def drivers(self) -> dict[str, dict[str, Any]]:
        docker_ok = self.docker != "missing"
        return {
            "raw_exec": {
                "Detected": True,
                "Healthy": True,
                "HealthDescription": "Healthy",
                "Attributes": {"driver.raw_exec": "true"},
            },
            "exec": {"Detected": False, "Healthy": False, "HealthDescription": "", "Attributes": {}},
            "docker": {
                "Detected": docker_ok,
                "Healthy": docker_ok,
                "HealthDescription": "Healthy" if docker_ok else "Failed to connect to docker daemon",
                "Attributes": {"driver.docker": "true"} if docker_ok else {},
            },
        }

    @property
    def attributes(self) -> dict[str, str]:
        attrs = {
            "kernel.name": "linux",
            "os.name": "linux",
            "cpu.arch": "amd64",
            "unique.hostname": socket.gethostname(),
            "unique.network.ip-address": NODE_IP,
            "nomad.version": "standin",
        }
        for name, info in self.drivers.items():
            if info["Healthy"]:
                attrs[f"driver.{name}"] = "1"
        return attrs

    def interpolation_table(self) -> dict[str, str]:
        table = {f"attr.{k}": v for k, v in self.attributes.items()}
        table.update(
            {
                "node.unique.id": self.node_id,
                "node.unique.name": NODE_NAME,
                "node.datacenter": DATACENTER,
                "node.region": "global",
            }
        )
        return table

    def set_node_status(self, status: str) -> None:
        """The node goes `down` (its allocations are lost and rescheduled, which cannot place here)
        or comes back `ready` (blocked groups are placed again)."""
        self.node_status = status
        self.status_updated_at = max(int(time.time()), self.status_updated_at + 1)
        self.index.bump()
        if status == "ready":
            self._unblock()
            return
        lost = [a for a in self.allocs.values() if a.desired_status == "run"]
        for alloc in lost:
            alloc.client_status = "lost"
            self.stop_alloc(alloc, "alloc is lost since its node is down")
        for job_id in {a.job_id for a in lost}:
            job = self.jobs.get(job_id)
            if job is not None and not job.stop:
                self.evaluate(job, "node-update")

    # ------------------------------------------------------------------------------ job changes

    def register(self, spec: dict[str, Any]) -> EvalRecord:
        job_id = str(spec["ID"])
        old = self.jobs.get(job_id)
        index = self.index.bump()
        if old is None:
            job = JobRecord(
                spec=spec,
                version=0,
                create_index=index,
                modify_index=index,
                job_modify_index=index,
                submit_time=now_ns(),
            )
        else:
            job = JobRecord(
                spec=spec,
                version=old.version + 1,
                create_index=old.create_index,
                modify_index=index,
                job_modify_index=index,
                submit_time=now_ns(),
            )
        self.jobs[job_id] = job
        return self.evaluate(job, "job-register")

    def scale(self, job_id: str, group: str, count: int) -> EvalRecord:
        job = self.jobs[job_id]
        spec = copy.deepcopy(job.spec)
        for tg in spec.get("TaskGroups") or []:
            if tg["Name"] == group:
                tg["Count"] = count
        return self.register(spec)

    def deregister(self, job_id: str, *, purge: bool) -> EvalRecord:
        job = self.jobs[job_id]
        index = self.index.bump()
        job.stop = True
        job.modify_index = job.job_modify_index = index
        evaluation = self.evaluate(job, "job-deregister")
        if purge:
            del self.jobs[job_id]
            self.index.bump()
        return evaluation

    def deployment_active(self, job: JobRecord) -> bool:
        """Like Nomad's deployments for jobs with an update block: active until every allocation of
        the current version has run for `MinHealthyTime` (task-state health)."""
        update = job.spec.get("Update")
        if not update or job.stop:
            return False
        min_healthy = int(update.get("MinHealthyTime", 10 * 10**9))
        now = now_ns()
        for alloc in self._live(job.id):
            if alloc.job_version != job.version:
                continue
            started = [t.started_at for t in alloc.tasks.values()]
            if alloc.client_status != "running" or not started or min(started) + min_healthy > now:
                return True
        return False

    # ------------------------------------------------------------------------------- scheduling

    def evaluate(self, job: JobRecord, trigger: str) -> EvalRecord:
        """Reconcile the job's allocations with its groups; record what could not be placed."""
        for old in self.evals.values():
            if old.job_id == job.id and old.status == "blocked":
                old.status = "canceled"
                old.modify_index = self.index.bump()
        index = self.index.bump()
        evaluation = EvalRecord(
            id=new_id(),
            job_id=job.id,
            namespace=job.namespace,
            triggered_by=trigger,
            job_modify_index=job.job_modify_index,
            create_index=index,
            modify_index=index,
        )
        self.evals[evaluation.id] = evaluation
        wanted = {tg["Name"]: tg for tg in job.groups()} if not job.stop else {}
        for alloc in self._live(job.id):
            group = wanted.get(alloc.group_name)
            if group is None:
                self.stop_alloc(
                    alloc, "alloc not needed as job is stopped" if job.stop else "alloc not needed due to job update"
                )
            elif not _same_definition(alloc, group, job) or self._filter_reason(job, group) is not None:
                self.stop_alloc(alloc, "alloc is being updated due to job update")
            else:
                alloc.job = job.to_json([])
                alloc.group = copy.deepcopy(group)
                alloc.job_version = job.version
        for name, group in wanted.items():
            live = sorted((a for a in self._live(job.id) if a.group_name == name), key=lambda a: a.index)
            count = int(group.get("Count", 1))
            for alloc in live[count:][::-1]:
                self.stop_alloc(alloc, "alloc not needed due to job update")
            used = {a.index for a in live[:count]}
            missing = [i for i in range(count) if i not in used][: max(count - len(used), 0)]
            for alloc_index in missing:
                problem = self._place(job, group, alloc_index, evaluation)
                if problem is not None:
                    evaluation.failed_tg_allocs[name] = problem
                    evaluation.queued[name] = evaluation.queued.get(name, 0) + 1
                    break
        if evaluation.failed_tg_allocs:
            blocked = EvalRecord(
                id=new_id(),
                job_id=job.id,
                namespace=job.namespace,
                triggered_by="queued-allocs",
                job_modify_index=job.job_modify_index,
                create_index=evaluation.create_index,
                modify_index=evaluation.modify_index,
                status="blocked",
                failed_tg_allocs=copy.deepcopy(evaluation.failed_tg_allocs),
                previous_eval=evaluation.id,
            )
            self.evals[blocked.id] = blocked
            evaluation.blocked_eval = blocked.id
        evaluation.modify_index = self.index.bump()
        return evaluation

    def _live(self, job_id: str) -> list[AllocRecord]:
        return [a for a in self.allocs.values() if a.job_id == job_id and a.desired_status == "run"]

    def _place(
        self, job: JobRecord, group: dict[str, Any], alloc_index: int, evaluation: EvalRecord
    ) -> dict[str, Any] | None:
        """Place one allocation, or return the AllocationMetric explaining why not."""
        metric: dict[str, Any] = {
            "NodesEvaluated": 1,
            "NodesFiltered": 0,
            "NodesExhausted": 0,
            "NodesAvailable": {DATACENTER: 1},
            "ConstraintFiltered": {},
            "ClassFiltered": {},
            "DimensionExhausted": {},
            "ClassExhausted": {},
            "QuotaExhausted": [],
            "CoalescedFailures": 0,
            "AllocationTime": 1000,
        }
        datacenters = job.spec.get("Datacenters") or ["*"]
        if self.node_status != "ready" or not any(fnmatch.fnmatchcase(DATACENTER, p) for p in datacenters):
            metric.update(NodesEvaluated=0, NodesAvailable={dc: 0 for dc in datacenters})
            return metric
        filtered = self._filter_reason(job, group)
        if filtered is not None:
            metric.update(NodesFiltered=1, ConstraintFiltered={filtered: 1})
            return metric
        ports, collision = self._ports(group)
        if collision is not None:
            metric.update(NodesExhausted=1, DimensionExhausted={collision: 1})
            return metric
        index = self.index.bump()
        alloc = AllocRecord(
            id=new_id(),
            eval_id=evaluation.id,
            job_id=job.id,
            namespace=job.namespace,
            job=job.to_json([]),
            job_version=job.version,
            group=copy.deepcopy(group),
            index=alloc_index,
            node_id=self.node_id,
            node_name=NODE_NAME,
            ports=ports,
            alloc_dir="",
            create_index=index,
            modify_index=index,
            create_time=now_ns(),
            modify_time=now_ns(),
        )
        alloc.alloc_dir = os.path.join(self.data_dir, "alloc", alloc.id)
        self.allocs[alloc.id] = alloc
        self._start(alloc)
        return None

    def _filter_reason(self, job: JobRecord, group: dict[str, Any]) -> str | None:
        healthy = {name for name, info in self.drivers.items() if info["Healthy"]}
        if any(task.get("Driver") not in healthy for task in group.get("Tasks") or []):
            return "missing drivers"
        table = self.interpolation_table()
        for constraint in [*(job.spec.get("Constraints") or []), *(group.get("Constraints") or [])]:
            left = _resolve(str(constraint.get("LTarget", "")), table)
            right = _resolve(str(constraint.get("RTarget", "")), table)
            operand = constraint.get("Operand", "=")
            if (operand in ("=", "==", "is") and left != right) or (operand in ("!=", "not") and left == right):
                return f"{constraint.get('LTarget')} {operand} {constraint.get('RTarget')}"
        return None

    def _ports(self, group: dict[str, Any]) -> tuple[list[PortRecord], str | None]:
        taken = {p.value for a in self.allocs.values() if a.desired_status == "run" for p in a.ports}
        ports: list[PortRecord] = []
        for network in group.get("Networks") or []:
            for port in network.get("ReservedPorts") or []:
                value = int(port["Value"])
                if value in taken:
                    return [], f"network: reserved port collision {port['Label']}={value}"
                taken.add(value)
                ports.append(PortRecord(port["Label"], value, int(port.get("To") or 0), True))
            for port in network.get("DynamicPorts") or []:
                value = _free_port(taken)
                taken.add(value)
                ports.append(PortRecord(port["Label"], value, int(port.get("To") or 0), False))
        return ports, None

    # -------------------------------------------------------------------------------- running

    def changed(self, alloc: AllocRecord) -> Callable[[], None]:
        def note() -> None:
            alloc.modify_index = self.index.bump()
            alloc.modify_time = now_ns()

        return note

    def _start(self, alloc: AllocRecord) -> None:
        runners = []
        for task in alloc.group.get("Tasks") or []:
            runner = TaskRunner(
                alloc,
                task,
                agent_env=self.agent_env,
                node_attributes=self.interpolation_table(),
                changed=self.changed(alloc),
                start_failure=self._injected_failure,
                variables=self.variables,
            )
            runners.append(runner)
            runner.start()
        self.runners[alloc.id] = runners

    def _injected_failure(self, alloc: AllocRecord) -> tuple[str, str] | None:
        for i, (job_id, kind, message) in enumerate(self.start_failures):
            if job_id == alloc.job_id:
                del self.start_failures[i]
                return kind, message
        if self.docker == "broken" and any(t.get("Driver") == "docker" for t in alloc.group.get("Tasks") or []):
            image = next(t["Config"].get("image", "") for t in alloc.group["Tasks"] if t.get("Driver") == "docker")
            return (
                "Driver Failure",
                f"Failed to pull `{image}`: Error response from daemon: pull access denied "
                f"for {image}, repository does not exist or may require 'docker login'",
            )
        return None

    def stop_alloc(self, alloc: AllocRecord, reason: str) -> None:
        alloc.desired_status = "stop"
        alloc.desired_description = reason
        alloc.modify_index = self.index.bump()
        task = asyncio.get_running_loop().create_task(self._kill(alloc))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _kill(self, alloc: AllocRecord) -> None:
        await asyncio.gather(*(runner.stop() for runner in self.runners.get(alloc.id, [])))
        if alloc.client_status in ("pending", "running"):
            alloc.client_status = "complete"
        alloc.modify_index = self.index.bump()
        self._unblock()

    def _unblock(self) -> None:
        """Freed resources: give blocked groups another chance, like Nomad's blocked-eval tracker."""
        for job_id in {e.job_id for e in self.evals.values() if e.status == "blocked"}:
            job = self.jobs.get(job_id)
            if job is not None and not job.stop:
                self.evaluate(job, "queued-allocs")

    async def shutdown(self) -> None:
        for alloc in list(self.allocs.values()):
            if alloc.desired_status == "run":
                alloc.desired_status = "stop"
        await asyncio.gather(*(r.stop() for runners in self.runners.values() for r in runners), return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)


def _same_definition(alloc: AllocRecord, group: dict[str, Any], job: JobRecord) -> bool:
    def essence(tg: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in tg.items() if k not in _IN_PLACE}

    old_meta = alloc.job.get("Meta") or {}
    return essence(alloc.group) == essence(group) and old_meta == (job.spec.get("Meta") or {})


def _resolve(value: str, table: Mapping[str, str]) -> str:
    if value.startswith("${") and value.endswith("}"):
        return table.get(value[2:-1], value)
    return value


def _free_port(taken: set[int]) -> int:
    for port in _DYNAMIC_PORTS:
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((NODE_IP, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free dynamic port")
