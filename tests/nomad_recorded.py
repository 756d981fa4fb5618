"""Answers recorded from a real Nomad v2.0.5 agent (tests/fixtures/nomad/*.json) and helpers to hold
the stand-in, the client's parsing and the job builder to them.

Most fixtures are one exchange as the recorder saw it: `method`, `path`, `params`, the JSON body
sent (`request`) or the raw text sent (`request_text`), `status`, `kind` ("json" or "text") and
`body` (the decoded answer), scrubbed of volatile values only (UUIDs become stable fake UUIDs,
timestamps fixed values, the host name `recorded-host`); key names and structure are Nomad's.
`*_register` files wrap the registration exchange (`register`) with the `SandboxJobSpec` keyword
arguments it was built from (`spec`); `shape_*` files hold one `job_shapes()` shape's registration
(`register`) and Nomad's echo of it (`echo`, `GET /v1/job/:id`). `manifest.json` says how they were
made.

Key paths below use `.` between keys, `[]` for the items of a list and `*` for the entries of a
map whose keys are data (task names, group names, Meta), e.g. `TaskStates.*.Events[].Type`.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import types
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
from pydantic import BaseModel

from atropos.nomad import SandboxJobSpec, create_sandbox_job
from tests.nomad_fixtures import REPO, TOKEN, free_port_block
from tests.nomad_standin import NomadStandIn

FIXTURES = os.path.join(REPO, "tests", "fixtures", "nomad")
NOMAD_VERSION = "2.0.5"

# Maps whose keys are data, not field names: their entries are compared with each other by key,
# their key sets are not a contract.
DATA_MAPS = frozenset(
    {
        "TaskStates",
        "Tasks",
        "TaskResources",
        "TaskLifecycles",
        "Meta",
        "Config",
        "Env",
        "Summary",
        "Attributes",
        "Drivers",
        "Details",
        "NodesAvailable",
        "QueuedAllocations",
        "FailedTGAllocs",
        "ClassFiltered",
        "ConstraintFiltered",
        "ClassExhausted",
        "DimensionExhausted",
        "ResourcesExhausted",
        "ScoreMetaData",
        "Links",
        "HostVolumes",
        "HostNetworks",
        "CSIControllerPlugins",
        "CSINodePlugins",
        "PlanAnnotations",
    }
)


@dataclass(frozen=True)
class Exchange:
    """One request and its answer (recorded from Nomad, or served by the stand-in)."""

    method: str
    path: str
    status: int
    body: Any
    kind: str = "json"
    params: Mapping[str, str] | None = None
    request: Any = None
    request_text: str | None = None

    @property
    def text(self) -> str:
        """The body as Nomad sent it on the wire (for text answers, the text itself)."""
        return self.body if self.kind == "text" else json.dumps(self.body)


def fixture_names() -> list[str]:
    return sorted(
        name.removesuffix(".json")
        for name in os.listdir(FIXTURES)
        if name.endswith(".json") and name != "manifest.json"
    )


def load(name: str) -> dict[str, Any]:
    with open(os.path.join(FIXTURES, f"{name}.json"), encoding="utf-8") as f:
        return dict(json.load(f))


def _exchange(data: Mapping[str, Any]) -> Exchange:
    return Exchange(
        method=data["method"],
        path=data["path"],
        status=int(data["status"]),
        body=data["body"],
        kind=data.get("kind", "json"),
        params=data.get("params") or {},
        request=data.get("request"),
        request_text=data.get("request_text"),
    )


def recorded(name: str, part: str | None = None) -> Exchange:
    """The recorded exchange `name` (or its `part`: `register`, `echo`); a wrapper file's default
    part is its registration."""
    data = load(name)
    if part is None and "method" not in data:
        part = "register"
    return _exchange(data[part] if part else data)


def recorded_spec(name: str, **overrides: Any) -> SandboxJobSpec:
    """The spec a `*_register` recording was built from (its keyword arguments), rebuilt."""
    values = {**load(name)["spec"], **overrides}
    return SandboxJobSpec(token=TOKEN, **values)


# ------------------------------------------------------------------------------ comparing shapes


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def is_zero(value: Any) -> bool:
    """A value Nomad's encoder leaves out of its answers (`omitempty`)."""
    return value is None or value == "" or value == 0 or value is False or value == [] or value == {}


