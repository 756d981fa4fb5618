"""Wire models of the sandbox server's HTTP API (one source of truth for server and clients)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from atropos.sandbox.runner.protocol import BashOp, ReadFileOp, SessionOp, ToolOp, WriteFileOp

TOOLS: tuple[str, ...] = ("bash", "bash_session", "read_file", "write_file")

IsolationMode = Literal["bwrap", "none"]
# in force on a server (a server's `auto` has become one of these)
NetworkMode = Literal["public", "allow", "deny"]
ForkMode = Literal["overlay", "copy"]
RootMode = Literal["system", "image", "host", "none"]
RunnerMode = Literal["compiled", "python"]


def _json_integer(value: Any) -> Any:
    """JSON Schema's `integer` includes 2.0; a bool or a string is not one."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# integer fields of requests: strict (no "7" or false), but 2.0 counts, as JSON Schema says; the
# bounds come before the validator, or pydantic leaves them out of the JSON schema
SlotNumber = Annotated[int, Field(ge=0), BeforeValidator(_json_integer)]
ByteCount = Annotated[int, Field(ge=1), BeforeValidator(_json_integer)]
FileMode = Annotated[int, Field(ge=0, le=0o7777), BeforeValidator(_json_integer)]
PortNumber = Annotated[int, Field(ge=0, le=65535), BeforeValidator(_json_integer)]


class _Strict(BaseModel):
    # strict: `"slot": false` or `"mode": "7"` is refused, not coerced; JSON ints still fill floats
    model_config = ConfigDict(extra="forbid", strict=True)


# a NUL cannot be passed to a shell: refused as invalid input (422), said so in the document
_NO_NUL = r"^[^\x00]*$"


class _PlacedArgs(_Strict):
    cwd: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        pattern=_NO_NUL,
        description="Directory the command runs in: relative to the workspace, or absolute as the slot sees it; "
        "one that cannot be entered fails the command (exit status 1).",
    )
    env: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], Annotated[str, Field(pattern=_NO_NUL)]] = (
        Field(
            default_factory=dict,
            max_length=1024,
            description="Environment variables for this command alone (names: letters, digits, '_').",
            json_schema_extra={"additionalProperties": False},  # a name outside the pattern is refused
        )
    )

    def placed(self, op: BashOp | SessionOp) -> BashOp | SessionOp:
        """The runner's op with this call's `cwd` and `env`, where given."""
        if self.cwd is not None:
            op["cwd"] = self.cwd
        if self.env:
            op["env"] = dict(self.env)
        return op


class BashArgs(_PlacedArgs):
    command: str = Field(
        min_length=1, pattern=_NO_NUL, description="Shell command run by `bash -c` in the workspace (no NUL byte)."
    )


class SessionArgs(_PlacedArgs):
    command: str = Field(
        min_length=1,
        pattern=_NO_NUL,
        description="Command run in the slot's persistent bash session (no NUL byte); with `cwd` or `env` it runs "
        "in a subshell of the session, whose own directory and variables stay as they were.",
    )
    read_background: bool = Field(
        default=False,
        description="Also answer, in the result's `background`, what the session's background jobs printed since "
        "the last read (the newest 64 KiB); `true` as the command reads it without doing anything else.",
    )


class ReadFileArgs(_Strict):
    path: str = Field(min_length=1, description="Path relative to the workspace, or absolute inside it.")
    encoding: Literal["text", "base64"] = "text"
    max_bytes: ByteCount | None = Field(default=None, description="Refuse files larger than this.")


class WriteFileArgs(_Strict):
    path: str = Field(min_length=1)
    content: str = ""
    encoding: Literal["text", "base64"] = "text"
    mode: FileMode | None = Field(default=None, description="File mode, e.g. 493 for 0o755.")


TOOL_ARGS: dict[str, type[_Strict]] = {
    "bash": BashArgs,
    "bash_session": SessionArgs,
    "read_file": ReadFileArgs,
    "write_file": WriteFileArgs,
}


class _Call(_Strict):
    slot: SlotNumber = Field(description="Slot index, 0 .. slots-1.")
    timeout: float | None = Field(
        default=None, gt=0, le=86400, description="Seconds; the server's default when omitted."
    )
    stream: bool = Field(
        default=False,
        description='`/execute` only: answer NDJSON, `{"chunk": OutputChunk}` lines as a command writes '
        '(bash, bash_session), then `{"result": ExecuteResult}` (or `{"error": ...}`); ignored in a batch.',
    )


class ExecuteRequest(_Call):
    """What the server parses first; `args` is then checked against the tool's own model.

    The OpenAPI document describes this as a oneOf of the four `*Call` models below.
    """

    tool: str = Field(description="One of: bash, bash_session, read_file, write_file.")
    args: dict[str, Any] = Field(default_factory=dict)


class BashCall(_Call):
    tool: Literal["bash"]
    args: BashArgs

    def runner_op(self, timeout: float) -> ToolOp:
        return self.args.placed(BashOp(op="bash", command=self.args.command, timeout=timeout, stream=self.stream))


