"""Answers recorded from a real Nomad v2.0.5 agent (tests/fixtures/nomad/*.json) and helpers to hold
the stand-in, the client's parsing and the job builder to them.

Each fixture is one exchange as the recorder saw it: `method`, `path`, `params`, `status`, `kind`
("json" or "text") and `body` (the decoded answer), scrubbed of volatile values only (UUIDs become
stable fake UUIDs, timestamps fixed values, the host name `recorded-host`); key names and structure
are Nomad's. Files whose exchange has a request too (`*_register`, `shape_*`, `*_scale`) hold it
under `request`, the answer under `register`/`response`, and `shape_*` also the `echo`
(`GET /v1/job/:id`). `manifest.json` says how they were made.

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
DATA_MAPS = frozenset({
    "TaskStates", "Tasks", "TaskResources", "TaskLifecycles", "Meta", "Config", "Env", "Summary", "Attributes",
    "Drivers", "Details", "NodesAvailable", "QueuedAllocations", "FailedTGAllocs", "ClassFiltered",
    "ConstraintFiltered", "ClassExhausted", "DimensionExhausted", "ResourcesExhausted", "ScoreMetaData", "Links",
    "HostVolumes", "HostNetworks", "CSIControllerPlugins", "CSINodePlugins", "PlanAnnotations",
})


@dataclass(frozen=True)
class Exchange:
    """One request and its answer (recorded from Nomad, or served by the stand-in)."""

    method: str
    path: str
    status: int
    body: Any
    kind: str = "json"
    params: Mapping[str, str] | None = None

    @property
    def text(self) -> str:
        """The body as Nomad sent it on the wire (for text answers, the text itself)."""
        return self.body if self.kind == "text" else json.dumps(self.body)


def fixture_names() -> list[str]:
    return sorted(name.removesuffix(".json") for name in os.listdir(FIXTURES) if name.endswith(".json"))


def load(name: str) -> dict[str, Any]:
    with open(os.path.join(FIXTURES, f"{name}.json"), encoding="utf-8") as f:
        return dict(json.load(f))


def _exchange(data: Mapping[str, Any]) -> Exchange:
    return Exchange(method=data["method"], path=data["path"], status=int(data["status"]), body=data["body"],
                    kind=data.get("kind", "json"), params=data.get("params") or {})


def recorded(name: str, part: str | None = None) -> Exchange:
    """The recorded exchange `name` (or its `part`: `register`, `response`, `echo`)."""
    data = load(name)
    if part is None:
        for candidate in ("register", "response"):
            if candidate in data and "method" not in data:
                part = candidate
    return _exchange(data[part] if part else data)


def recorded_request(name: str) -> dict[str, Any]:
    return dict(load(name)["request"])


def recorded_spec(name: str, **overrides: Any) -> SandboxJobSpec:
    """The spec a `*_register`/`shape_*` recording was made from (its non-default fields), rebuilt."""
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


def key_paths(value: Any, path: str = "") -> set[str]:
    """Every key path in `value` (data-map entries as `*`)."""
    found: set[str] = set()
    if isinstance(value, dict):
        data = path.rsplit(".", 1)[-1] in DATA_MAPS
        for key, item in value.items():
            where = _join(path, "*" if data else key)
            found.add(where)
            found |= key_paths(item, where)
    elif isinstance(value, list):
        for item in value:
            found |= key_paths(item, path + "[]")
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

    async def call(self, method: str, path: str, *, params: Mapping[str, str] | None = None, json_body: Any = None,
                   content: bytes | None = None, name: str | None = None) -> Exchange:
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
        data = load(name)
        exchange = data.get("register") or data.get("response") or data
        body = data.get("request")
        content = None
        if body is None and name == "error_register_not_json":
            content = b"{not json"
        elif body is None:
            body = _recorded_json_request(name)
        return await self.call(exchange["method"], exchange["path"], params=exchange.get("params") or None,
                               json_body=body if content is None else None, content=content, name=name)

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

    async def put_token(self, spec: SandboxJobSpec) -> None:
        path = spec.token_variable
        answer = await self.call("PUT", f"/v1/var/{path}", json_body={"Path": path, "Items": {"token": TOKEN}})
        assert answer.status == 200, answer

    async def register(self, spec: SandboxJobSpec, name: str) -> Exchange:
        return await self.call("POST", f"/v1/job/{spec.job_id}", json_body=create_sandbox_job(spec).to_api(),
                               name=name)

    async def static_job(self) -> None:
        """As the recorder's `live_static`: two static-port groups, scaling, stopping."""
        spec = recorded_spec("static_register", base_port=free_port_block(2))
        job = spec.job_id
        await self.put_token(spec)
        await self.register(spec, "static_register")
        allocs = await self.running(job, 2)
        await self.call("POST", f"/v1/job/{job}/scale", name="error_scale_during_deployment",
                        json_body={"Count": 0, "Target": {"Group": "sandbox-1"}, "Message": "too early"})
        await self.call("GET", f"/v1/job/{job}/allocations", name="static_allocations")
        await self.call("GET", f"/v1/allocation/{allocs[0]['ID']}", name="static_allocation")
        await self.call("GET", f"/v1/allocation/{allocs[1]['ID']}", name="static_allocation_1")
        await self.call("GET", f"/v1/job/{job}", name="static_job")
        await self.call("GET", f"/v1/job/{job}/evaluations", name="static_evaluations")
        await self.call("GET", "/v1/jobs", params={"prefix": "rec-", "meta": "true"}, name="jobs_list")
        await self.replay("error_scale_over_max")
        await self.replay("error_scale_unknown_group")
        await self.scale(job, load("static_scale")["request"], "static_scale")
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

    async def dynamic_job(self) -> None:
        """As the recorder's `live_dynamic`: one group with a dynamic port, scaled to two."""
        spec = recorded_spec("dynamic_register")
        job = spec.job_id
        await self.put_token(spec)
        await self.register(spec, "dynamic_register")
        allocs = await self.running(job, 1)
        await self.call("GET", f"/v1/job/{job}", name="dynamic_job")
        await self.call("GET", f"/v1/allocation/{allocs[0]['ID']}", name="dynamic_allocation")
        await self.scale(job, load("dynamic_scale")["request"], "dynamic_scale")
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


def _recorded_json_request(name: str) -> Any:
    """The JSON body the recorder sent with a bodyless-recorded exchange (errors), rebuilt."""
    requests: dict[str, Any] = {
        "error_scale_unknown_job": {"Count": 1, "Target": {"Group": "sandbox"}},
        "error_scale_over_max": {"Count": 2, "Target": {"Group": "sandbox-1"}, "Message": "over max"},
        "error_scale_unknown_group": {"Count": 1, "Target": {"Group": "no-such-group"}, "Message": "unknown"},
        "error_register_id_mismatch": {"Job": {"ID": "other"}},
        "error_register_no_groups": {"Job": {"ID": "bad", "Name": "bad", "TaskGroups": []}},
        "error_register_invalid_job": invalid_job_body(),
    }
    return requests.get(name)


def invalid_job_body() -> dict[str, Any]:
    """The recorder's invalid job: an unknown driver, and a count over the group's scaling Max."""
    body = create_sandbox_job(SandboxJobSpec(job_id="bad", token=TOKEN, owner=None)).to_api()
    body["Job"]["TaskGroups"][0]["Tasks"][0]["Driver"] = "no-such-driver"
    body["Job"]["TaskGroups"][0]["Count"] = 2
    return body


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