def _same_type(nomad: Any, standin: Any) -> bool:
    a, b = json_type(nomad), json_type(standin)
    # Nomad writes null for an empty list or map (the client reads both as empty)
    return a == b or (a == "null" and b in ("list", "object")) or (b == "null" and a in ("list", "object"))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def shape_problems(nomad: Any, standin: Any, path: str = "") -> list[str]:
    """Where the stand-in's answer `standin` is not shaped like Nomad's `nomad`:

    - `missing`: a key Nomad sent that the stand-in does not;
    - `extra`: a key the stand-in sent with a non-empty value that Nomad does not send (Nomad leaves
      many empty fields out, so an extra key whose value is empty is no problem);
    - `type`: the same key with another JSON type (null and an empty list or map count as one).
    List items are compared with Nomad's item of the same index (else its first); entries of data
    maps (`DATA_MAPS`) with Nomad's entry of the same key (else its first)."""
    if not _same_type(nomad, standin):
        return [f"{path or '<root>'}: type {json_type(standin)} where Nomad sends {json_type(nomad)}"]
    problems: list[str] = []
    if isinstance(nomad, dict) and isinstance(standin, dict):
        if path.rsplit(".", 1)[-1] in DATA_MAPS:
            for key, value in standin.items():
                peer = nomad.get(key, next(iter(nomad.values()), None)) if nomad else None
                if peer is not None:
                    problems += shape_problems(peer, value, _join(path, "*"))
            return _unique(problems)
        for key in nomad.keys() - standin.keys():
            problems.append(f"{_join(path, key)}: missing")
        for key in standin.keys() - nomad.keys():
            if not is_zero(standin[key]):
                problems.append(f"{_join(path, key)}: extra")
        for key in nomad.keys() & standin.keys():
            problems += shape_problems(nomad[key], standin[key], _join(path, key))
    elif isinstance(nomad, list) and isinstance(standin, list) and nomad:
        for i, item in enumerate(standin):
            problems += shape_problems(nomad[i] if i < len(nomad) else nomad[0], item, path + "[]")
    return _unique(problems)


def _unique(items: list[str]) -> list[str]:
    return sorted(set(items))


def key_paths(value: Any, path: str = "", *, data_maps: frozenset[str] = DATA_MAPS) -> set[str]:
    """Every key path in `value` (entries of `data_maps` as `*`)."""
    found: set[str] = set()
    if isinstance(value, dict):
        data = path.rsplit(".", 1)[-1] in data_maps
        for key, item in value.items():
            where = _join(path, "*" if data else key)
            found.add(where)
            found |= key_paths(item, where, data_maps=data_maps)
    elif isinstance(value, list):
        for item in value:
            found |= key_paths(item, path + "[]", data_maps=data_maps)
    return found


def client_read_paths(model: type[BaseModel], path: str = "") -> set[str]:
    """The key paths a `responses` model reads (its fields' wire names, recursively)."""
    found: set[str] = set()
    for name, field in model.model_fields.items():
        key = field.alias or name
        where = _join(path, key)
        found.add(where)
        found |= _annotation_paths(field.annotation, where)
    return found


def _annotation_paths(annotation: Any, path: str) -> set[str]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _annotation_paths(args[0], path)
    if origin in (typing.Union, types.UnionType):
        found: set[str] = set()
        for arg in args:
            found |= _annotation_paths(arg, path)
        return found
    if origin is list:
        return _annotation_paths(args[0], path + "[]")
    if origin is dict:
        return _annotation_paths(args[1], path + ".*") | ({path + ".*"} if args else set())
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return client_read_paths(annotation, path)
    return set()


def covered(path: str, patterns: Mapping[str, str] | frozenset[str] | set[str]) -> bool:
    """`path` is one of `patterns` or lies below one (`Job` covers `Job.TaskGroups[].Name`)."""
    return any(path == p or path.startswith(p + ".") or path.startswith(p + "[]") for p in patterns)


