"""Read a jobspec written by `atropos.nomad.hcl.render_job_hcl` back into Nomad's JSON form, with
python-hcl2 (a dev dependency): the tests' round trip of the renderer. The product only writes HCL."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from atropos.nomad.hcl import JOB_SHAPE, Field, HclError, parse_duration


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
    return {"ID": _unescape(job_id), **_read_body(body, JOB_SHAPE)}


def _read_body(body: Mapping[str, Any], shape: tuple[Field, ...]) -> dict[str, Any]:
    by_hcl: dict[str, list[Field]] = {}
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


def _read_value(field: Field, value: Any) -> Any:
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


def _read_ports(out: dict[str, Any], value: list[Mapping[str, Any]], fields: list[Field]) -> None:
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