class SessionCall(_Call):
    tool: Literal["bash_session"]
    args: SessionArgs

    def runner_op(self, timeout: float) -> ToolOp:
        op = SessionOp(
            op="bash_session",
            command=self.args.command,
            timeout=timeout,
            stream=self.stream,
            read_background=self.args.read_background,
        )
        return self.args.placed(op)


class ReadFileCall(_Call):
    tool: Literal["read_file"]
    args: ReadFileArgs

    def runner_op(self, timeout: float) -> ToolOp:
        a = self.args
        return ReadFileOp(op="read_file", path=a.path, encoding=a.encoding, max_bytes=a.max_bytes, timeout=timeout)


class WriteFileCall(_Call):
    tool: Literal["write_file"]
    args: WriteFileArgs

    def runner_op(self, timeout: float) -> ToolOp:
        a = self.args
        return WriteFileOp(
            op="write_file", path=a.path, content=a.content, encoding=a.encoding, mode=a.mode, timeout=timeout
        )


ToolCall = BashCall | SessionCall | ReadFileCall | WriteFileCall
TOOL_CALLS: tuple[type[ToolCall], ...] = (BashCall, SessionCall, ReadFileCall, WriteFileCall)


def typed_call(call: ExecuteRequest) -> ToolCall:
    """The typed call of a parsed request; KeyError for an unknown tool, ValidationError (located
    in `args`) for arguments that do not fit the tool."""
    kind = _CALL_OF_TOOL[call.tool]
    args = TOOL_ARGS[call.tool].model_validate(call.args)
    # the parts are validated: the call is put together without validating them twice
    return kind.model_construct(slot=call.slot, timeout=call.timeout, stream=call.stream, tool=call.tool, args=args)


_CALL_OF_TOOL: dict[str, type[ToolCall]] = {
    "bash": BashCall,
    "bash_session": SessionCall,
    "read_file": ReadFileCall,
    "write_file": WriteFileCall,
}


class ExecuteResult(BaseModel):
    """Result of one tool call.

    `ok` is false when the command failed (non-zero exit, timeout) or the tool refused its input
    (`error` says why). Infrastructure failures are HTTP errors, never an `ExecuteResult`.
    """

    ok: bool
    output: str = Field(default="", description="What an agent sees: stdout, then stderr, or file text.")
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    timed_out: bool = False
    truncated: bool = False
    duration_ms: float = 0.0
    error: str | None = None
    limit: Literal["memory", "processes", "cpu_time", "file_size", "workspace"] | None = Field(
        default=None,
        description="The slot's resource limit that stopped the command (or that it ran into), if any.",
    )
    background: str | None = Field(
        default=None,
        description="bash_session with read_background: what the session's background jobs printed since the "
        "last read.",
    )
    infra_error: str | None = Field(
        default=None,
        description="Set only inside /batch results: the slot failed (not the command). Outside a "
        "batch such failures are HTTP errors.",
    )


class BatchRequest(_Strict):
    calls: list[ExecuteRequest] = Field(max_length=4096)


class BatchResponse(BaseModel):
    results: list[ExecuteResult]


class ResetRequest(_Strict):
    slot: SlotNumber


class ResetResponse(BaseModel):
    slot: int
    killed: int = Field(description="Processes the reset killed.")
    duration_ms: float


class OutputChunk(BaseModel):
    """A piece of a streamed command's output, as it came (the result still has all of it, bounded)."""

    stream: Literal["stdout", "stderr"]
    data: str


class SnapshotRequest(_Strict):
    slot: SlotNumber
    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="1-64 of A-Z a-z 0-9 . _ - (not starting with . _ -); default: a fresh one.",
    )


class SnapshotInfo(BaseModel):
    name: str
    source_slot: int
    created: float = Field(description="Unix time.")
    files: int
    bytes: int = Field(description="Bytes of file content it holds.")
    forks: list[int] = Field(default_factory=list, description="Slots forked from it since their last reset.")
    duration_ms: float | None = None
    image: str | None = Field(
        default=None,
        description="The task image its slot ran in (POST /image): its forks run in it, on the slot's writes over it.",
    )


class SnapshotList(BaseModel):
    snapshots: list[SnapshotInfo]


class ForkRequest(_Strict):
    snapshot: str
    slots: list[SlotNumber] = Field(min_length=1, description="Slots that start over from the snapshot.")


class ForkResponse(BaseModel):
    snapshot: str
    slots: list[int]
    mechanism: ForkMode
    duration_ms: float


class ImageRequest(_Strict):
    slot: SlotNumber
    image: str = Field(
        max_length=4096,
        # not \S: Python and JSON Schema's regexes disagree on which characters are spaces (\x85)
        pattern=r"^((docker://|docker-daemon:(//)?|docker-archive:|oci-archive:)[^\t\n\v\f\r ]|/[^\t\n\v\f\r ]*\.sif$)",
        description="docker://NAME:TAG (a registry, per --image-pull), docker-daemon://NAME:TAG, docker-archive:PATH, "
        "oci-archive:PATH or the path of a SIF file (paths on the server's node)",
    )