def problem_path(problem: str) -> str:
    return problem.split(":", 1)[0]


# ------------------------------------------------------------------------ driving the stand-in

SCALE_BLOCKED = "job scaling blocked due to active deployment"


class StandInSession:
    """Sends the stand-in the requests the recorder sent the real agent, in the same order, and
    keeps each answer under the recording's name."""

    def __init__(self, standin: NomadStandIn) -> None:
        self.standin = standin
        self.http = httpx.AsyncClient(base_url=standin.address, timeout=30.0)
        self.answers: dict[str, Exchange] = {}

    async def aclose(self) -> None:
        await self.http.aclose()

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        content: bytes | None = None,
        name: str | None = None,
    ) -> Exchange:
        response = await self.http.request(method, path, params=params, json=json_body, content=content)
        try:
            body, kind = response.json(), "json"
        except ValueError:
            body, kind = response.text, "text"
        answer = Exchange(method, path, response.status_code, body, kind, dict(params or {}))
        if name is not None:
            self.answers[name] = answer
        return answer

    async def replay(self, name: str) -> Exchange:
        """Send the recorded request `name` as it was (method, path, params, body)."""
        sent = recorded(name)
        content = sent.request_text.encode() if sent.request_text is not None else None
        return await self.call(
            sent.method, sent.path, params=sent.params or None, json_body=sent.request, content=content, name=name
        )

    async def running(self, job_id: str, want: int, *, attempts: int = 600) -> list[dict[str, Any]]:
        for _ in range(attempts):
            allocs = (await self.call("GET", f"/v1/job/{job_id}/allocations")).body
            live = [a for a in allocs if a["DesiredStatus"] == "run" and a["ClientStatus"] == "running"]
            if len(live) >= want:
                return sorted(live, key=lambda a: a["TaskGroup"])
            await asyncio.sleep(0.05)
        raise AssertionError(f"the stand-in never ran {want} allocations of {job_id}")

    async def scale(self, job_id: str, request: Mapping[str, Any], name: str, *, attempts: int = 400) -> Exchange:
        """Scale once the deployment is over (the stand-in, like Nomad, refuses while it runs)."""
        for _ in range(attempts):
            answer = await self.call("POST", f"/v1/job/{job_id}/scale", json_body=dict(request), name=name)
            if not (answer.status == 400 and SCALE_BLOCKED in str(answer.body)):
                return answer
            await asyncio.sleep(0.05)
        raise AssertionError(f"scaling {job_id} stayed blocked")

    async def put_token(self, spec: SandboxJobSpec, name: str | None = None) -> None:
        path = spec.token_variable
        answer = await self.call(
            "PUT", f"/v1/var/{path}", json_body={"Path": path, "Items": {"token": TOKEN}}, name=name
        )
        assert answer.status == 200, answer

    async def register(self, spec: SandboxJobSpec, name: str) -> Exchange:
        return await self.call("POST", f"/v1/job/{spec.job_id}", json_body=create_sandbox_job(spec).to_api(), name=name)

    async def static_job(self) -> None:
        """As the recorder's `live_static`: two static-port groups, scaling, stopping."""
        spec = recorded_spec("static_register", base_port=free_port_block(2))
        job = spec.job_id
        await self.put_token(spec, "variable_put")
        await self.register(spec, "static_register")
        allocs = await self.running(job, 2)
        await self.call(
            "GET",
            f"/v1/client/fs/logs/{allocs[0]['ID']}",
            name="task_log_tail",
            params=recorded("task_log_tail").params,
        )
        await self.call(
            "POST",
            f"/v1/job/{job}/scale",
            name="error_scale_during_deployment",
            json_body={"Count": 0, "Target": {"Group": "sandbox-1"}, "Message": "too early"},
        )
        await self.call("GET", f"/v1/job/{job}/allocations", name="static_allocations")
        await self.call("GET", f"/v1/allocation/{allocs[0]['ID']}", name="static_allocation")
        await self.call("GET", f"/v1/allocation/{allocs[1]['ID']}", name="static_allocation_1")
        await self.call("GET", f"/v1/job/{job}", name="static_job")
        await self.call("GET", f"/v1/job/{job}/evaluations", name="static_evaluations")
        await self.call("GET", "/v1/jobs", params={"prefix": "rec-", "meta": "true"}, name="jobs_list")
        await self.replay("error_scale_over_max")
        await self.replay("error_scale_unknown_group")
        await self.scale(job, recorded("static_scale").request, "static_scale")
        for _ in range(600):
            after = (await self.call("GET", f"/v1/job/{job}/allocations", name="static_allocations_after_scale")).body
            if any(a["TaskGroup"] == "sandbox-1" and a["ClientStatus"] != "running" for a in after):
                break
            await asyncio.sleep(0.05)
        await self.call("GET", f"/v1/job/{job}", name="static_job_after_scale")
        await self.call("POST", f"/v1/allocation/{allocs[0]['ID']}/stop", name="allocation_stop")
        await self.call("DELETE", f"/v1/job/{job}", name="job_stop")
        await self.call("GET", f"/v1/job/{job}", name="job_stopped")
        await self.call("DELETE", f"/v1/job/{job}", params={"purge": "true"}, name="job_purge")
        await self.call("DELETE", f"/v1/var/{spec.token_variable}", name="variable_delete")
        await self.replay("variable_delete_missing")

    async def dynamic_job(self) -> None:
        """As the recorder's `live_dynamic`: one group with a dynamic port, scaled to two."""
        spec = recorded_spec("dynamic_register")
        job = spec.job_id
        await self.put_token(spec)
        await self.register(spec, "dynamic_register")
        allocs = await self.running(job, 1)
        await self.call("GET", f"/v1/job/{job}", name="dynamic_job")
        await self.call("GET", f"/v1/allocation/{allocs[0]['ID']}", name="dynamic_allocation")
        await self.scale(job, recorded("dynamic_scale").request, "dynamic_scale")
        await self.running(job, 2)
        await self.call("GET", f"/v1/job/{job}/allocations", name="dynamic_allocations_after_scale")
        await self.call("DELETE", f"/v1/job/{job}", params={"purge": "true"})

    async def docker_job(self) -> None:
        """A docker job on a stand-in whose docker driver places and then fails every start (it has no
        engine): its allocation's ports are shaped as Nomad's are."""
        spec = recorded_spec("docker_register")
        await self.put_token(spec)
        await self.register(spec, "docker_register")
        for _ in range(600):
            allocs = (await self.call("GET", f"/v1/job/{spec.job_id}/allocations")).body
            if allocs:
                await self.call("GET", f"/v1/allocation/{allocs[0]['ID']}", name="docker_allocation")
                break
            await asyncio.sleep(0.05)
        await self.call("DELETE", f"/v1/job/{spec.job_id}", params={"purge": "true"})

    async def errors_and_agent(self) -> None:
        for name in fixture_names():
            if name.startswith("error_") and name not in self.answers and not name.startswith("error_scale_"):
                await self.replay(name)
        await self.replay("error_scale_unknown_job")
        await self.call("GET", "/v1/agent/health", name="agent_health")
        nodes = await self.call("GET", "/v1/nodes", name="nodes")
        await self.call("GET", f"/v1/node/{nodes.body[0]['ID']}", name="node")


