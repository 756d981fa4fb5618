"""The stand-in's HTTP API: the subset of Nomad's `/v1` the client uses, on a real loopback socket.

Reads are blocking queries (`index`/`wait` query parameters, `X-Nomad-Index` answer header). Every
answer is recorded (`NomadStandIn.served`) so a contract test can validate each against the
OpenAPI description of the real endpoint. Faults (`NomadStandIn.faults`) make chosen requests answer
500, hang, or have their connection reset without an answer, and make task starts fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.nomad_standin.cluster import NODE_NAME, Cluster
from tests.nomad_standin.state import DATACENTER, NODE_IP, EvalRecord, new_id, rfc3339

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_MAX_WAIT_S = 300.0


@dataclass
class Served:
    """One answer of the stand-in: `route` is the aiohttp route, e.g. `/v1/job/{job_id}/allocations`."""

    method: str
    route: str
    status: int
    body: Any


@dataclass
class _Rule:
    method: str
    pattern: re.Pattern[str]
    action: str  # "status" | "hang" | "reset"
    status: int = 500
    message: str = "rpc error: stand-in fault"
    seconds: float | None = None
    times: int | None = 1
    until: float | None = None  # time.monotonic() after which the rule is gone


@dataclass
class Faults:
    """Make requests fail. `times=None` applies a rule forever."""

    rules: list[_Rule] = field(default_factory=list)
    cluster: Cluster | None = None

    def fail(
        self,
        method: str,
        path: str,
        *,
        status: int = 500,
        message: str = "rpc error: stand-in fault",
        times: int | None = 1,
    ) -> None:
        """Answer `status` with `message` to requests whose path matches the regex `path`."""
        self.rules.append(
            _Rule(method.upper(), re.compile(path), "status", status=status, message=message, times=times)
        )

    def hang(self, method: str, path: str, *, seconds: float | None = None, times: int | None = 1) -> None:
        """Do not answer (for `seconds`, or until the client gives up)."""
        self.rules.append(_Rule(method.upper(), re.compile(path), "hang", seconds=seconds, times=times))

    def reset(self, method: str, path: str, *, times: int | None = 1, for_seconds: float | None = None) -> None:
        """Abort the connection (TCP reset, no answer) of matching requests: `times` requests, or
        every one for `for_seconds` (with `times=None`)."""
        until = None if for_seconds is None else time.monotonic() + for_seconds
        self.rules.append(_Rule(method.upper(), re.compile(path), "reset", times=times, until=until))

    def fail_task_start(
        self,
        job_id: str,
        *,
        kind: str = "Driver Failure",
        message: str = "failed to start task: stand-in fault",
        times: int = 1,
    ) -> None:
        """The next `times` task starts of `job_id` fail with a task event of type `kind`."""
        assert self.cluster is not None
        self.cluster.start_failures.extend([(job_id, kind, message)] * times)

    def match(self, method: str, path: str) -> _Rule | None:
        now = time.monotonic()
        self.rules[:] = [r for r in self.rules if r.until is None or r.until > now]
        for rule in self.rules:
            if rule.method in (method, "*") and rule.pattern.search(path):
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self.rules.remove(rule)
                return rule
        return None


class NomadStandIn:
    """A Nomad agent stand-in on 127.0.0.1. `async with NomadStandIn() as nomad: nomad.address`."""

    def __init__(
        self, data_dir: str | None = None, *, agent_env: Mapping[str, str] | None = None, docker: str = "missing"
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="nomad-standin-")
        os.makedirs(self.data_dir, exist_ok=True)
        os.chmod(self.data_dir, 0o711)  # as Nomad's alloc dir root: tasks of any user can reach their own
        self.cluster = Cluster(
            self.data_dir, agent_env=agent_env if agent_env is not None else os.environ, docker=docker
        )
        self.faults = Faults(cluster=self.cluster)
        self.served: list[Served] = []
        self.requests: list[tuple[str, str]] = []
        self.resets = 0
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self.address = ""

    async def __aenter__(self) -> NomadStandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        routes = [
            ("GET", "/v1/agent/health", self._agent_health),
            ("GET", "/v1/status/leader", self._leader),
            ("GET", "/v1/jobs", self._list_jobs),
            ("POST", "/v1/jobs", self._register),
            ("PUT", "/v1/jobs", self._register),
            ("GET", "/v1/job/{job_id}", self._read_job),
            ("POST", "/v1/job/{job_id}", self._register),
            ("PUT", "/v1/job/{job_id}", self._register),
            ("DELETE", "/v1/job/{job_id}", self._deregister),
            ("POST", "/v1/job/{job_id}/scale", self._scale),
            ("PUT", "/v1/job/{job_id}/scale", self._scale),
            ("GET", "/v1/job/{job_id}/allocations", self._job_allocations),
            ("GET", "/v1/job/{job_id}/evaluations", self._job_evaluations),
            ("GET", "/v1/allocation/{alloc_id}", self._read_allocation),
            ("POST", "/v1/allocation/{alloc_id}/stop", self._stop_allocation),
            ("PUT", "/v1/allocation/{alloc_id}/stop", self._stop_allocation),
            ("GET", "/v1/evaluation/{eval_id}", self._read_evaluation),
            ("GET", "/v1/nodes", self._list_nodes),
            ("GET", "/v1/node/{node_id}", self._read_node),
            ("GET", "/v1/client/fs/logs/{alloc_id}", self._logs),
            ("GET", "/v1/client/fs/cat/{alloc_id}", self._cat),
            ("GET", "/v1/var/{path:.+}", self._read_variable),
            ("PUT", "/v1/var/{path:.+}", self._put_variable),
            ("DELETE", "/v1/var/{path:.+}", self._delete_variable),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, NODE_IP, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.address = f"http://{NODE_IP}:{port}"

    async def stop(self) -> None:
        self._closing.set()
        self.cluster.index.close()
        await self.cluster.shutdown()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # ---------------------------------------------------------------------------- middleware

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        rule = self.faults.match(request.method, request.path)
        if rule is not None and rule.action == "hang":
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), rule.seconds)
        elif rule is not None and rule.action == "reset":
            self.resets += 1
            _abort(request)
            return web.Response(status=500, text="connection reset")  # never reaches the client
        elif rule is not None:
            return web.Response(status=rule.status, text=rule.message)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            return web.Response(status=exc.status, text=exc.text or exc.reason)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        if isinstance(response, web.Response) and response.content_type == "application/json":
            self.served.append(Served(request.method, route, response.status, json.loads(response.text or "null")))
        return response

    async def _blocking(
        self, request: web.Request, current: Callable[[], int], body: Callable[[], Any]
    ) -> web.Response:
        index = int(request.query.get("index", "0") or 0)
        if index > 0:
            await self.cluster.index.wait_beyond(index, _parse_wait(request.query.get("wait")), current)
        return _json(body(), index=max(current(), 1))

    # ---------------------------------------------------------------------------------- jobs

    async def _register(self, request: web.Request) -> web.Response:
        payload = await request.json()
        spec = payload.get("Job") if isinstance(payload, dict) else None
        if not isinstance(spec, dict) or not spec.get("ID"):
            raise web.HTTPBadRequest(text="Job must be specified")
        path_id = request.match_info.get("job_id")
        if path_id is not None and path_id != spec["ID"]:
            raise web.HTTPBadRequest(text="Job ID does not match name")
        problem = _validate(spec)
        if problem:
            raise web.HTTPInternalServerError(text=f"1 error occurred:\n\t* {problem}")
        evaluation = self.cluster.register(spec)
        return _register_answer(evaluation, self.cluster.index.value)

    async def _read_job(self, request: web.Request) -> web.Response:
        job = self._job(request)

        def index() -> int:
            return job.modify_index

        return await self._blocking(request, index, lambda: job.to_json(list(self.cluster.allocs.values())))

    async def _list_jobs(self, request: web.Request) -> web.Response:
        prefix = request.query.get("prefix", "")
        meta = request.query.get("meta", "").lower() == "true"

        def body() -> list[dict[str, Any]]:
            allocs = list(self.cluster.allocs.values())
            return [
                job.to_stub(allocs, meta=meta)
                for job_id, job in sorted(self.cluster.jobs.items())
                if job_id.startswith(prefix)
            ]

        return await self._blocking(request, lambda: self.cluster.index.value, body)

    async def _deregister(self, request: web.Request) -> web.Response:
        job = self._job(request)
        purge = request.query.get("purge", "").lower() == "true"
        evaluation = self.cluster.deregister(job.id, purge=purge)
        return _json(
            {
                "EvalID": evaluation.id,
                "EvalCreateIndex": evaluation.create_index,
                "JobModifyIndex": job.job_modify_index,
            },
            index=self.cluster.index.value,
        )

    async def _scale(self, request: web.Request) -> web.Response:
        job = self._job(request)
        payload = await request.json()
        group = (payload.get("Target") or {}).get("Group")
        count = payload.get("Count")
        spec_group = next((g for g in job.groups() if g["Name"] == group), None)
        if spec_group is None:
            raise web.HTTPBadRequest(text=f"task group {group!r} specified for scaling does not exist in job")
        scaling = spec_group.get("Scaling")
        if count is not None and scaling is not None:
            if count < scaling.get("Min", 0):
                raise web.HTTPBadRequest(
                    text=f"group count was less than scaling policy minimum: {count} < {scaling.get('Min', 0)}"
                )
            if count > scaling["Max"]:
                raise web.HTTPBadRequest(
                    text=f"group count was greater than scaling policy maximum: {count} > {scaling['Max']}"
                )
        if self.cluster.deployment_active(job):  # checked after the policy bounds, as Nomad does
            raise web.HTTPBadRequest(text="job scaling blocked due to active deployment")
        evaluation = self.cluster.scale(job.id, group, int(count))
        return _register_answer(evaluation, self.cluster.index.value)

    async def _job_allocations(self, request: web.Request) -> web.Response:
        return await self._job_records(request, self.cluster.allocs, lambda a: a.to_stub(), newest_first=False)

    async def _job_evaluations(self, request: web.Request) -> web.Response:
        return await self._job_records(request, self.cluster.evals, lambda e: e.to_json(), newest_first=True)

    async def _job_records(
        self,
        request: web.Request,
        records: Mapping[str, Any],
        render: Callable[[Any], dict[str, Any]],
        *,
        newest_first: bool,
    ) -> web.Response:
        """A job's allocations or evaluations, as a blocking query on their latest change."""
        job_id = request.match_info["job_id"]

        def mine() -> list[Any]:
            found = [r for r in records.values() if r.job_id == job_id]
            return sorted(found, key=lambda r: r.create_index, reverse=newest_first)

        def index() -> int:
            return max((r.modify_index for r in mine()), default=1)

        return await self._blocking(request, index, lambda: [render(r) for r in mine()])

    # ---------------------------------------------------------------------------- the rest

    async def _read_allocation(self, request: web.Request) -> web.Response:
        alloc = self.cluster.allocs.get(request.match_info["alloc_id"])
        if alloc is None:
            raise web.HTTPNotFound(text="alloc not found")
        return await self._blocking(request, lambda: alloc.modify_index, alloc.to_json)

    async def _stop_allocation(self, request: web.Request) -> web.Response:
        """Like Nomad: the allocation stops and its job is re-evaluated, which places a replacement."""
        alloc = self.cluster.allocs.get(request.match_info["alloc_id"])
        if alloc is None:
            raise web.HTTPNotFound(text="alloc not found")
        self.cluster.stop_alloc(alloc, "alloc was stopped by the API")
        eval_id = new_id()
        task = asyncio.get_running_loop().create_task(self._replace_after_stop(alloc, eval_id))
        self.cluster._background.add(task)
        task.add_done_callback(self.cluster._background.discard)
        index = self.cluster.index.bump()
        return _json({"EvalID": eval_id, "Index": index}, index=index)

    async def _replace_after_stop(self, alloc: Any, eval_id: str) -> None:
        # as on a real node, the replacement is placed once the stopped allocation's tasks are dead
        # (its static port is free again), after up to KillTimeout for a task ignoring SIGTERM
        while alloc.client_status in ("pending", "running"):
            await asyncio.sleep(0.02)
        job = self.cluster.jobs.get(alloc.job_id)
        if job is not None:
            evaluation = self.cluster.evaluate(job, "alloc-stop")
            self.cluster.evals.pop(evaluation.id, None)  # keep the id this stop call answered with
            evaluation.id = eval_id
            self.cluster.evals[eval_id] = evaluation

    async def _read_evaluation(self, request: web.Request) -> web.Response:
        evaluation = self.cluster.evals.get(request.match_info["eval_id"])
        if evaluation is None:
            raise web.HTTPNotFound(text="eval not found")
        return _json(evaluation.to_json(), index=evaluation.modify_index)

    def _node(self) -> dict[str, Any]:
        drivers = {name: {**info, "UpdateTime": rfc3339(1)} for name, info in self.cluster.drivers.items()}
        return {
            "ID": self.cluster.node_id,
            "Name": NODE_NAME,
            "Datacenter": DATACENTER,
            "Status": self.cluster.node_status,
            "StatusDescription": "",
            "StatusUpdatedAt": self.cluster.status_updated_at,
            "HTTPAddr": self.address.removeprefix("http://"),
            "TLSEnabled": False,
            "Drivers": drivers,
            "Attributes": self.cluster.attributes,
            "Meta": {},
            "NodeClass": "",
            "Drain": False,
            "SchedulingEligibility": "eligible",
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    async def _read_node(self, request: web.Request) -> web.Response:
        if request.match_info["node_id"] != self.cluster.node_id:
            raise web.HTTPNotFound(text="node not found")
        return _json(self._node(), index=1)

    async def _list_nodes(self, request: web.Request) -> web.Response:
        node = self._node()
        stub = {
            k: node[k]
            for k in (
                "ID",
                "Name",
                "Datacenter",
                "Status",
                "StatusDescription",
                "Drivers",
                "NodeClass",
                "Drain",
                "SchedulingEligibility",
                "CreateIndex",
                "ModifyIndex",
            )
        }
        stub.update(Address=NODE_IP, Version="standin")
        return _json([stub], index=1)

    async def _agent_health(self, request: web.Request) -> web.Response:
        ok = {"ok": True, "message": "ok"}
        return _json({"client": ok, "server": ok}, index=None)

    async def _leader(self, request: web.Request) -> web.Response:
        return _json(f"{NODE_IP}:4647", index=None)

    async def _logs(self, request: web.Request) -> web.Response:
        alloc = self.cluster.allocs.get(request.match_info["alloc_id"])
        if alloc is None:
            raise web.HTTPNotFound(text="alloc not found")
        task = request.query.get("task", "")
        stream = request.query.get("type", "stdout")
        path = os.path.join(alloc.alloc_dir, "alloc", "logs", f"{task}.{stream}.0")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise web.HTTPNotFound(text=f"no {stream} log for task {task}") from None
        if request.query.get("origin") == "end":
            data = data[-int(request.query.get("offset", "0") or 0) :] if request.query.get("offset") else b""
        return web.Response(body=data, content_type="text/plain")

    async def _cat(self, request: web.Request) -> web.Response:
        alloc = self.cluster.allocs.get(request.match_info["alloc_id"])
        if alloc is None:
            raise web.HTTPNotFound(text="alloc not found")
        relative = os.path.normpath(request.query.get("path", "/")).lstrip("/")
        if relative.startswith(".."):
            raise web.HTTPBadRequest(text="path escapes the allocation dir")
        try:
            with open(os.path.join(alloc.alloc_dir, relative), "rb") as f:
                return web.Response(body=f.read(), content_type="text/plain")
        except (FileNotFoundError, IsADirectoryError):
            raise web.HTTPNotFound(text=f"file {relative} not found") from None

    def _variable_json(self, path: str) -> dict[str, Any]:
        return {
            "Namespace": "default",
            "Path": path,
            "Items": self.cluster.variables[path],
            "CreateIndex": self.cluster.index.value,
            "ModifyIndex": self.cluster.index.value,
        }

    async def _read_variable(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        if path not in self.cluster.variables:
            raise web.HTTPNotFound(text="variable not found")
        return _json(self._variable_json(path), index=self.cluster.index.value)

    async def _put_variable(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        body = await request.json()
        items = body.get("Items")
        if body.get("Path", path) != path or not isinstance(items, dict) or not items:
            raise web.HTTPBadRequest(text="variable missing required Items object")
        self.cluster.variables[path] = {str(k): str(v) for k, v in items.items()}
        index = self.cluster.index.bump()
        return _json(self._variable_json(path), index=index)

    async def _delete_variable(self, request: web.Request) -> web.Response:
        self.cluster.variables.pop(request.match_info["path"], None)
        # as Nomad 2.0.5: 200 with an empty body, whether or not the Variable existed
        return web.Response(status=200, headers={"X-Nomad-Index": str(self.cluster.index.bump())})

    def _job(self, request: web.Request) -> Any:
        job = self.cluster.jobs.get(request.match_info["job_id"])
        if job is None:
            raise web.HTTPNotFound(text="job not found")
        return job


def _abort(request: web.Request) -> None:
    """Close the request's connection with a TCP reset (SO_LINGER 0), answering nothing."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _register_answer(evaluation: EvalRecord, index: int) -> web.Response:
    return _json(
        {
            "EvalID": evaluation.id,
            "EvalCreateIndex": evaluation.create_index,
            "JobModifyIndex": evaluation.job_modify_index,
            "Warnings": "",
            "KnownLeader": True,
            "LastIndex": index,
        },
        index=index,
    )


def _json(body: Any, *, index: int | None) -> web.Response:
    headers = {"X-Nomad-KnownLeader": "true", "X-Nomad-LastContact": "0"}
    if index is not None:
        headers["X-Nomad-Index"] = str(index)
    return web.json_response(body, headers=headers)


def _parse_wait(text: str | None) -> float:
    if not text:
        return 300.0
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text)
    if match is None:
        return 300.0
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]
    return min(float(match.group(1)) * scale, _MAX_WAIT_S)


def _validate(spec: Mapping[str, Any]) -> str | None:
    """The shape checks Nomad makes at registration that matter here."""
    groups = spec.get("TaskGroups") or []
    if not groups:
        return "Missing job task groups"
    for group in groups:
        if not group.get("Tasks"):
            return f"Task group {group.get('Name')} validation failed: Missing tasks for task group"
        scaling = group.get("Scaling")
        if scaling is not None and int(group.get("Count", 1)) > int(scaling.get("Max", -1)):
            return (
                "Task group scaling policy validation failed: Scaling policy invalid: task group count "
                "must not be greater than maximum count in scaling policy"
            )
        for task in group["Tasks"]:
            driver = task.get("Driver")
            config = task.get("Config") or {}
            if driver == "raw_exec" and not config.get("command"):
                return f"Task {task.get('Name')} validation failed: missing command"
            if driver == "docker" and not config.get("image"):
                return f"Task {task.get('Name')} validation failed: image must be specified"
            if driver not in ("raw_exec", "docker", "exec"):
                return f"Task {task.get('Name')} validation failed: unknown driver {driver!r}"
    return None
