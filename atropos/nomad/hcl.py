"""Render a job (Nomad's JSON form) as an HCL2 jobspec, and read such a jobspec back.

One table (`_JOB`) states, for every JSON key the builder emits, its HCL name and how it is written:
a plain attribute, a duration (`"10s"` in HCL, nanoseconds in JSON), a map block (`env`, `meta`), a
free-form block (`config`), a nested block, a repeated block, a labelled block (`group "name"`), or
a network port (`ReservedPorts` entries are `port "http" { static = N }`, `DynamicPorts` entries
`port "http" { to = N }`). Rendering and reading both walk that table, so a key missing from it is an
error in both directions rather than a silently dropped field.

`${...}` references are written as they are: Nomad's HCL2 parser keeps references to undefined
variables (`${NOMAD_ALLOC_DIR}`, `${attr.kernel.name}`) intact for runtime interpolation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["HclError", "format_duration", "job_from_hcl_tree", "parse_duration", "parse_job_hcl", "render_job_hcl"]

Kind = Literal["value", "duration", "map", "config", "block", "blocks", "labeled", "ports"]


class HclError(ValueError):
    pass


@dataclass(frozen=True)
class _Field:
    json: str
    hcl: str
    kind: Kind = "value"
    shape: tuple[_Field, ...] = ()
    label: str = "Name"  # for `labeled`: the JSON key that becomes the block label


_CONSTRAINT = (_Field("LTarget", "attribute"), _Field("Operand", "operator"), _Field("RTarget", "value"))
_RESTART = (
    _Field("Attempts", "attempts"),
    _Field("Interval", "interval", "duration"),
    _Field("Delay", "delay", "duration"),
    _Field("Mode", "mode"),
)
_RESCHEDULE = (
    _Field("Attempts", "attempts"),
    _Field("Interval", "interval", "duration"),
    _Field("Delay", "delay", "duration"),
    _Field("DelayFunction", "delay_function"),
    _Field("MaxDelay", "max_delay", "duration"),
    _Field("Unlimited", "unlimited"),
)
_UPDATE = (
    _Field("MaxParallel", "max_parallel"),
    _Field("HealthCheck", "health_check"),
    _Field("MinHealthyTime", "min_healthy_time", "duration"),
    _Field("HealthyDeadline", "healthy_deadline", "duration"),
    _Field("ProgressDeadline", "progress_deadline", "duration"),
    _Field("AutoRevert", "auto_revert"),
    _Field("AutoPromote", "auto_promote"),
    _Field("Canary", "canary"),
    _Field("Stagger", "stagger", "duration"),
)
_PORT = (_Field("Value", "static"), _Field("To", "to"), _Field("HostNetwork", "host_network"))
_NETWORK = (
    _Field("Mode", "mode"),
    _Field("ReservedPorts", "port", "ports", _PORT, label="Label"),
    _Field("DynamicPorts", "port", "ports", _PORT, label="Label"),
)
_CHECK = (
    _Field("Name", "name"),
    _Field("Type", "type"),
    _Field("Path", "path"),
    _Field("Interval", "interval", "duration"),
    _Field("Timeout", "timeout", "duration"),
)
_SERVICE = (
    _Field("Name", "name"),
    _Field("Provider", "provider"),
    _Field("PortLabel", "port"),
    _Field("Tags", "tags"),
    _Field("Checks", "check", "blocks", _CHECK),
)
_SCALING = (_Field("Enabled", "enabled"), _Field("Min", "min"), _Field("Max", "max"))
_RESOURCES = (_Field("CPU", "cpu"), _Field("MemoryMB", "memory"), _Field("MemoryMaxMB", "memory_max"))
_TEMPLATE = (
    _Field("EmbeddedTmpl", "data"),
    _Field("DestPath", "destination"),
    _Field("ChangeMode", "change_mode"),
    _Field("Perms", "perms"),
)
_TASK = (
    _Field("Driver", "driver"),
    _Field("Config", "config", "config"),
    _Field("Templates", "template", "blocks", _TEMPLATE),
    _Field("Env", "env", "map"),
    _Field("Resources", "resources", "block", _RESOURCES),
    _Field("KillSignal", "kill_signal"),
    _Field("KillTimeout", "kill_timeout", "duration"),
    _Field("Meta", "meta", "map"),
)
_GROUP = (
    _Field("Count", "count"),
    _Field("Constraints", "constraint", "blocks", _CONSTRAINT),
    _Field("Networks", "network", "blocks", _NETWORK),
    _Field("Services", "service", "blocks", _SERVICE),
    _Field("RestartPolicy", "restart", "block", _RESTART),
    _Field("ReschedulePolicy", "reschedule", "block", _RESCHEDULE),
    _Field("Update", "update", "block", _UPDATE),
    _Field("Scaling", "scaling", "block", _SCALING),
    _Field("EphemeralDisk", "ephemeral_disk", "block", (_Field("SizeMB", "size"),)),
    _Field("ShutdownDelay", "shutdown_delay", "duration"),
    _Field("Meta", "meta", "map"),
    _Field("Tasks", "task", "labeled", _TASK),
)
_JOB = (
    _Field("Name", "name"),
    _Field("Type", "type"),
    _Field("Priority", "priority"),
    _Field("Region", "region"),
    _Field("Namespace", "namespace"),
    _Field("NodePool", "node_pool"),
    _Field("Datacenters", "datacenters"),
    _Field("Constraints", "constraint", "blocks", _CONSTRAINT),
    _Field("Update", "update", "block", _UPDATE),
    _Field("Meta", "meta", "map"),
    _Field("TaskGroups", "group", "labeled", _GROUP),
)

# ---------------------------------------------------------------------------------------- durations

_UNITS: tuple[tuple[str, int], ...] = (
    ("h", 3600 * 10**9),
    ("m", 60 * 10**9),
    ("s", 10**9),
    ("ms", 10**6),
    ("us", 10**3),
    ("ns", 1),
)
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def format_duration(ns: int) -> str:
    """Nanoseconds as a Go duration string in its largest exact unit (`300000000000` -> `"5m"`)."""
    if ns == 0:
        return "0s"
    for unit, size in _UNITS:
        if ns % size == 0:
            return f"{ns // size}{unit}"
    raise AssertionError("unreachable: every integer is a whole number of nanoseconds")


def parse_duration(text: str) -> int:
    """A Go duration string (`"1h30m"`, `"1.5s"`, `"250ms"`) as nanoseconds."""
    sizes = dict(_UNITS) | {"µs": 10**3}
    pos, total = 0, 0.0
    if text == "0":
        return 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise HclError(f"invalid duration {text!r}")
        total += float(match.group(1)) * sizes[match.group(2)]
        pos = match.end()
    if pos == 0:
        raise HclError(f"invalid duration {text!r}")
    return round(total)


# ------------------------------------------------------------------------------------------ render


def render_job_hcl(job: Mapping[str, Any]) -> str:
    """HCL2 jobspec text for a job in Nomad's JSON form (`Job.to_json()`)."""
    lines = [f"job {_string(job['ID'])} {{"]
    _render_body(lines, job, _JOB, 1, known={"ID"})
    lines.append("}")
    return "\n".join(lines) + "\n"