# ------------------------------------------------------------------- serving recorded answers


class RecordedNomad:
    """A loopback HTTP server answering with recorded exchanges, keyed by (method, path).

    `with RecordedNomad({("GET", "/v1/job/x"): recorded("error_job_not_found")}) as nomad:` then
    `nomad.address`; every request it received is in `nomad.requests`."""

    def __init__(self, routes: Mapping[tuple[str, str], Exchange]) -> None:
        self.routes = dict(routes)
        self.requests: list[tuple[str, str]] = []
        self.address = ""

    @contextmanager
    def serving(self) -> Iterator[RecordedNomad]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length", "0") or 0)
                if length:
                    self.rfile.read(length)
                path = self.path.split("?", 1)[0]
                owner.requests.append((self.command, path))
                found = owner.routes.get((self.command, path))
                if found is None:
                    status, kind, payload = 599, "text", f"no recording for {self.command} {path}"
                else:
                    status, kind, payload = found.status, found.kind, found.text
                data = payload.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if kind == "json" else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Nomad-Index", "1")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                return

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.address = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


# ------------------------------------------------------------------ endpoints and what is read


def endpoint_of(exchange: Exchange) -> str:
    """`METHOD /v1/route` with the ids as placeholders, e.g. `GET /v1/allocation/:id`."""
    path = exchange.path
    for prefix, placeholder in (("/v1/var/", ":path"), ("/v1/client/fs/logs/", ":id")):
        if path.startswith(prefix):
            return f"{exchange.method} {prefix}{placeholder}"
    parts = path.split("/")
    if len(parts) > 3 and parts[2] in ("job", "allocation", "node"):
        parts[3] = ":id"
    return f"{exchange.method} {'/'.join(parts)}"


