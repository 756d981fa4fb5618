"""Nomad's OpenAPI description (../shared/nomad/openapi.yaml) as a test contract.

Two checks, both needed: `schema_errors` validates types with jsonschema; `unknown_keys` walks the
instance along the schema (following `$ref`s) and reports every key the schema does not declare,
because Nomad's decoder silently drops unknown keys and the schemas do not forbid extra ones.
Keys newer than the spec (it stops at Nomad 1.7) are allowed by name in `SPEC_GAPS`, nothing else.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import jsonschema
import pytest
import yaml

from tests.nomad_fixtures import REPO

# (schema, key) pairs that exist in current Nomad but not in the spec.
SPEC_GAPS = frozenset(
    {
        ("Job", "NodePool"),  # node pools: Nomad 1.6
        ("Port", "IgnoreCollision"),  # Nomad 1.9
        ("JobListStub", "Meta"),  # `GET /v1/jobs?meta=true`
    }
)
# Endpoints the client uses that the spec does not describe at all.
UNDESCRIBED_ROUTES = frozenset({"/v1/agent/health", "/v1/client/fs/logs/{}", "/v1/client/fs/cat/{}"})


def spec_path() -> str:
    return os.environ.get("ATROPOS_NOMAD_OPENAPI") or os.path.join(
        os.path.dirname(REPO), "shared", "nomad", "openapi.yaml"
    )


@functools.lru_cache(maxsize=1)
def load_spec() -> dict[str, Any]:
    path = spec_path()
    if not os.path.exists(path):
        pytest.skip(f"Nomad OpenAPI description not found at {path} (set ATROPOS_NOMAD_OPENAPI)")
    with open(path, encoding="utf-8") as f:
        return dict(yaml.safe_load(f))


def _components() -> dict[str, Any]:
    return dict(load_spec()["components"])


def _resolve(schema: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    name = None
    while "$ref" in schema:
        ref = schema["$ref"]
        section, name = ref.split("/")[-2:]
        schema = _components()[section][name]
    return schema, name


def schema_errors(instance: Any, schema: dict[str, Any]) -> list[str]:
    """Type errors of `instance` against `schema` (which may be a `$ref`)."""
    document = {**schema, "components": _components()}
    validator = jsonschema.Draft7Validator(document)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(instance)]


def unknown_keys(instance: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys of `instance` (recursively) that `schema` does not declare, minus `SPEC_GAPS`."""
    schema, name = _resolve(schema)
    found: list[str] = []
    if isinstance(instance, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            where = f"{path}.{key}" if path else key
            if properties is not None and key in properties:
                found += unknown_keys(value, properties[key], where)
            elif properties is not None:
                if (name, key) not in SPEC_GAPS:
                    found.append(f"{where} (not a field of {name or 'the schema'})")
            elif isinstance(extra, dict) and extra:
                found += unknown_keys(value, extra, where)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            found += unknown_keys(item, schema["items"], f"{path}[{i}]")
    return found


def schema(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _normalise(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def response_schema(method: str, route: str, status: int = 200) -> dict[str, Any] | None:
    """The JSON schema the spec gives for `method route` (an aiohttp route such as
    `/v1/job/{job_id}`) answering `status`; None for a route the spec does not describe."""
    wanted = _normalise(route.removeprefix("/v1"))
    for path, operations in load_spec()["paths"].items():
        if _normalise(path) != wanted:
            continue
        operation = operations.get(method.lower())
        if operation is None:
            return None
        response, _ = _resolve(operation["responses"][str(status)])
        if "content" not in response:  # described, without a body (DELETE /var/{path}): nothing to check
            return {}
        return dict(response["content"]["application/json"]["schema"])
    return None
