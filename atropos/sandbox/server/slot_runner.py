"""Server-side handle of one slot: its runner process, the RPC to it, ordering and reset."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from atropos.host import command_line, kill_child_tree, snapshot, tree_members
from atropos.images.roots import ImageRoot
from atropos.sandbox.image_slots import SlotImage, host_python
from atropos.sandbox.rootfs import RUNNER_BINARY
from atropos.sandbox.runner.files import empty_dir
from atropos.sandbox.runner.pathsafe import WORKSPACE_ALIAS
from atropos.sandbox.runner.protocol import (
    HibernateOp,
    HibernateOutcome,
    ListenOp,
    ListenOutcome,
    Op,
    Outcome,
    PingOp,
    ResetOp,
    ResetOutcome,
    ToolOp,
    add_note,
    prepend_error,
    request_line,
)
from atropos.sandbox.runner.rlimits import describe_limit
from atropos.sandbox.runner.session import SESSION_RESTARTED
from atropos.sandbox.server.bridges import BridgeError, Bridges
from atropos.sandbox.server.cgroups import SlotCgroup
from atropos.sandbox.server.isolation import Fork
from atropos.sandbox.server.snapshots import Snapshot, copy_root
from atropos.sandbox.server.starts import StartKind, Starts

log = logging.getLogger("atropos.sandbox")

# the runner enforces a call's timeout itself; the server gives it this long on top before it
# declares the runner hung and replaces it
RUNNER_GRACE = 10.0


ChunkSink = Callable[[dict[str, str]], None]  # {"stream": "stdout" | "stderr", "data": text}

_WAKE = b"\n"  # the line a hibernated runner's holder waits for (atropos.sandbox.runner.hibernate)


class SlotFailure(RuntimeError):
    """The slot's runner failed (died, hung, or was reset mid-call): not the command's failure."""


class SlotReset(SlotFailure):
    pass


def _expire(fut: asyncio.Future[Any]) -> None:
    """A runner's answer that did not come in time."""
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