def _reads(model: type[BaseModel], *, listed: bool = False) -> frozenset[str]:
    return frozenset(client_read_paths(model, "[]" if listed else ""))


def client_reads() -> dict[str, frozenset[str]]:
    """Per endpoint, the key paths `NomadClient` (and the lifecycle code on top) reads from the answer."""
    from atropos.nomad.responses import (
        AgentHealth,
        Allocation,
        AllocationStub,
        Evaluation,
        JobStub,
        NodeInfo,
        RegisterResponse,
    )

    return {
        "POST /v1/job/:id": _reads(RegisterResponse),
        "POST /v1/job/:id/scale": _reads(RegisterResponse),
        # read_job: waiting.py takes JobModifyIndex, lifecycle.py the owner in Meta
        "GET /v1/job/:id": frozenset({"JobModifyIndex", "Meta", "Meta.*"}),
        "DELETE /v1/job/:id": frozenset({"EvalID"}),
        "GET /v1/job/:id/allocations": _reads(AllocationStub, listed=True),
        "GET /v1/job/:id/evaluations": _reads(Evaluation, listed=True),
        "GET /v1/jobs": _reads(JobStub, listed=True),
        "GET /v1/allocation/:id": _reads(Allocation),
        "POST /v1/allocation/:id/stop": frozenset({"EvalID"}),
        "GET /v1/node/:id": _reads(NodeInfo),
        "GET /v1/nodes": _reads(NodeInfo, listed=True),
        "GET /v1/agent/health": _reads(AgentHealth),
        "PUT /v1/var/:path": frozenset(),  # the answer is not read
        "DELETE /v1/var/:path": frozenset(),  # no body
        "GET /v1/client/fs/logs/:id": frozenset(),  # plain text
    }


# ----------------------------------------------------- keys Nomad sends that the stand-in omits
#
# Every entry is a key Nomad 2.0.5 sent in a recording that the stand-in leaves out, and that no code
# of the client reads (test_the_allow_list_holds_no_key_the_client_reads checks that, and that each
# entry is still sent by Nomad). Grouped by why it can be left out.


def _group(reason: str, parent: str, *keys: str) -> dict[str, str]:
    return {_join(parent, key): reason for key in keys}


_JOB_DEFAULTS = "a field of Nomad's job struct the builder does not set, stored with its default"
_SCALING = "Nomad turns the group's Scaling block into a scaling policy object (id, target, type, indexes)"
_HOST_NETWORK = "the host network a port was placed on (`default`); the client reads Label, Value and To"


