"""The sandbox server's HTTP API (aiohttp): auth, validation, and dispatch to slots."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from atropos import __version__
from atropos.images.errors import ImageError, ImageNotFoundError, InvalidReference
from atropos.images.roots import ImageRoot, RootCache
from atropos.sandbox.models import (
    TOOLS,
    BatchRequest,
    BatchResponse,
    BridgeRequest,
    BridgeResponse,
    Enforcement,
    ErrorResponse,
    ExecuteRequest,
    ExecuteResult,
    ForkRequest,
    ForkResponse,
    HealthResponse,
    HibernationState,
    ImageRequest,
    ImageResponse,
    ResetRequest,
    ResetResponse,
    SlotActivity,
    SnapshotInfo,
    SnapshotList,
    SnapshotRequest,
    StatusResponse,
    UploadResult,
    WarmState,
    typed_call,
)
from atropos.sandbox.runner.pathsafe import PathEscapeError
from atropos.sandbox.runner.protocol import Outcome, ToolOp
from atropos.sandbox.server.bridges import BridgeError
from atropos.sandbox.server.hibernation import Hibernation
from atropos.sandbox.server.hub import Hub
from atropos.sandbox.server.openapi import openapi_document
from atropos.sandbox.server.slot_runner import SlotFailure, SlotReset, SlotRunner
from atropos.sandbox.server.snapshots import Snapshot, SnapshotError, SnapshotStore, copy_snapshot
from atropos.sandbox.server.transfer import open_source, receive_tree, send_tree, upload_budget
from atropos.sandbox.server.warm import WarmSlots
from atropos.sandbox.streams import LoopReader, LoopWriter
from atropos.sandbox.tarsafe import MEDIA_TYPES, TreeLimits, TreeRefused, TreeTooLarge, compression_named

log = logging.getLogger("atropos.sandbox")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _has_lone_surrogate(data: Any) -> bool:
    """JSON may escape half a UTF-16 pair; such a string cannot reach a file name, a shell or a reply."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class ApiError(Exception):
    def __init__(self, status: int, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail


# how long an answer whose command died of an outside signal waits for the server's own stop
_SIGNAL_GRACE = 0.5


# exit codes of a command ended by SIGHUP, SIGINT, SIGKILL or SIGTERM: -N, or 128+N from a shell
_KILLED = frozenset(c for n in (1, 2, 9, 15) for c in (-n, 128 + n))


def _signalled(outcome: Outcome) -> bool:
    """The command was killed, not by its slot (a timeout's kill sets timed_out; a reset's raises)."""
    return outcome.get("exit_code") in _KILLED and not outcome.get("timed_out")


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(body=model.model_dump_json(), status=status, content_type="application/json")


class SandboxApp:
    def __init__(
        self,
        slots: list[SlotRunner],
        *,
        token: str,
        default_timeout: float,
        enforcement: Enforcement,
        max_body: int,
        warm_slots: int = 0,
        hibernate_after: float = 0.0,
        max_upload: int = 4 << 30,
        snapshots: SnapshotStore | None = None,
        images: RootCache | None = None,
        hub: Hub | None = None,
    ) -> None:
        self.slots = slots
        self.hub = hub  # network `public`: the namespace all slots' traffic leaves through
        self._hub_watch: asyncio.Task[None] | None = None
        self.images = images  # task images for slots in them (None: no bubblewrap, no image slots)
        self.held_images = images.held() if images is not None else {}  # reference -> image id
        self.warm = WarmSlots(slots, warm_slots)
        self.hibernation = Hibernation(slots, hibernate_after)
        self.token = token.encode()
        self.default_timeout = default_timeout
        self.enforcement = enforcement
        self.max_body = max_body
        self.max_upload = max_upload
        self.snapshots = snapshots
        self.stopping = False

    def build(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body, middlewares=[self._guarded])
        app.router.add_get("/health", self.health)
        app.router.add_post("/execute", self.execute)
        app.router.add_post("/batch", self.batch)
        app.router.add_post("/reset", self.reset)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/download", self.download)
        app.router.add_post("/snapshot", self.snapshot)
        app.router.add_get("/snapshots", self.list_snapshots)
        app.router.add_delete("/snapshots/{name}", self.delete_snapshot)
        app.router.add_post("/fork", self.fork)
        app.router.add_post("/image", self.image)
        app.router.add_post("/bridge", self.bridge)
        app.router.add_get("/status", self.status)
        app.router.add_get("/openapi.json", self.openapi)
        app.on_startup.append(self._start_warming)
        app.on_shutdown.append(self._close_slots)
        return app

    async def _start_warming(self, _app: web.Application) -> None:
        self.warm.start()
        self.hibernation.start()
        if self.hub is not None:
            self._hub_watch = asyncio.ensure_future(self.hub.watch())

    async def _close_slots(self, _app: web.Application) -> None:
        self.stopping = True  # the calls the closing slots end are failures of a server that goes
        await self.warm.stop()
        await self.hibernation.stop()
        await asyncio.gather(*(slot.close() for slot in self.slots), return_exceptions=True)
        if self.snapshots is not None:
            await asyncio.to_thread(self.snapshots.clear)  # they die with the server
        if self._hub_watch is not None:
            self._hub_watch.cancel()
            await asyncio.gather(self._hub_watch, return_exceptions=True)
        if self.hub is not None:
            self.hub.close()  # after the slots: nothing is linked to it any more

    @web.middleware
    async def _guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every request: its token checked (all but /health's), every failure answered in JSON. One
        middleware, not two: each costs a call's path a coroutine and aiohttp's wrapper of it."""
        try:
            if request.path != "/health":
                self._check_token(request)
            return await handler(request)
        except ApiError as exc:
            return _json(ErrorResponse(error=exc.message, detail=exc.detail), exc.status)
        except web.HTTPRequestEntityTooLarge as exc:
            return _json(ErrorResponse(error=f"request body too large (limit {self.max_body} bytes)"), exc.status)
        except web.HTTPException as exc:
            response = _json(ErrorResponse(error=exc.reason), exc.status)
            if "Allow" in exc.headers:  # a 405 must say which methods are allowed (RFC 9110)
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        except SlotReset as exc:
            return _json(ErrorResponse(error=str(exc)), 409)
        except SlotFailure as exc:
            log.warning("%s", exc)
            return _json(ErrorResponse(error=str(exc), stopping=self.stopping), 503)
        except Exception as exc:  # a bug of the server's: said in JSON like every error, its traceback logged
            log.exception("event=internal_error method=%s path=%s", request.method, request.path)
            what = f"internal error of the server on {request.method} {request.path}: {type(exc).__name__}: {exc}"
            return _json(ErrorResponse(error=what[:1000], stopping=self.stopping), 500)

    def _check_token(self, request: web.Request) -> None:
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        # surrogateescape: aiohttp keeps bytes that are not UTF-8 that way (they were a 500)
        given_token = value.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_token, self.token):
            raise ApiError(401, "missing or wrong bearer token")

    async def _body(self, request: web.Request, model: type[BaseModel]) -> Any:
        raw = await request.read()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"malformed JSON: {exc}") from None
        # a lone surrogate can only come from a \u escape (raw bytes that encode one are not UTF-8)
        if b"\\u" in raw and _has_lone_surrogate(data):
            raise ApiError(400, "malformed JSON: a \\uD800-\\uDFFF escape that is not part of a pair is not text")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise ApiError(422, "invalid request", _errors_of(exc)) from None

    def _prepare(self, call: ExecuteRequest) -> tuple[SlotRunner, ToolOp]:
        """The slot and the runner's request of one call; every refusal is an ApiError here."""
        slot = self._slot(call.slot)
        if call.tool not in TOOLS:
            raise ApiError(400, f"unknown tool {call.tool!r}; tools: {', '.join(TOOLS)}")
        try:
            typed = typed_call(call)
        except ValidationError as exc:
            raise ApiError(422, f"invalid args for {call.tool}", _errors_of(exc)) from None
        return slot, typed.runner_op(call.timeout or self.default_timeout)

    async def health(self, _request: web.Request) -> web.Response:
        busy = sum(1 for slot in self.slots if slot.busy)
        return _json(
            HealthResponse(
                version=__version__,
                slots=len(self.slots),
                busy=busy,
                warm=self._warm_state(),
                hibernation=self._hibernation_state(),
                images=sorted(self.held_images),
                **self.enforcement.model_dump(),
            )
        )

    def _hibernation_state(self) -> HibernationState:
        return HibernationState(after_s=self.hibernation.after, asleep=self.hibernation.asleep)

    def _warm_state(self) -> WarmState:
        return WarmState(target=self.warm.target, ready=self.warm.ready)

    async def status(self, _request: web.Request) -> web.Response:
        now = time.monotonic()
        activity = []
        for slot in self.slots:
            tool, since = slot.running if slot.running is not None else (None, None)
            activity.append(SlotActivity(
                slot=slot.index, state="running" if tool else "idle", tool=tool,
                running_s=round(now - since, 3) if since is not None else None,
                queued=max(slot.busy - (1 if tool else 0), 0), calls=slot.finished, asleep=slot.hibernated,
                starting=slot.starting,
                image=slot.image.image.ref if slot.image is not None else None,
                bridges={port: f"{host}:{to}" for port, (host, to) in slot.bridges.ports.items()},
            ))  # fmt: skip
        busy = sum(1 for slot in self.slots if slot.busy)
        return _json(
            StatusResponse(
                version=__version__, slots=len(self.slots), busy=busy, slot_activity=activity, warm=self._warm_state(),
                hibernation=self._hibernation_state(), images=sorted(self.held_images),
                **self.enforcement.model_dump(),
            )
        )  # fmt: skip

    def begin_stopping(self) -> None:
        """The server was told to stop (SIGTERM: scancel, a time limit, a scale-down). What its calls
        in flight come to is no longer theirs: the same signal may have reached their commands
        (SLURM signals every process of a job), so a result now could be a kill passed off as the
        command's own failure. They end as a stopping server's failure instead (the pool's SlotLost)."""
        self.stopping = True

    async def _stopped_meanwhile(self, outcomes: list[Outcome]) -> bool:
        """Whether the server began stopping before these calls' answers leave. A command killed by
        a signal it was not sent by its slot gets a moment first: the server's own stop signal may
        be on its way (the end of a SLURM job signals every process at once, in no set order)."""
        if not self.stopping and any(_signalled(o) for o in outcomes):
            await asyncio.sleep(_SIGNAL_GRACE)
        return self.stopping

    async def execute(self, request: web.Request) -> web.StreamResponse:
        call: ExecuteRequest = await self._body(request, ExecuteRequest)
        slot, op = self._prepare(call)
        if call.stream:
            return await self._execute_streamed(request, slot, op)
        outcome = await slot.execute(op)
        if await self._stopped_meanwhile([outcome]):
            raise SlotFailure(f"slot {slot.index}: the server is shutting down; the call's result is not kept")
        return _json(ExecuteResult.model_construct(**outcome))

    async def _execute_streamed(self, request: web.Request, slot: SlotRunner, op: ToolOp) -> web.StreamResponse:
        """NDJSON: `{"chunk": OutputChunk}` lines as the command writes, then `{"result": ...}`, or
        `{"error": ..., "status": N}` for what would have been an error status. A client that goes
        away stops getting lines; its command still ends by its own timeout at the latest."""
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        lines: asyncio.Queue[bytes | None] = asyncio.Queue()

        def on_chunk(chunk: dict[str, str]) -> None:
            lines.put_nowait(json.dumps({"chunk": chunk}, separators=(",", ":")).encode() + b"\n")

        async def send() -> None:
            gone = False
            while (line := await lines.get()) is not None:
                if not gone:
                    try:
                        await response.write(line)
                    except (ConnectionError, RuntimeError):
                        gone = True  # the client left: the rest is dropped

        sender = asyncio.ensure_future(send())
        final: dict[str, Any]
        try:
            outcome = await slot.execute(op, on_chunk)
            if await self._stopped_meanwhile([outcome]):
                raise SlotFailure(f"slot {slot.index}: the server is shutting down; the call's result is not kept")
            final = {"result": ExecuteResult.model_construct(**outcome).model_dump(mode="json")}
        except SlotReset as exc:
            final = {"error": str(exc), "status": 409}
        except SlotFailure as exc:
            final = {"error": str(exc), "status": 503, "stopping": self.stopping}
        lines.put_nowait(json.dumps(final, separators=(",", ":")).encode() + b"\n")
        lines.put_nowait(None)
        await sender
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
        return response

    async def batch(self, request: web.Request) -> web.Response:
        body: BatchRequest = await self._body(request, BatchRequest)
        # all validated before any runs; a batch answers once, with every result: `stream` is ignored
        prepared = [self._prepare(call.model_copy(update={"stream": False})) for call in body.calls]
        results: list[ExecuteResult | None] = [None] * len(prepared)
        by_slot: dict[int, list[int]] = {}
        for i, (slot, _) in enumerate(prepared):
            by_slot.setdefault(slot.index, []).append(i)

        async def run_slot(indices: list[int]) -> None:
            for i in indices:  # same slot: in order; different slots: concurrently
                slot, op = prepared[i]
                try:
                    outcomes[i] = await slot.execute(op)
                    results[i] = ExecuteResult.model_construct(**outcomes[i])
                except SlotFailure as exc:
                    results[i] = ExecuteResult(ok=False, infra_error=str(exc))

        outcomes: dict[int, Outcome] = {}
        await asyncio.gather(*(run_slot(idx) for idx in by_slot.values()))
        if await self._stopped_meanwhile(list(outcomes.values())):
            raise SlotFailure("the server is shutting down; the batch's results are not kept")
        return _json(BatchResponse(results=[r for r in results if r is not None]))

    async def reset(self, request: web.Request) -> web.Response:
        body: ResetRequest = await self._body(request, ResetRequest)
        slot = self._slot(body.slot)
        started = time.monotonic()
        result = await slot.reset()
        return _json(
            ResetResponse(
                slot=body.slot, killed=int(result.get("killed", 0)), duration_ms=(time.monotonic() - started) * 1000.0
            )
        )

    def _slot_of(self, request: web.Request, allowed: tuple[str, ...] = ("slot", "path")) -> tuple[SlotRunner, str]:
        """The slot and workspace path named by a transfer's query (`?slot=N&path=P`); any other
        parameter is refused, as the served document says (a misspelt one would be ignored)."""
        unknown = sorted(set(request.query) - set(allowed))
        if unknown:
            raise ApiError(400, f"unknown query parameter(s) {unknown}; this call takes {', '.join(allowed)}")
        raw = request.query.get("slot", "")
        if not (raw.isascii() and raw.isdigit()):  # "³".isdigit() holds, int() refuses it
            raise ApiError(400, "the query needs slot=N (a slot number)")
        return self._slot(int(raw)), request.query.get("path", ".")

    async def upload(self, request: web.Request) -> web.Response:
        """A tar stream (plain, gzip or zstd) unpacked into the slot's `path`, all or nothing."""
        slot, path = self._slot_of(request)
        body = LoopReader(request.content.read, asyncio.get_running_loop())
        started = time.monotonic()
        workspace_limit = self.enforcement.limits.get("workspace")
        async with slot.holding("upload") as generation:
            try:
                view = await slot.view()
                budget = await asyncio.to_thread(upload_budget, view, self.max_upload, workspace_limit)
                done = await asyncio.to_thread(receive_tree, view, path, body, TreeLimits(budget))
            except (TreeRefused, PathEscapeError, OSError) as exc:
                slot.check_not_reset(generation)  # a reset emptied the workspace under the upload
                await _discard_rest(request)
                raise _transfer_error(path, exc) from None
            slot.check_not_reset(generation)
        return _json(
            UploadResult(slot=slot.index, path=path, duration_ms=(time.monotonic() - started) * 1000.0, **vars(done))
        )

    async def download(self, request: web.Request) -> web.StreamResponse:
        """The slot's `path` as a tar stream, compressed as `?compression=` says (gzip by default)."""
        slot, path = self._slot_of(request, ("slot", "path", "compression"))
        try:
            compression = compression_named(request.query.get("compression", "gzip"))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        async with slot.holding("download"):
            try:
                source = await asyncio.to_thread(open_source, await slot.view(), path)
            except (PathEscapeError, OSError) as exc:
                raise _transfer_error(path, exc) from None
            response = web.StreamResponse(headers={"Content-Type": MEDIA_TYPES[compression]})
            await response.prepare(request)
            out = LoopWriter(response.write, asyncio.get_running_loop())
            try:
                await asyncio.to_thread(send_tree, source, out, compression)
            except (OSError, RuntimeError) as exc:
                # the answer has begun: all that can be said is that it is cut short (no end of archive)
                log.warning("slot %d: download of %r stopped after %d bytes: %s", slot.index, path, out.sent, exc)
                response.force_close()
                return response
            await response.write_eof()
            return response

    # -- snapshots and forks (atropos.sandbox.server.snapshots) --------------------------------

    def _store(self) -> SnapshotStore:
        if self.snapshots is None:
            raise ApiError(404, "this server keeps no snapshots")
        return self.snapshots

    def _slot(self, index: int) -> SlotRunner:
        if index >= len(self.slots):
            raise ApiError(404, f"unknown slot {index}: this server has slots 0..{len(self.slots) - 1}")
        return self.slots[index]

    def _info(self, snap: Snapshot, duration_ms: float | None = None) -> SnapshotInfo:
        forks = [slot.index for slot in self.slots if slot.forked_from == snap.name]
        return SnapshotInfo(
            name=snap.name, source_slot=snap.source_slot, created=snap.created, files=snap.files, bytes=snap.bytes,
            forks=forks, duration_ms=duration_ms, image=snap.image.ref if snap.image is not None else None,
        )  # fmt: skip

    async def snapshot(self, request: web.Request) -> web.Response:
        """Freeze a slot's workspace (not its processes) into a named snapshot on this server."""
        body: SnapshotRequest = await self._body(request, SnapshotRequest)
        store, slot = self._store(), self._slot(body.slot)
        name = body.name or f"snapshot-{uuid.uuid4().hex[:12]}"
        budget = self.enforcement.limits.get("workspace") or self.max_upload
        started = time.monotonic()
        async with slot.holding("snapshot") as generation:
            view = await slot.view()
            image, release = slot.image, _nothing
            if image is not None and image.copied:
                raise ApiError(
                    409,
                    f"a snapshot of a slot in a task's image needs overlays in a slot: {self.enforcement.fork_reason}",
                )
            if image is not None:  # the snapshot holds the image too: its layers stand on it
                release = await self._hold_image(image.image)
            try:
                snap = await asyncio.to_thread(store.create, name, slot.index, view, budget, image, release)
            except SnapshotError as exc:
                raise ApiError(exc.status, str(exc)) from None
            except (TreeRefused, OSError) as exc:
                slot.check_not_reset(generation)
                raise _transfer_error(".", exc) from None
            if generation != slot.generation:  # reset or forked while copied: not the state asked for
                await asyncio.to_thread(store.delete, name)
                slot.check_not_reset(generation)
        return _json(self._info(snap, (time.monotonic() - started) * 1000.0))

    async def list_snapshots(self, _request: web.Request) -> web.Response:
        return _json(SnapshotList(snapshots=[self._info(s) for s in self._store().all()]))

    async def delete_snapshot(self, request: web.Request) -> web.Response:
        store, name = self._store(), request.match_info["name"]
        try:
            snap = store.get(name)
        except SnapshotError as exc:
            raise ApiError(exc.status, str(exc)) from None
        standing = [slot.index for slot in self.slots if slot.forked_from == name and slot.fork is not None]
        if standing:
            raise ApiError(409, f"snapshot {name!r} is the lower layer of slots {standing}; reset them first")
        info = self._info(snap)
        await asyncio.to_thread(store.delete, name)
        return _json(info)

    async def fork(self, request: web.Request) -> web.Response:
        """Slots start over from a snapshot, each with a copy-on-write workspace of its own."""
        body: ForkRequest = await self._body(request, ForkRequest)
        store = self._store()
        try:
            snap = store.get(body.snapshot)
        except SnapshotError as exc:
            raise ApiError(exc.status, str(exc)) from None
        if len(set(body.slots)) != len(body.slots):
            raise ApiError(400, "a slot is named twice")
        targets = [self._slot(i) for i in body.slots]
        if snap.image is not None:
            self._check_image_slots(targets[0] if targets else None)
        started = time.monotonic()
        holds = [await self._hold_image(snap.image) if snap.image is not None else _nothing for _ in targets]
        await asyncio.gather(
            *(slot.fork_from(snap, copy_snapshot, hold) for slot, hold in zip(targets, holds, strict=True))
        )
        return _json(
            ForkResponse(
                snapshot=snap.name, slots=body.slots, mechanism=self.enforcement.fork,
                duration_ms=(time.monotonic() - started) * 1000.0,
            )
        )  # fmt: skip

    def _check_image_slots(self, slot: SlotRunner | None) -> RootCache:
        """The image cache, where a slot can run in a task's image here; else why not (409)."""
        if self.images is None or (slot is not None and slot.image_layer is None):
            raise ApiError(409, "slots in a task's image need bubblewrap, and this server runs without it")
        return self.images

    async def _hold_image(self, image: ImageRoot) -> Callable[[], None]:
        """A hold on an image in use (see RootCache.keep), and what ends it."""
        hold = contextlib.ExitStack()
        try:
            await asyncio.to_thread(hold.enter_context, self._check_image_slots(None).keep(image))
        except ImageError as exc:
            raise ApiError(409, str(exc)) from None
        return hold.close

    async def image(self, request: web.Request) -> web.Response:
        """A slot starts over in a task's image; the image is unpacked first if this node lacks it."""
        body: ImageRequest = await self._body(request, ImageRequest)
        slot = self._slot(body.slot)
        images = self._check_image_slots(slot)
        started = time.monotonic()
        said: list[str] = []
        hold = contextlib.ExitStack()
        try:
            image = await asyncio.to_thread(hold.enter_context, images.use(body.image, said.append))
        except InvalidReference as exc:
            raise ApiError(400, str(exc)) from None
        except ImageNotFoundError as exc:
            raise ApiError(404, str(exc)) from None
        except ImageError as exc:
            raise ApiError(422, str(exc)) from None
        for line in said:
            log.info("slot %d: %s", slot.index, line)
        self.held_images[image.ref] = image.image_id
        # the probe of forks: where an overlay cannot be mounted in a slot, the slot gets a copy
        copied = None if self.enforcement.fork == "overlay" else self.enforcement.fork_reason or "no overlays"
        try:
            await slot.use_image(image, hold.close, copy=copied is not None)
        except SlotFailure as exc:
            raise ApiError(409, str(exc)) from None
        unpacked = any("unpacked in" in line for line in said)
        if unpacked:  # the cache grew: the least recently used images no slot uses go past its limit
            for ref in await asyncio.to_thread(images.trim):
                self.held_images.pop(ref, None)
                log.info("image cache over its limit: evicted %s", ref)
        return _json(
            ImageResponse(
                slot=slot.index, image=image.ref, image_id=image.image_id,
                unpacked=unpacked, copied=copied,
                duration_ms=(time.monotonic() - started) * 1000.0,
            )
        )  # fmt: skip

    async def bridge(self, request: web.Request) -> web.Response:
        """A port of the slot's loopback relayed to a service this node reaches (server.bridges)."""
        body: BridgeRequest = await self._body(request, BridgeRequest)
        slot = self._slot(body.slot)
        try:
            port = await slot.bridge(body.port, (body.to_host, body.to_port))
        except BridgeError as exc:
            raise ApiError(409, str(exc)) from None
        if port is None:
            return _json(BridgeResponse(slot=slot.index, host=body.to_host, port=body.to_port, direct=True))
        return _json(BridgeResponse(slot=slot.index, host="127.0.0.1", port=port, direct=False))

    async def openapi(self, _request: web.Request) -> web.Response:
        return web.json_response(openapi_document())


_DISCARD_LIMIT = 64 << 20


def _nothing() -> None:
    pass


async def _discard_rest(request: web.Request) -> None:
    """Read what is left of a refused upload (up to a bound) so that the client, still sending,
    gets the answer rather than a reset connection."""
    left = _DISCARD_LIMIT
    with contextlib.suppress(Exception):
        while left > 0:
            chunk = await asyncio.wait_for(request.content.read(1 << 20), timeout=5.0)
            if not chunk:
                return
            left -= len(chunk)


def _transfer_error(path: str, exc: Exception) -> ApiError:
    if isinstance(exc, TreeTooLarge):
        return ApiError(413, str(exc))
    if isinstance(exc, (TreeRefused, PathEscapeError)):
        return ApiError(400, str(exc))
    if isinstance(exc, FileNotFoundError):
        return ApiError(404, f"{path}: no such directory in the slot")
    if isinstance(exc, NotADirectoryError):
        return ApiError(400, f"{path}: not a directory")
    assert isinstance(exc, OSError)
    return ApiError(507 if exc.errno == errno.ENOSPC else 500, f"{path}: {exc.strerror or exc}")


def _errors_of(exc: ValidationError) -> Any:
    """Where and why a body is invalid; never the input itself (it may be megabytes)."""
    return json.loads(exc.json(include_url=False, include_input=False))