def _render_body(
    lines: list[str], obj: Mapping[str, Any], shape: tuple[_Field, ...], depth: int, known: set[str] | None = None
) -> None:
    fields = {f.json for f in shape} | (known or set())
    unknown = sorted(set(obj) - fields)
    if unknown:
        raise HclError(f"no HCL form for key(s) {unknown}")
    pad = "  " * depth
    for field in shape:
        value = obj.get(field.json)
        if value is None:
            continue
        if field.kind == "value":
            lines.append(f"{pad}{field.hcl} = {_literal(value)}")
        elif field.kind == "duration":
            lines.append(f"{pad}{field.hcl} = {_string(format_duration(int(value)))}")
        elif field.kind in ("map", "config"):
            _render_map(lines, field.hcl, value, depth)
        elif field.kind == "block":
            _render_block(lines, field.hcl, None, value, field.shape, depth)
        elif field.kind == "blocks":
            for item in value:
                _render_block(lines, field.hcl, None, item, field.shape, depth)
        else:  # labeled, ports
            for item in value:
                _render_block(lines, field.hcl, item[field.label], item, field.shape, depth, {field.label})


def _render_block(
    lines: list[str],
    name: str,
    label: str | None,
    obj: Mapping[str, Any],
    shape: tuple[_Field, ...],
    depth: int,
    known: set[str] | None = None,
) -> None:
    pad = "  " * depth
    head = f"{name} {_string(label)}" if label is not None else name
    lines.append(f"{pad}{head} {{")
    _render_body(lines, obj, shape, depth + 1, known)
    lines.append(f"{pad}}}")