def _job_omits(prefix: str) -> dict[str, str]:
    """The job as Nomad stores it: the client reads only JobModifyIndex and Meta of it (and the
    builder's own keys are held to this echo by the builder tests)."""
    out: dict[str, str] = {}
    out |= _group(
        _JOB_DEFAULTS,
        prefix,
        "Affinities",
        "AllAtOnce",
        "Constraints",
        "ConsulNamespace",
        "DispatchIdempotencyToken",
        "Dispatched",
        "Multiregion",
        "NodePool",
        "NomadTokenID",
        "ParameterizedJob",
        "ParentID",
        "Payload",
        "Periodic",
        "Spreads",
        "Stable",
        "StatusDescription",
        "UI",
        "VaultNamespace",
        "VersionTag",
    )
    out |= _group(
        "Nomad keeps these at the job level of the update block (the rest moves to each group)",
        _join(prefix, "Update"),
        "AutoPromote",
        "Canary",
        "Stagger",
    )
    group = _join(prefix, "TaskGroups[]")
    out |= _group(
        _JOB_DEFAULTS,
        group,
        "Affinities",
        "Constraints",
        "Consul",
        "Disconnect",
        "EphemeralDisk",
        "MaxClientDisconnect",
        "MaxRunDuration",
        "Meta",
        "Migrate",
        "PreventRescheduleOnLost",
        "Services",
        "ShutdownDelay",
        "Spreads",
        "StopAfterClientDisconnect",
        "Volumes",
    )
    out |= _group("Nomad copies the job's update block into each group", group, "Update")
    out |= _group("Nomad writes a null Scaling for a group without one (dynamic ports)", group, "Scaling")
    out |= _group(_SCALING, _join(group, "Scaling"), "CreateIndex", "ID", "ModifyIndex", "Policy", "Target", "Type")
    out |= _group(_JOB_DEFAULTS, _join(group, "RestartPolicy"), "RenderTemplates")
    for ports in ("DynamicPorts[]", "ReservedPorts[]"):
        out |= _group(_HOST_NETWORK, _join(group, f"Networks[].{ports}"), "HostNetwork")
    task = _join(group, "Tasks[]")
    out |= _group(
        _JOB_DEFAULTS,
        task,
        "Actions",
        "Affinities",
        "Artifacts",
        "CSIPluginConfig",
        "Constraints",
        "Consul",
        "DispatchPayload",
        "Env",
        "Identities",
        "Identity",
        "Kind",
        "Leader",
        "Lifecycle",
        "LogConfig",
        "Meta",
        "RestartPolicy",
        "ScalingPolicies",
        "Schedule",
        "Secrets",
        "Services",
        "ShutdownDelay",
        "User",
        "Vault",
        "VolumeMounts",
    )
    out |= _group(
        _JOB_DEFAULTS,
        _join(task, "Resources"),
        "Cores",
        "Devices",
        "DiskMB",
        "IOPS",
        "MemoryMaxMB",
        "NUMA",
        "Networks",
        "SecretsMB",
    )
    out |= _group(
        _JOB_DEFAULTS,
        _join(task, "Templates[]"),
        "ChangeScript",
        "ChangeSignal",
        "Envvars",
        "ErrMissingKey",
        "Gid",
        "LeftDelim",
        "Once",
        "RightDelim",
        "SourcePath",
        "Splay",
        "Uid",
        "VaultGrace",
        "Wait",
    )
    return out


_EVENT_EXTRAS = (
    "DiskLimit",
    "DriverMessage",
    "FailedSibling",
    "GenericSource",
    "KillReason",
    "StartDelay",
    "TaskSignal",
    "TaskSignalReason",
    "VaultError",
)


def _task_state_omits(prefix: str) -> dict[str, str]:
    states = _join(prefix, "TaskStates.*")
    out = _group("whether the task is paused (schedules, Enterprise); never read", states, "Paused")
    out |= _group("task event fields the diagnosis does not use", _join(states, "Events[]"), *_EVENT_EXTRAS)
    return out