class ImageResponse(BaseModel):
    slot: int
    image: str
    image_id: str
    unpacked: bool = Field(description="this call unpacked it (false: the node had it)")
    copied: str | None = Field(
        default=None,
        description="why the slot's root is a copy of the image, not an overlay on it (overlays cannot be "
        "mounted in a slot here); None: an overlay",
    )
    duration_ms: float


class BridgeRequest(_Strict):
    slot: SlotNumber
    port: PortNumber = Field(default=0, description="the port on the slot's own 127.0.0.1; 0: a free one")
    to_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9.:_-]+$",
        description="the service's host, as the server's node reaches it",
    )
    to_port: PortNumber = Field(ge=1, description="the service's port")


class BridgeResponse(BaseModel):
    slot: int
    host: str = Field(description="connect to HOST:PORT inside the slot to reach the service")
    port: int
    direct: bool = Field(
        description="true: the slot shares the node's network (network `allow`, or no isolation) and reaches "
        "the service itself; nothing was opened"
    )


class UploadResult(BaseModel):
    """What `POST /upload` unpacked into the slot (all of the archive: a refused one leaves nothing)."""

    slot: int
    path: str
    files: int
    dirs: int
    symlinks: int
    hardlinks: int
    bytes: int = Field(description="Bytes of file content unpacked.")
    duration_ms: float


class Enforcement(BaseModel):
    """What a server enforces on every slot, as it found it could at start-up (no secrets)."""

    isolation: IsolationMode
    runner: RunnerMode = Field(
        description="The program in every slot that runs its calls: compiled (the static binary the package's "
        "build makes) or python (the fallback where it was not built, or asked for with --runner python)."
    )
    network: NetworkMode
    uid: int = Field(description="The uid slot processes run as, seen from outside the slot.")
    limits: dict[str, int | None] = Field(description="Per-slot limits (null: off).")
    cgroups: list[str] = Field(description="Limits also held by per-slot cgroups (memory, processes).")
    isolation_reason: str | None = Field(default=None, description="Why slots run without bubblewrap.")
    network_reason: str | None = Field(default=None, description="Why `auto` could not give slots `public`.")
    fork: ForkMode = Field(default="copy", description="How a fork gets its snapshot: an overlay, or a copy.")
    fork_reason: str | None = Field(default=None, description="Why forks copy instead of using an overlay.")
    root: RootMode = Field(
        default="none",
        description="What a slot's root file system holds: system (the node's system dirs and a curated /etc), "
        "image (the container's root minus its runtime's mounts), host (the node's whole root read-only), "
        "none (no sandbox: the node's file system as the server sees it).",
    )
    binds: list[str] = Field(default_factory=list, description="Declared binds every slot sees: `SRC[:DST] (ro|rw)`.")
    bwrap: str | None = Field(default=None, description="The bubblewrap binary slots start with, and why that one.")

    def describe(self) -> str:
        groups = ",".join(self.cgroups) or "none"
        binds = ",".join(self.binds) or "none"
        return (
            f"isolation={self.isolation} runner={self.runner} network={self.network} root={self.root} binds={binds} "
            f"slot_uid={self.uid} cgroups={groups} " + " ".join(f"limit_{k}={v}" for k, v in self.limits.items())
        )


class WarmState(BaseModel):
    target: int = Field(description="Slots the server keeps started ahead of their first call.")
    ready: int = Field(description="Slots started and unused now.")


class HibernationState(BaseModel):
    after_s: float = Field(description="Seconds after its last call before an idle slot sleeps; 0: never.")
    asleep: int = Field(description="Slots whose runner sleeps now; their next call wakes it.")


class HealthResponse(Enforcement):
    status: Literal["ok"] = "ok"
    version: str
    slots: int
    busy: int
    warm: WarmState | None = None
    hibernation: HibernationState | None = None
    images: list[str] = Field(
        default_factory=list, description="Task images this server has unpacked (POST /image), as they were named."
    )


class SlotActivity(BaseModel):
    """What one slot is doing now, as its server sees it (leases are the pool's: see `SlotPool.stats`)."""

    slot: int
    state: Literal["idle", "running"]
    tool: str | None = Field(default=None, description="The call that runs now.")
    running_s: float | None = Field(default=None, description="Seconds the running call has run.")
    queued: int = Field(description="Calls waiting behind it (a slot runs its calls one after another).")
    calls: int = Field(description="Calls this slot has finished since the server started.")
    asleep: bool = Field(default=False, description="Its runner hibernates; its next call wakes it.")
    starting: bool = Field(
        default=False,
        description="Its sandbox is coming up: spawned, its runner not answering yet (a slot that stays so has a "
        "start that hangs).",
    )
    image: str | None = Field(default=None, description="The task image it runs in (POST /image), until its reset.")
    bridges: dict[int, str] = Field(
        default_factory=dict,
        description="Open bridges (POST /bridge): its loopback port -> HOST:PORT.",
    )


class StatusResponse(HealthResponse):
    slot_activity: list[SlotActivity]


class ErrorResponse(BaseModel):
    error: str
    detail: Any = None
    stopping: bool = False
    """the server is shutting down: the slot goes with it (the pool's SlotLost, not SlotFailed)"""