def _render_map(lines: list[str], name: str, value: Mapping[str, Any], depth: int) -> None:
    pad = "  " * depth
    lines.append(f"{pad}{name} {{")
    for key, item in value.items():
        lines.append(f"{pad}  {_key(key)} = {_literal(item)}")
    lines.append(f"{pad}}}")


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def _key(key: str) -> str:
    return key if _IDENTIFIER.match(key) else _string(key)


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_literal(v)}" for k, v in value.items()) + " }"
    raise HclError(f"cannot write {type(value).__name__} value {value!r} in HCL")


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _string(text: str) -> str:
    body = "".join(_ESCAPES.get(ch, ch) for ch in text).replace("%{", "%%{")
    return f'"{body}"'


# -------------------------------------------------------------------------------------------- read


def parse_job_hcl(text: str) -> dict[str, Any]:
    """Read a jobspec written by `render_job_hcl` back into Nomad's JSON form (needs python-hcl2)."""
    try:
        import hcl2
        from hcl2.utils import SerializationOptions
    except ImportError as exc:  # pragma: no cover - dev extra
        raise HclError("reading HCL needs python-hcl2 (pip install python-hcl2)") from exc
    options = SerializationOptions(strip_string_quotes=True, with_comments=False)
    tree = hcl2.loads(text, serialization_options=options)
    return job_from_hcl_tree(tree)


def job_from_hcl_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nomad's JSON form of a jobspec parsed by python-hcl2 (quotes stripped)."""
    jobs = tree.get("job") or []
    if len(jobs) != 1:
        raise HclError(f"expected one job block, found {len(jobs)}")
    ((job_id, body),) = jobs[0].items()
    return {"ID": _unescape(job_id), **_read_body(body, _JOB)}


def _read_body(body: Mapping[str, Any], shape: tuple[_Field, ...]) -> dict[str, Any]:
    by_hcl: dict[str, list[_Field]] = {}
    for field in shape:
        by_hcl.setdefault(field.hcl, []).append(field)
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key.startswith("__"):
            continue
        fields = by_hcl.get(key)
        if not fields:
            raise HclError(f"unexpected HCL key {key!r}")
        if fields[0].kind == "ports":
            _read_ports(out, value, fields)
        else:
            out[fields[0].json] = _read_value(fields[0], value)
    return out


def _read_value(field: _Field, value: Any) -> Any:
    if field.kind == "value":
        return _plain(value)
    if field.kind == "duration":
        return parse_duration(value)
    if field.kind in ("map", "config"):
        return {k: _plain(v) for k, v in _single(value).items() if not k.startswith("__")}
    if field.kind == "block":
        return _read_body(_single(value), field.shape)
    if field.kind == "blocks":
        return [_read_body(item, field.shape) for item in value]
    return [
        {field.label: _unescape(label), **_read_body(item, field.shape)}
        for entry in value
        for label, item in entry.items()
    ]


def _read_ports(out: dict[str, Any], value: list[Mapping[str, Any]], fields: list[_Field]) -> None:
    """`port "l" { static = N }` is a ReservedPorts entry, any other `port` block a DynamicPorts one."""
    shape = fields[0].shape
    for entry in value:
        for label, item in entry.items():
            port = {"Label": _unescape(label), **_read_body(item, shape)}
            out.setdefault("ReservedPorts" if "Value" in port else "DynamicPorts", []).append(port)


def _single(value: Any) -> Mapping[str, Any]:
    if isinstance(value, list):
        if len(value) != 1:
            raise HclError(f"expected one block, found {len(value)}")
        value = value[0]
    if not isinstance(value, Mapping):
        raise HclError(f"expected a block, found {value!r}")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, str):
        return _unescape(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {_unescape(k): _plain(v) for k, v in value.items() if not k.startswith("__")}
    return value


def _unescape(text: str) -> str:
    """python-hcl2 decodes backslash escapes but leaves HCL's template escape `%%{` as written."""
    return text.replace("%%{", "%{")
