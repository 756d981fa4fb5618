"""Render a job (Nomad's JSON form) as an HCL2 jobspec, and read such a jobspec back.

One table (`JOB_SHAPE`) states, for every JSON key the builder emits, its HCL name and how it is written:
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

__all__ = ["JOB_SHAPE", "Field", "HclError", "format_duration", "parse_duration", "render_job_hcl"]

Kind = Literal["value", "duration", "map", "config", "block", "blocks", "labeled", "ports"]


class HclError(ValueError):
    pass


@dataclass(frozen=True)
class Field:
    """One key of a jobspec: its JSON name, its HCL name and how it is written (the shape tables
    below are the jobspec's grammar, shared by `render_job_hcl` and the tests' reader)."""

    json: str
    hcl: str
    kind: Kind = "value"
    shape: tuple[Field, ...] = ()
    label: str = "Name"  # for `labeled`: the JSON key that becomes the block label


_CONSTRAINT = (Field("LTarget", "attribute"), Field("Operand", "operator"), Field("RTarget", "value"))
_RESTART = (
    Field("Attempts", "attempts"),
    Field("Interval", "interval", "duration"),
    Field("Delay", "delay", "duration"),
    Field("Mode", "mode"),
)
_RESCHEDULE = (
    Field("Attempts", "attempts"),
    Field("Interval", "interval", "duration"),
    Field("Delay", "delay", "duration"),
    Field("DelayFunction", "delay_function"),
    Field("MaxDelay", "max_delay", "duration"),
    Field("Unlimited", "unlimited"),
)
_UPDATE = (
    Field("MaxParallel", "max_parallel"),
    Field("HealthCheck", "health_check"),
    Field("MinHealthyTime", "min_healthy_time", "duration"),
    Field("HealthyDeadline", "healthy_deadline", "duration"),
    Field("ProgressDeadline", "progress_deadline", "duration"),
    Field("AutoRevert", "auto_revert"),
    Field("AutoPromote", "auto_promote"),
    Field("Canary", "canary"),
    Field("Stagger", "stagger", "duration"),
)
_PORT = (Field("Value", "static"), Field("To", "to"), Field("HostNetwork", "host_network"))
_NETWORK = (
    Field("Mode", "mode"),
    Field("ReservedPorts", "port", "ports", _PORT, label="Label"),
    Field("DynamicPorts", "port", "ports", _PORT, label="Label"),
)
_CHECK = (
    Field("Name", "name"),
    Field("Type", "type"),
    Field("Path", "path"),
    Field("Interval", "interval", "duration"),
    Field("Timeout", "timeout", "duration"),
)
_SERVICE = (
    Field("Name", "name"),
    Field("Provider", "provider"),
    Field("PortLabel", "port"),
    Field("Tags", "tags"),
    Field("Checks", "check", "blocks", _CHECK),
)
_SCALING = (Field("Enabled", "enabled"), Field("Min", "min"), Field("Max", "max"))
_RESOURCES = (Field("CPU", "cpu"), Field("MemoryMB", "memory"), Field("MemoryMaxMB", "memory_max"))
_TEMPLATE = (
    Field("EmbeddedTmpl", "data"),
    Field("DestPath", "destination"),
    Field("ChangeMode", "change_mode"),
    Field("Perms", "perms"),
)
_TASK = (
    Field("Driver", "driver"),
    Field("Config", "config", "config"),
    Field("Templates", "template", "blocks", _TEMPLATE),
    Field("Env", "env", "map"),
    Field("Resources", "resources", "block", _RESOURCES),
    Field("KillSignal", "kill_signal"),
    Field("KillTimeout", "kill_timeout", "duration"),
    Field("Meta", "meta", "map"),
)
_GROUP = (
    Field("Count", "count"),
    Field("Constraints", "constraint", "blocks", _CONSTRAINT),
    Field("Networks", "network", "blocks", _NETWORK),
    Field("Services", "service", "blocks", _SERVICE),
    Field("RestartPolicy", "restart", "block", _RESTART),
    Field("ReschedulePolicy", "reschedule", "block", _RESCHEDULE),
    Field("Update", "update", "block", _UPDATE),
    Field("Scaling", "scaling", "block", _SCALING),
    Field("EphemeralDisk", "ephemeral_disk", "block", (Field("SizeMB", "size"),)),
    Field("ShutdownDelay", "shutdown_delay", "duration"),
    Field("Meta", "meta", "map"),
    Field("Tasks", "task", "labeled", _TASK),
)
JOB_SHAPE = (
    Field("Name", "name"),
    Field("Type", "type"),
    Field("Priority", "priority"),
    Field("Region", "region"),
    Field("Namespace", "namespace"),
    Field("NodePool", "node_pool"),
    Field("Datacenters", "datacenters"),
    Field("Constraints", "constraint", "blocks", _CONSTRAINT),
    Field("Update", "update", "block", _UPDATE),
    Field("Meta", "meta", "map"),
    Field("TaskGroups", "group", "labeled", _GROUP),
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
    _render_body(lines, job, JOB_SHAPE, 1, known={"ID"})
    lines.append("}")
    return "\n".join(lines) + "\n"


def _render_body(
    lines: list[str], obj: Mapping[str, Any], shape: tuple[Field, ...], depth: int, known: set[str] | None = None
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
    shape: tuple[Field, ...],
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