class SlotRunner:
    def __init__(
        self,
        index: int,
        workspace: str,
        command: Callable[[Fork | None, SlotImage | None], list[str]],
        env: dict[str, str],
        cgroup: SlotCgroup | None = None,
        overlay_work: str | None = None,
        image_layer: str | None = None,
        own_network: bool = False,
        *,
        starts: Starts,
    ) -> None:
        self.index = index
        self.starts = starts  # the server's: how many start at once, and which calls wait for them
        self.cgroup = cgroup
        self.workspace = workspace
        self._command = command
        self._env = env
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._chunks: dict[int, ChunkSink] = {}  # request id -> where a streamed call's output goes
        self._ids = itertools.count(1)
        self._start_lock = asyncio.Lock()
        self.order = asyncio.Lock()  # a slot's calls run one after another, in arrival order
        self.generation = 0
        self.busy = 0
        self.running: tuple[str, float] | None = None  # (tool, monotonic start) of the call that runs now
        self.finished = 0
        self._session_lost = False  # the runner died on its own: the next session call says so
        self.used = False  # a call ran since the runner started or the slot was last reset
        self.on_change: Callable[[], None] = lambda: None  # a runner started or died, or a warm slot was used
        # forks (atropos.sandbox.server.snapshots): with `overlay_work` the workspace becomes an
        # overlay on the snapshot (`fork` set until the next reset), else a copy of it
        self.overlay_work = overlay_work
        self.fork: Fork | None = None
        self.forked_from: str | None = None  # the snapshot's name, until the next reset
        # a task's image (atropos.sandbox.image_slots), until the next reset: its root, with the slot's
        # own layer in `image_layer`; `_release_image` lets the image cache evict it again
        self.image_layer = image_layer
        self.image: SlotImage | None = None
        self._release_image: Callable[[], None] = lambda: None
        self._view_pid: tuple[int, int] | None = None  # (sandbox pid, runner's host pid)
        self._starting: asyncio.Future[None] | None = None  # a fork's sandbox, started ahead
        self._launching: asyncio.subprocess.Process | None = None  # a sandbox started, its runner not up yet
        self._closed = False  # the server stops: no sandbox starts any more
        # hibernation (atropos.sandbox.server.hibernation): while `_hibernating` is set nothing else
        # is written to the runner (what it has not read when it execs would be lost)
        self.idle_since = time.monotonic()
        self.hibernated = False
        self._hibernating: asyncio.Future[None] | None = None
        self._wake_lock = asyncio.Lock()
        # bridges (atropos.sandbox.server.bridges), until the next reset; a slot that shares the
        # node's network (`own_network` false) needs none: it reaches the node's loopback itself
        self.own_network = own_network
        self.bridges = Bridges(index)
        self._bridges_lost = ""  # the ports of bridges a runner's death closed: the next call says so

    @property
    def started(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def starting(self) -> bool:
        """Its sandbox is spawned and its runner has not said it is up yet."""
        return self._launching is not None

    @property
    def warm(self) -> bool:
        """Started and unused: its next call does not wait for a sandbox to start."""
        return self.started and not self.used

    async def warm_up(self) -> None:
        """Start the runner ahead of the slot's first call (see atropos.sandbox.server.warm)."""
        await self._ensure_runner()

    async def _ensure_runner(self, how: StartKind = StartKind.AHEAD) -> asyncio.subprocess.Process:
        """The slot's runner, started now if it is not running; a start `FOR_A_CALL` holds back
        the server's other calls meanwhile (atropos.sandbox.server.starts)."""
        async with self._start_lock:
            if self._proc is not None and self._proc.returncode is None:
                return self._proc
            async with self.starts.start(how):
                return await self._start_runner()

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise SlotFailure(f"slot {self.index}: the server is stopping; no sandbox starts")

    async def _start_runner(self) -> asyncio.subprocess.Process:
        self._refuse_if_closed()
        proc = await asyncio.create_subprocess_exec(
            *self._command(self.fork, self.image),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self._env if self.image is None else {**self._env, **self.image.image.environment},
            start_new_session=True,
            limit=256 * 1024 * 1024,
        )
        self._launching = proc  # until its first line: close() ends it (a start that hangs holds up no stop)
        try:
            self._refuse_if_closed()  # closed while it was being spawned
            return await self._hello(proc)
        except BaseException:  # cancelled (the server stopping mid-start) or failed: no orphan left
            await self._stop_started(proc)
            raise
        finally:
            self._launching = None

    async def _stop_started(self, proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.shield(proc.wait())

    async def _hello(self, proc: asyncio.subprocess.Process) -> asyncio.subprocess.Process:
        """The runner's first line: it is up."""
        assert proc.stdout is not None
        hello = await proc.stdout.readline()
        if not hello:
            await proc.wait()
            raise SlotFailure(f"slot {self.index}: the sandbox did not start (exit {proc.returncode})")
        self._proc = proc
        self.hibernated = False
        self._reader = asyncio.ensure_future(self._read_answers(proc))
        self.on_change()
        return proc

    async def _read_answers(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                break
            msg = json.loads(line)
            if "chunk" in msg:  # a streamed call's output, before its result
                sink = self._chunks.get(msg.get("id") or -1)
                if sink is not None:
                    sink(msg["chunk"])
                continue
            fut = self._pending.pop(msg.get("id") or -1, None)
            if fut is None or fut.done():
                continue
            if "error" in msg:
                fut.set_exception(SlotFailure(f"slot {self.index}: runner error: {msg['error']}"))
            else:
                fut.set_result(msg["result"])
        await proc.wait()
        if self._proc is proc and self.used:  # died on its own with calls behind it (a warm one had none)
            self._session_lost = True
        if self._proc is proc and self.bridges.ports:  # their listeners were in the namespace that died
            self._bridges_lost = ", ".join(f"127.0.0.1:{port}" for port in self.bridges.ports)
            await self.bridges.close()
        self.on_change()
        self._fail_pending(
            SlotFailure(f"slot {self.index}: the sandbox exited ({proc.returncode}); it restarts on the next call")
        )

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    async def call(self, request: Op, on_chunk: ChunkSink | None = None) -> Any:
        """The runner's answer to `request` (an Outcome for a tool call; see runner.protocol);
        a streamed command's output pieces go to `on_chunk` meanwhile."""
        timeout = request["timeout"]
        proc = await self._ensure_runner(StartKind.FOR_A_CALL)
        assert proc.stdin is not None
        if request["op"] != "hibernate":
            await self._awake(proc)  # no await from here to the write below
        rid = next(self._ids)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending[rid] = fut
        if on_chunk is not None:
            self._chunks[rid] = on_chunk
        proc.stdin.write(request_line(rid, request))
        # the answer's own deadline on its future: wait_for with a shield cost each call three more
        # turns of the event loop (a waiter, a shield, their callbacks)
        deadline = loop.call_later(timeout + RUNNER_GRACE, _expire, fut)
        try:
            await proc.stdin.drain()
            return await fut
        except asyncio.TimeoutError:
            log.error("slot %d: runner did not answer within %.0fs; replacing it", self.index, timeout + RUNNER_GRACE)
            await self.kill_runner()
            raise SlotFailure(f"slot {self.index}: the sandbox stopped answering; it was restarted") from None
        except (BrokenPipeError, ConnectionResetError):
            raise SlotFailure(f"slot {self.index}: the sandbox exited; it restarts on the next call") from None
        finally:
            deadline.cancel()
            self._pending.pop(rid, None)
            self._chunks.pop(rid, None)

    async def _awake(self, proc: asyncio.subprocess.Process) -> None:
        """Returns when `proc` reads requests: a hibernation under way has ended, and a hibernated
        runner has its wake line (written before the caller's request)."""
        while self._hibernating is not None:
            await asyncio.shield(self._hibernating)
        if not self.hibernated:
            return
        async with self._wake_lock:
            if not self.hibernated or self._proc is not proc:
                return
            assert proc.stdin is not None
            proc.stdin.write(_WAKE)
            self.hibernated = False

    @property
    def sleepable(self) -> bool:
        """Used, started, and nothing of it runs or waits: hibernation may be asked for."""
        return (
            self.started
            and self.used
            and not self.hibernated
            and self.busy == 0
            and not self.order.locked()
            and not self._pending
            and self._hibernating is None
            and (self._starting is None or self._starting.done())
        )

    async def hibernate(self) -> bool:
        """Ask the runner to sleep (atropos.sandbox.runner.hibernate); False when the slot is not
        idle or the runner said why not. The next call wakes it."""
        if not self.sleepable:
            return False
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hibernating = done
        proc = self._proc
        try:
            answer: HibernateOutcome = await self.call(HibernateOp(op="hibernate", timeout=5.0))
            if not answer.get("ok") or proc is None or self._proc is not proc:
                log.debug("slot %d stays awake: %s", self.index, answer.get("why"))
                return False
            self.hibernated = True
            log.info("event=hibernated slot=%d", self.index)
            return True
        except SlotFailure:
            return False
        finally:
            self._hibernating = None
            done.set_result(None)

    @contextlib.asynccontextmanager
    async def holding(self, what: str) -> AsyncIterator[int]:
        """The slot to one operation (a tool call, a tree transfer), in arrival order with the others;
        yields the reset generation it began in (see `check_not_reset`)."""
        self.busy += 1
        if not self.used:
            self.used = True
            self.on_change()  # one warm slot fewer
        try:
            async with self.order:
                self.running = (what, time.monotonic())
                try:
                    yield self.generation
                finally:
                    self.running = None
                    self.finished += 1
                    self.idle_since = time.monotonic()
        finally:
            self.busy -= 1

    def check_not_reset(self, generation: int) -> None:
        if generation != self.generation:
            raise SlotReset(f"slot {self.index} was reset while the call ran")

    async def execute(self, op: ToolOp, on_chunk: ChunkSink | None = None) -> Outcome:
        begun = self.used  # a call ran in the slot since its start or reset: its trajectory has begun
        async with self.holding(op["op"]) as generation:
            if begun and self.starts.awaited and self.started:  # no start awaited: not even a coroutine
                await self.starts.turn()  # trajectories that have not begun go first
            try:
                result: Outcome = await self.call(op, on_chunk)
            except SlotFailure:
                self.check_not_reset(generation)  # a fork killed the runner under the call
                raise
            self.check_not_reset(generation)
            if self.cgroup is not None and self.cgroup.dirs:
                _note_cgroup_limit(result, self.cgroup)
            if op["op"] == "bash_session" and self._session_lost:
                self._session_lost = False
                add_note(result, SESSION_RESTARTED)
            if self._bridges_lost:
                add_note(
                    result, f"the sandbox restarted: its bridges ({self._bridges_lost}) are closed until opened again"
                )
                self._bridges_lost = ""
            _log_call(self.index, op, result)
            return result

    async def reset(self, timeout: float = 30.0) -> ResetOutcome:
        """Kill everything the slot started and empty its workspace; cuts a running call short."""
        self.generation += 1
        self._bridges_lost = ""
        await self.bridges.close()
        self._session_lost = False
        self.used = False  # clean again: warm if its runner lives
        self.forked_from = None
        if self.fork is not None or self.image is not None:  # overlays go with the sandbox that mounted them
            started = time.monotonic()
            async with self._start_lock:
                self.fork = None
                killed = await self.kill_runner()
                self._leave_image()
                await asyncio.to_thread(self._clear)
            self.on_change()
            return {"ok": True, "killed": killed, "duration_ms": (time.monotonic() - started) * 1000.0}
        if self._proc is None or self._proc.returncode is not None:
            # nothing runs in the slot: empty it without starting a sandbox just for that
            await asyncio.to_thread(_empty, self.workspace)
            return {"ok": True, "killed": 0, "duration_ms": 0.0}
        try:
            answer: ResetOutcome = await self.call(ResetOp(op="reset", timeout=timeout))
            return answer
        except SlotFailure:
            await self.kill_runner()  # a broken runner: the fresh one starts from an empty slot
            await asyncio.to_thread(_empty, self.workspace)
            return {"ok": True, "killed": 0, "duration_ms": 0.0}

    async def kill_runner(self) -> int:
        """Kill the sandbox and everything in it; how many processes died."""
        proc, self._proc = self._proc, None
        await self.bridges.close()  # their listeners live in the namespace that dies now
        if proc is None or proc.returncode is not None:
            return 0
        # without bubblewrap the runner's orphans are not in a PID namespace that dies with it
        killed = await kill_child_tree(proc)
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        return killed

    def _clear(self) -> None:
        _empty(self.workspace)
        for scratch in (self.overlay_work, self.image_layer):
            if scratch is not None and os.path.isdir(scratch):
                _empty(scratch)

    def _leave_image(self) -> None:
        self.image = None
        release, self._release_image = self._release_image, lambda: None
        release()

    async def use_image(self, image: ImageRoot, release: Callable[[], None], copy: bool = False) -> None:
        """Start over in `image`: everything the slot runs is killed, its workspace emptied, and its
        root becomes the image's under a fresh layer of its own (with `copy`, a copy of the image's
        root, where overlays cannot work); `release` is called when the slot leaves the image
        (reset, close). Its sandbox starts in the background, as a fork's does."""
        if self.image_layer is None:
            release()
            raise SlotFailure("a slot in a task's image needs bubblewrap, and this server runs without it")
        async with self._start_lock:
            try:
                await self._start_over()
                if copy:
                    root = os.path.join(self.image_layer, "root")
                    os.makedirs(root)
                    await asyncio.to_thread(copy_root, str(image.root), root)
            except BaseException:
                release()
                raise
            if copy:
                self.image, self._release_image = SlotImage(image, root, ""), release
            else:
                self._enter_image(image, (), release)
        self.on_change()
        self._starting = asyncio.ensure_future(self._start_quietly())

    async def fork_from(
        self, snapshot: Snapshot, copy: Callable[[str, str], object], release: Callable[[], None]
    ) -> None:
        """Start over from `snapshot`: everything the slot runs is killed and its workspace emptied,
        then it is an overlay on the snapshot, or where overlays cannot work, `copy(snapshot,
        workspace)`; a snapshot of a slot in a task's image puts the slot in that image, on the
        snapshot's layers (`release` ends the slot's hold on the image). Its sandbox starts in the
        background: a fork is used soon, and its first call waits only for what is left of that start."""
        if snapshot.image is not None and self.image_layer is None:
            release()
            raise SlotFailure("a slot in a task's image needs bubblewrap, and this server runs without it")
        async with self._start_lock:  # no sandbox (a warm one, say) starts on a half-made workspace
            try:
                await self._start_over()
                if self.overlay_work is not None:
                    self.fork = Fork(snapshot.path, self.overlay_work)
                else:
                    await asyncio.to_thread(copy, snapshot.path, self.workspace)
            except BaseException:
                release()
                raise
            if snapshot.image is not None:
                self._enter_image(snapshot.image, snapshot.layers, release)
            else:
                release()
            self.forked_from = snapshot.name
        self.on_change()
        self._starting = asyncio.ensure_future(self._start_quietly())

    async def _start_over(self) -> None:
        """Under the start lock: a new generation, nothing running, nothing of the last one kept."""
        self.generation += 1
        self._session_lost = False
        self.used = True
        self.fork = None
        self.forked_from = None
        await self.kill_runner()
        self._leave_image()
        await asyncio.to_thread(self._clear)

    def _enter_image(self, image: ImageRoot, layers: tuple[str, ...], release: Callable[[], None]) -> None:
        assert self.image_layer is not None
        upper, work = os.path.join(self.image_layer, "upper"), os.path.join(self.image_layer, "work")
        for path in (upper, work):
            os.makedirs(path, exist_ok=True)
        self.image, self._release_image = SlotImage(image, upper, work, layers), release

    async def _start_quietly(self) -> None:
        try:
            await self._ensure_runner()
        except Exception as exc:  # its first call tries again, and says why if it fails too
            log.warning("slot %d: the forked sandbox did not start ahead of its first call: %s", self.index, exc)

    async def view(self) -> str:
        """The workspace as the slot's commands see it, for the server's own tree operations: its
        dir, or for an overlay fork the merged view, through the root of the slot's runner."""
        if self.fork is None:
            return self.workspace
        proc = await self._ensure_runner()
        if self.hibernated or self._hibernating is not None:  # found by its command line: the runner's, awake
            await self.call(PingOp(op="ping", timeout=5.0))
        if self._view_pid is None or self._view_pid[0] != proc.pid:
            self._view_pid = (proc.pid, await asyncio.to_thread(_runner_pid, proc.pid))
        return f"/proc/{self._view_pid[1]}/root{WORKSPACE_ALIAS}"

    async def bridge(self, port: int, target: tuple[str, int]) -> int | None:
        """Open a bridge from the slot's 127.0.0.1:`port` to `target` (see atropos.sandbox.server.
        bridges); the slot's port, or None where the slot shares the node's network and needs none."""
        if not self.own_network:
            return None

        async def listen(channel: str) -> int:
            answer: ListenOutcome = await self.call(ListenOp(op="listen", port=port, channel=channel, timeout=10.0))
            return answer["port"]

        self.busy += 1  # no hibernation starts meanwhile: the runner is found by its command line
        try:
            proc = await self._ensure_runner()
            await self.call(PingOp(op="ping", timeout=5.0))  # awake (a hibernation under way ended first)
            runner = await asyncio.to_thread(_runner_pid, proc.pid)
            return await self.bridges.open(port, target, runner, listen)
        except SlotFailure as exc:
            raise BridgeError(str(exc)) from None
        finally:
            self.busy -= 1
            self.idle_since = time.monotonic()

    async def close(self) -> None:
        self._closed = True
        if self._launching is not None:  # its call fails now: the sandbox did not start
            await self._stop_started(self._launching)
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        await self.kill_runner()
        self._leave_image()
        if self.cgroup is not None:
            self.cgroup.remove()


def _log_call(slot: int, op: ToolOp, result: Outcome) -> None:
    """One line per call: what it came to, never its input at INFO (commands and files may hold
    secrets); the command text at DEBUG. `--log-level WARNING` turns these off."""
    if not log.isEnabledFor(logging.INFO):
        return
    log.info(
        "event=call slot=%d tool=%s ok=%s exit=%s duration_ms=%.1f truncated=%s timed_out=%s limit=%s",
        slot, op["op"], result.get("ok"), result.get("exit_code"), result.get("duration_ms", 0.0),
        result.get("truncated", False), result.get("timed_out", False), result.get("limit"),
    )  # fmt: skip
    if log.isEnabledFor(logging.DEBUG) and (op["op"] == "bash" or op["op"] == "bash_session"):
        log.debug("event=call_command slot=%d command=%r", slot, op["command"][:200])


def _note_cgroup_limit(result: Outcome, cgroup: SlotCgroup) -> None:
    """Say so in the result when the slot's cgroup killed a process or refused a fork since the last call."""
    hit = cgroup.new_events()
    if not hit or result.get("limit"):
        return
    kind = hit[0]
    result["limit"] = kind
    limit = describe_limit(kind, cgroup.values.get(kind))
    if result.get("ok"):  # the command itself succeeded: what hit the limit ran in the background
        add_note(result, f"processes of this slot were stopped: {limit} in the slot's processes together")
    else:
        prepend_error(result, f"stopped: {limit} in the slot's processes together")


def _runner_pid(sandbox: int) -> int:
    """The host pid of the runner below the sandbox process `sandbox` (its argv[0] is the compiled
    runner's copy, or this Python, or in a task's image the node's loader that runs it; bubblewrap's
    own command line holds the runner's too, after its options)."""
    python = os.path.realpath(sys.executable)
    own = (RUNNER_BINARY, host_python().prefix[0])
    for pid in sorted(tree_members(sandbox, snapshot(), include_root=False)):
        argv = command_line(pid).split(" ")
        if argv and argv[0] and (argv[0] in own or os.path.realpath(argv[0]) == python):
            return pid
    raise SlotFailure(f"sandbox {sandbox}: its runner process is not found")


def _empty(workspace: str) -> None:
    if os.path.isdir(workspace):
        empty_dir(workspace)