def _allocation_omits() -> dict[str, str]:
    out = _job_omits("Job") | _task_state_omits("")
    out |= _group(
        "older or CNI-only views of the resources and network (the client reads AllocatedResources, "
        "then Resources.Networks); the key id signing its workload identities",
        "",
        "NetworkStatus",
        "SharedResources",
        "TaskResources",
        "SigningKeyID",
    )
    out |= _group(
        "placement metrics of an allocation; the client reads an evaluation's FailedTGAllocs instead",
        "Metrics",
        "ClassExhausted",
        "ClassFiltered",
        "ConstraintFiltered",
        "DimensionExhausted",
        "NodePool",
        "NodesInPool",
        "QuotaExhausted",
        "ResourcesExhausted",
        "ScoreMetaData",
        "Scores",
    )
    out |= _group(
        "legacy Resources beyond Networks, which is all the client reads of it",
        "Resources",
        "Cores",
        "Devices",
        "IOPS",
        "MemoryMaxMB",
        "NUMA",
        "SecretsMB",
    )
    out |= _group(
        "per-task lifecycle hooks (prestart, sidecar); none in these jobs", "AllocatedResources", "TaskLifecycles"
    )
    out |= _group(
        "reserved cores, devices, oversubscription: the client reads only a task's Networks",
        "AllocatedResources.Tasks.*",
        "Devices",
    )
    out |= _group(
        "reserved cores, devices, oversubscription: the client reads only a task's Networks",
        "AllocatedResources.Tasks.*.Cpu",
        "ReservedCores",
    )
    out |= _group(
        "reserved cores, devices, oversubscription: the client reads only a task's Networks",
        "AllocatedResources.Tasks.*.Memory",
        "MemoryMaxMB",
    )
    for ports in ("DynamicPorts[]", "ReservedPorts[]"):
        out |= _group(_HOST_NETWORK, f"AllocatedResources.Shared.Networks[].{ports}", "HostNetwork")
    return out


_QUERY_META = "query metadata (the client takes the index from the X-Nomad-Index header)"

STANDIN_OMITS: dict[str, dict[str, str]] = {
    "POST /v1/job/:id": _group(_QUERY_META, "", "Index", "LastContact", "NextToken"),
    "POST /v1/job/:id/scale": _group(_QUERY_META, "", "Index", "LastContact", "NextToken"),
    "GET /v1/job/:id": _job_omits(""),
    "DELETE /v1/job/:id": _group(_QUERY_META, "", "Index", "KnownLeader", "LastContact", "NextToken")
    | _group("the evaluation of the job's volume claims (none here)", "", "VolumeEvalID", "VolumeEvalIndex"),
    "GET /v1/job/:id/allocations": _task_state_omits("[]")
    | _group(
        "deployment, rescheduling and preemption bookkeeping; the client reads the statuses",
        "[]",
        "DeploymentStatus",
        "DesiredTransition",
        "NextAllocation",
        "PreemptedAllocations",
        "PreemptedByAllocation",
        "RescheduleTracker",
    ),
    "GET /v1/job/:id/evaluations": _group(
        "scheduler bookkeeping of an evaluation", "[]", "DeploymentID", "PlanAnnotations", "SnapshotIndex"
    ),
    "GET /v1/jobs": _group(
        "multiregion and parent/child job fields the client never reads",
        "[]",
        "JobSummary.Children",
        "Multiregion",
        "NodePool",
    ),
    "GET /v1/allocation/:id": _allocation_omits(),
    "GET /v1/node/:id": _group(
        "node details beyond identity, status, drivers and attributes",
        "",
        "CSIControllerPlugins",
        "CSINodePlugins",
        "CgroupParent",
        "ComputedClass",
        "DrainStrategy",
        "Events",
        "GCVolumesOnNodeGC",
        "HostNetworks",
        "HostVolumes",
        "IdentitySigningKeyID",
        "LastAllocUpdateIndex",
        "LastDrain",
        "LastMissedHeartbeatIndex",
        "Links",
        "NodeMaxAllocs",
        "NodeResources",
        "ReservedResources",
        "SecretID",
    ),
    "GET /v1/nodes": _group("node details beyond identity, status and drivers", "[]", "HostVolumes", "LastDrain"),
    "PUT /v1/var/:path": _group(
        "timestamps of the Variable; the client does not read the answer", "", "CreateTime", "ModifyTime"
    ),
}

# Where the stand-in is not Nomad and the difference matters (a key the client reads, a wrong type,
# an invented key, another status). The stand-in is not this module's to change: each entry is a
# gap to close there, and test_known_stand_in_gaps_are_still_there fails once one is closed, so the
# entry goes with it.
_EVENT_GAP = "the diagnosis reads it; Nomad always sends it (empty when unset), the stand-in's events leave it out"
_TIME_GAP = "Nomad sends null until the task has finished or restarted; the stand-in sends 0001-01-01T00:00:00Z"
_NODE_POOL_GAP = "NodeInfo reads NodePool; Nomad sends `default`, the stand-in's node has none"


