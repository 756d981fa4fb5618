"""The OpenAPI document of the sandbox server, generated from the wire models."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, get_args

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from atropos import __version__
from atropos.sandbox import models as m
from atropos.sandbox.tarsafe import COMPRESSIONS, MEDIA_TYPES

_REF = "#/components/schemas/{model}"


def _content(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}


def _op(
    summary: str, request: type[BaseModel] | None, response: type[BaseModel], *, auth: bool = True
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "OK", "content": _content(response)}},
    }
    if request is not None:
        op["requestBody"] = {"required": True, "content": _content(request)}
    if auth:
        op["security"] = [{"bearer": []}]
        for code, why in (
            ("400", "malformed JSON or unknown tool"),
            ("401", "missing or wrong token"),
            ("404", "unknown slot"),
            ("413", "body too large"),
            ("422", "invalid request"),
            ("409", "the slot was reset during the call"),
            ("503", "the slot's sandbox failed; not the command's failure"),
        ):
            op["responses"][code] = {"description": why, "content": _content(m.ErrorResponse)}
    return op


def _one_call_of_each_tool() -> dict[str, Any]:
    """ExecuteRequest as accepted: the tool name decides which arguments model applies."""
    calls = {get_args(call.model_fields["tool"].annotation)[0]: call.__name__ for call in m.TOOL_CALLS}
    return {
        "description": "One tool call: `args` as the tool's model says. An unknown tool gets a 400.",
        "oneOf": [{"$ref": _REF.format(model=name)} for name in calls.values()],
        "discriminator": {
            "propertyName": "tool",
            "mapping": {tool: _REF.format(model=name) for tool, name in calls.items()},
        },
    }


@lru_cache(maxsize=1)
def openapi_document() -> dict[str, Any]:
    all_models: list[type[BaseModel]] = [
        m.ExecuteRequest,
        m.ExecuteResult,
        m.BatchRequest,
        m.BatchResponse,
        m.ResetRequest,
        m.ResetResponse,
        m.HealthResponse,
        m.StatusResponse,
        m.SlotActivity,
        m.ErrorResponse,
        m.UploadResult,
        m.OutputChunk,
        m.SnapshotRequest,
        m.SnapshotInfo,
        m.SnapshotList,
        m.ForkRequest,
        m.ForkResponse,
        m.ImageRequest,
        m.ImageResponse,
        m.BridgeRequest,
        m.BridgeResponse,
        m.BashArgs,
        m.SessionArgs,
        m.ReadFileArgs,
        m.WriteFileArgs,
        *m.TOOL_CALLS,
    ]
    _, defs = models_json_schema([(model, "validation") for model in all_models], ref_template=_REF)
    schemas = defs.get("$defs", {})
    schemas["ExecuteRequest"] = _one_call_of_each_tool()
    return {
        "openapi": "3.1.0",
        "info": {"title": "atropos-sandbox server", "version": __version__},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/health": {
                "get": _op("Liveness, slot count, busy slots, isolation in force", None, m.HealthResponse, auth=False)
            },
            "/status": {"get": _op("What each slot runs now, and what the server enforces", None, m.StatusResponse)},
            "/execute": {"post": _execute()},
            "/batch": {
                "post": _op(
                    "Run tool calls concurrently across slots, in order per slot", m.BatchRequest, m.BatchResponse
                )
            },
            "/reset": {
                "post": _op("Kill everything a slot started and empty its workspace", m.ResetRequest, m.ResetResponse)
            },
            "/upload": {"post": _upload()},
            "/download": {"get": _download()},
            "/snapshot": {"post": _snapshot()},
            "/snapshots": {"get": _op("The server's snapshots, and the slots forked from each", None, m.SnapshotList)},
            "/snapshots/{name}": {"delete": _delete_snapshot()},
            "/fork": {
                "post": _op(
                    "Slots start over from a snapshot, each with a copy-on-write workspace",
                    m.ForkRequest,
                    m.ForkResponse,
                )
            },
            "/image": {
                "post": _op(
                    "A slot starts over in a task's image (unpacked on this node once), with a writable layer "
                    "of its own until its next reset",
                    m.ImageRequest,
                    m.ImageResponse,
                )
            },
            "/bridge": {
                "post": _op(
                    "A port on the slot's own loopback that reaches one service of the server's node's choosing "
                    "(a model server the agent program calls back); closed at the slot's next reset",
                    m.BridgeRequest,
                    m.BridgeResponse,
                )
            },
        },
    }


def _execute() -> dict[str, Any]:
    op = _op("Run one tool call in a slot", m.ExecuteRequest, m.ExecuteResult)
    op["responses"]["200"]["content"]["application/x-ndjson"] = {
        "schema": {"type": "string"},
        "description": 'With `stream: true`: one JSON object per line, `{"chunk": OutputChunk}` as the '
        'command writes, then `{"result": ExecuteResult}` or `{"error": text, "status": N}`.',
    }
    return op


def _snapshot() -> dict[str, Any]:
    op = _op("Freeze a slot's workspace (not its processes) into a named snapshot", m.SnapshotRequest, m.SnapshotInfo)
    op["responses"]["409"]["description"] = (
        "a snapshot of that name exists, the server holds --max-snapshots, or the slot was reset meanwhile"
    )
    return op


def _delete_snapshot() -> dict[str, Any]:
    op = _op("Delete a snapshot no overlay fork stands on", None, m.SnapshotInfo)
    op["parameters"] = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    op["responses"]["409"]["description"] = "slots forked from it (with an overlay) stand on it: reset them first"
    return op


_SLOT_AND_PATH = [
    {"name": "slot", "in": "query", "required": True, "schema": {"type": "integer", "minimum": 0}},
    {
        "name": "path",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "default": "."},
        "description": "A directory of the slot's workspace (relative, or under /workspace).",
    },
]


def _upload() -> dict[str, Any]:
    op = _op(
        "Unpack a tar stream (plain, gzip or zstd) into a directory of the slot, all or nothing",
        None,
        m.UploadResult,
    )
    op["parameters"] = _SLOT_AND_PATH
    op["requestBody"] = {
        "required": True,
        "description": "The archive; its type is told by its first bytes, whatever the Content-Type says.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
    op["responses"]["400"]["description"] = "a refused archive or path (nothing of it was kept)"
    op["responses"]["413"]["description"] = "over the upload's or the workspace's size limit"
    return op


def _download() -> dict[str, Any]:
    op = _op("A directory of the slot as a tar stream", None, m.ErrorResponse)
    op["parameters"] = [
        *_SLOT_AND_PATH,
        {"name": "compression", "in": "query", "required": False, "schema": {"enum": list(COMPRESSIONS)}},
    ]
    op["responses"]["200"] = {
        "description": "the tree, streamed",
        "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in MEDIA_TYPES.values()},
    }
    return op