def _state_gaps(prefix: str) -> dict[str, str]:
    states = _join(prefix, "TaskStates.*")
    out = {f"{states}.Events[].{key}: missing": _EVENT_GAP for key in ("DownloadError", "KillError", "ValidationError")}
    out |= {f"{states}.{key}: type string where Nomad sends null": _TIME_GAP for key in ("FinishedAt", "LastRestart")}
    return out


_MODE_GAP = "Nomad leaves Mode out for host networking; the stand-in sends `host` (NetworkStatus reads Mode)"
_LAST_INDEX_GAP = "the stand-in invents LastIndex; Nomad sends Index (LastContact, NextToken) instead"

STANDIN_GAPS: dict[str, dict[str, str]] = {
    "POST /v1/job/:id": {"LastIndex: extra": _LAST_INDEX_GAP},
    "POST /v1/job/:id/scale": {"LastIndex: extra": _LAST_INDEX_GAP},
    "GET /v1/job/:id/allocations": _state_gaps("[]"),
    "GET /v1/allocation/:id": _state_gaps("") | {"AllocatedResources.Shared.Networks[].Mode: extra": _MODE_GAP},
    "GET /v1/node/:id": {"NodePool: missing": _NODE_POOL_GAP},
    "GET /v1/nodes": {"[].NodePool: missing": _NODE_POOL_GAP},
}

# Recordings whose status the stand-in does not reproduce.
STATUS_GAPS: dict[str, str] = {
    "error_register_not_json": "Nomad answers 400 (`invalid character ...`); the stand-in's handler raises on the "
    "body and aiohttp answers 500, which the client would retry as a server error",
    "error_stop_unknown_job": "Nomad 2.0.5 answers DELETE of an unknown job 200 with an empty EvalID; the stand-in "
    "answers 404",
    "variable_delete": "Nomad answers 204 (no body); the stand-in 200",
    "variable_delete_missing": "Nomad answers 204 (no body), whether or not the Variable existed; the stand-in 200",
}

# The recordings the stand-in is held to, with the session step that makes its answer.
STATIC_STEPS = (
    "variable_put",
    "static_register",
    "task_log_tail",
    "error_scale_during_deployment",
    "static_allocations",
    "static_allocation",
    "static_allocation_1",
    "static_job",
    "static_evaluations",
    "jobs_list",
    "error_scale_over_max",
    "error_scale_unknown_group",
    "static_scale",
    "static_allocations_after_scale",
    "static_job_after_scale",
    "allocation_stop",
    "job_stop",
    "job_stopped",
    "job_purge",
    "variable_delete",
    "variable_delete_missing",
)
DYNAMIC_STEPS = (
    "dynamic_register",
    "dynamic_job",
    "dynamic_allocation",
    "dynamic_scale",
    "dynamic_allocations_after_scale",
)
DOCKER_STEPS = ("docker_register", "docker_allocation")


def allowed_omission(endpoint: str, problem: str) -> bool:
    path, what = problem.split(": ", 1)
    return what == "missing" and path in STANDIN_OMITS.get(endpoint, {})


async def standin_answers(agent_env: Mapping[str, str]) -> dict[str, Exchange]:
    """Drive a stand-in (and one with a broken docker driver) through every recorded step."""
    answers: dict[str, Exchange] = {}
    async with NomadStandIn(agent_env=agent_env) as standin:
        session = StandInSession(standin)
        try:
            await session.static_job()
            await session.dynamic_job()
            await session.errors_and_agent()
        finally:
            await session.aclose()
        answers |= session.answers
    async with NomadStandIn(agent_env=agent_env, docker="broken") as standin:
        session = StandInSession(standin)
        try:
            await session.docker_job()
        finally:
            await session.aclose()
        answers |= session.answers
    return answers
