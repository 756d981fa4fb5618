"""The slot runner: one long-lived process per slot, inside the slot's sandbox.

The server starts it once (under bubblewrap, or plainly with `--isolation none`) and sends it
requests as JSON lines on stdin; answers are JSON lines on stdout. Keeping the sandbox alive
and starting commands inside it is what makes an isolated command cost about as much as a plain
subprocess. Requests run concurrently, so `reset` can cut a running command short.

Protocol: `atropos.sandbox.runner.protocol` (one typed request per tool, JSON lines both ways).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from atropos.host import become_subreaper, die_with_parent, forbid_inspection, kill_tree
from atropos.host.background import Background
from atropos.sandbox.runner.bridge import listen_and_hand_over
from atropos.sandbox.runner.capture import Emit
from atropos.sandbox.runner.children import Children
from atropos.sandbox.runner.files import empty_dir, read_file, write_file
from atropos.sandbox.runner.hibernate import RESUME_FLAG, ResumeState, hold, stash, unstash, why_not
from atropos.sandbox.runner.oneshot import run_oneshot
from atropos.sandbox.runner.protocol import (
    BashOp,
    HibernateOp,
    LimitKind,
    ListenOp,
    ListenOutcome,
    Op,
    Outcome,
    PingOp,
    PingOutcome,
    ReadFileOp,
    ResetOp,
    ResetOutcome,
    SessionOp,
    WriteFileOp,
    add_note,
    placed_command,
    stopped_by,
)
from atropos.sandbox.runner.rlimits import RunnerLimits, describe_limit, limit_of_result
from atropos.sandbox.runner.session import BashSession
from atropos.sandbox.runner.watch import LimitWatch

_MAX_REQUEST = 256 * 1024 * 1024
_NICENESS = 5


_FREEING_ATTEMPTS = 40


class Runner:
    def __init__(
        self, root: str, cap: int, file_limit: int, limits: RunnerLimits | None = None, own_pid_namespace: bool = False
    ) -> None:
        self.root = root
        self.cap = cap
        self.file_limit = file_limit
        self.limits = limits or RunnerLimits()
        self.loop = asyncio.get_running_loop()
        # children inherit our cwd (the workspace) and our hard rlimits; CPU time is set per command
        self.children = Children(self.loop, dict(os.environ), prelude=self.limits.shell_prelude())
        self.session = BashSession(self.children)
        self.watch = LimitWatch(
            root,
            self.limits,
            own_pid_namespace=own_pid_namespace,
            kill_all=lambda: kill_tree(os.getpid(), include_root=False),
        )
        self.watch.start()
        self._session_lock = asyncio.Lock()
        self._out = sys.stdout.buffer
        self.inflight = 0

    def resume(self, state: ResumeState) -> None:
        """Take back what this runner held before it hibernated (see runner.hibernate)."""
        session = state["session"]
        if session is not None:
            for fd in (session["stdout"], session["stderr"], session["control"]):
                os.set_inheritable(fd, False)  # the runner's own, never a command's
            self.session.adopt(session)
        if state["session_lost"]:
            self.session.lost_earlier()
        self.session.background.restore(unstash(state["background"]), state["dropped"])
        self.watch.unreported = state["unreported"]
        self.watch.last_size = state["last_size"]

    def hibernate(self, rid: int | None) -> None:
        """Sleep as a holder process if nothing but the idle session shell lives in the slot; the
        answer goes out first, and nothing runs between it and the exec."""
        fds = self.session.fds()
        why = "another request is in flight" if self.inflight > 1 else why_not(fds["pid"] if fds else None)
        if why is not None:
            self.reply({"id": rid, "result": {"ok": False, "why": why}})
            return
        # nothing but the idle shell is left: what its background jobs wrote and the loop has not
        # read yet is background output. Read now, or the runner this one resumes as finds it in
        # the pipes and gives it to the next command (seen in CI as a background line lost)
        self.session.drain()
        data, dropped = self.session.background.held()
        state: ResumeState = {
            "session": fds,
            "session_lost": self.session.lost,
            "background": stash(data),
            "dropped": dropped,
            "unreported": self.watch.unreported,
            "last_size": self.watch.last_size,
        }
        self.reply({"id": rid, "result": {"ok": True}})
        try:
            hold(state)
        except OSError as exc:  # the server already counts us asleep: end, and the slot restarts
            print(f"runner: cannot hibernate: {exc}", file=sys.stderr, flush=True)
            os._exit(70)

    def reply(self, msg: dict[str, Any]) -> None:
        self._out.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
        self._out.flush()

    async def handle(self, req: Op, rid: int | None) -> None:
        self.inflight += 1
        try:
            if req["op"] == "hibernate":
                self.hibernate(rid)
            else:
                await self.answer(req, rid)
        finally:
            self.inflight -= 1

    async def answer(self, req: Op, rid: int | None) -> None:
        emit: Emit | None = None
        if (req["op"] == "bash" or req["op"] == "bash_session") and req.get("stream"):

            def emit(stream: str, text: str) -> None:
                self.reply({"id": rid, "chunk": {"stream": stream, "data": text}})

        try:
            result = await self.watched(req, emit)
        except Exception as exc:  # a bug here must not take the slot down
            self.reply({"id": rid, "error": f"{type(exc).__name__}: {exc}"})
            return
        self.reply({"id": rid, "result": result})

    async def watched(self, req: Op, emit: Emit | None = None) -> Outcome | ResetOutcome | PingOutcome | ListenOutcome:
        """Run the request while the limit watch looks on; a command's outcome then says what
        limit stopped it, or stopped its background processes since the last call."""
        trips = self.watch.trips
        self.watch.enter()
        try:
            if req["op"] == "bash" or req["op"] == "bash_session":
                outcome = await self.command_or_free(req, emit)
            else:
                return await self.dispatch(req)
        finally:
            self.watch.leave()
        self.note_limit(outcome, self.watch.tripped_since(trips) or limit_of_result(outcome))
        self.note_background_trip(outcome)
        return outcome

    def describe(self, kind: str) -> str:
        values = {
            "cpu_time": self.limits.cpu_seconds,
            "file_size": self.limits.file_size,
            "processes": self.limits.processes,
            "workspace": self.limits.workspace,
            "memory": self.limits.memory,
        }
        return describe_limit(kind, values.get(kind))

    def note_limit(self, result: Outcome, kind: LimitKind | None) -> None:
        """A command stopped by a limit says which one, in words an agent can act on."""
        if kind is not None:
            stopped_by(result, kind, self.describe(kind))

    def note_background_trip(self, result: Outcome) -> None:
        """Background processes killed between calls: the agent learns it from its next command."""
        kind = self.watch.take_unreported()
        if kind is None:
            return
        add_note(result, f"background processes of this slot were killed: {self.describe(kind)}")
        if result.get("limit") is None:
            result["limit"] = kind

    async def dispatch(
        self, req: ReadFileOp | WriteFileOp | ResetOp | PingOp | HibernateOp | ListenOp
    ) -> Outcome | ResetOutcome | PingOutcome | ListenOutcome:
        if req["op"] == "read_file":
            return read_file(self.root, req, self.file_limit)
        if req["op"] == "write_file":
            return write_file(self.root, req, self.file_limit)
        if req["op"] == "reset":
            return await self.reset()
        if req["op"] == "hibernate":
            raise ValueError("hibernate is answered by Runner.hibernate")
        if req["op"] == "listen":
            return {"ok": True, "port": listen_and_hand_over(req["port"], req["channel"])}
        return {"ok": True, "pid": os.getpid()}

    async def command_or_free(self, req: BashOp | SessionOp, emit: Emit | None) -> Outcome:
        try:
            return await self.command(req, emit)
        except BlockingIOError:
            return await self.command_after_freeing_processes(req, emit)

    async def command_after_freeing_processes(self, req: BashOp | SessionOp, emit: Emit | None) -> Outcome:
        """Fork refused: background processes fill the slot's process limit. They are killed (the
        result says so) and the command starts once their count has dropped."""
        self.watch.unreported = "processes"
        kill_tree(os.getpid(), include_root=False)  # inline: at the limit no thread can start either
        for _ in range(_FREEING_ATTEMPTS):
            self.children.reap()  # killed orphans count until reaped
            try:
                return await self.command(req, emit)
            except BlockingIOError:
                await asyncio.sleep(0.05)
        return {
            "ok": False,
            "error": "cannot start the command: the slot is at its process limit",
            "limit": "processes",
            "duration_ms": 0.0,
        }

    async def command(self, req: BashOp | SessionOp, emit: Emit | None = None) -> Outcome:
        timeout = float(req["timeout"] or 60.0)
        scoped = req["op"] == "bash_session"
        command = placed_command(req["command"], req.get("cwd"), req.get("env"), self.root, scoped=scoped)
        if req["op"] == "bash":
            return await run_oneshot(self.children, command, timeout=timeout, cap=self.cap, emit=emit)
        async with self._session_lock:
            return await self.session.run(
                command,
                timeout=timeout,
                cap=self.cap,
                emit=emit,
                read_background=bool(req.get("read_background")),
            )

    async def reset(self) -> ResetOutcome:
        started = time.monotonic()
        killed = self.session.close()
        killed += kill_tree(os.getpid(), include_root=False)
        self.children.reap()
        await asyncio.to_thread(empty_dir, self.root)
        return {"ok": True, "killed": killed, "duration_ms": (time.monotonic() - started) * 1000.0}

    def shutdown(self) -> None:
        self.session.close()
        kill_tree(os.getpid(), include_root=False)


async def serve(
    root: str, cap: int, file_limit: int, limits: RunnerLimits, own_pid_namespace: bool, resume: ResumeState | None
) -> None:
    runner = Runner(root, cap, file_limit, limits, own_pid_namespace)
    if resume is not None:
        runner.resume(resume)
    loop = runner.loop
    reader = asyncio.StreamReader(limit=_MAX_REQUEST)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    requests = Background(logging.getLogger("atropos.runner"))  # one task per request being answered
    runner.reply({"id": 0, "result": {"ok": True, "ready": True, "pid": os.getpid()}})
    while not stop.is_set():
        line_task = asyncio.ensure_future(reader.readline())
        stop_task = asyncio.ensure_future(stop.wait())
        await asyncio.wait({line_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        if not line_task.done():
            line_task.cancel()
            break
        line = line_task.result()
        if not line:
            break  # the server is gone
        try:
            req = json.loads(line)
        except json.JSONDecodeError as exc:
            runner.reply({"id": None, "error": f"malformed request: {exc}"})
            continue
        requests.spawn(runner.handle(req, req.pop("id", None)))
    runner.shutdown()


VALUE_OPTIONS = (
    "--root",
    "--max-output",
    "--max-file-bytes",
    "--limit-memory",
    "--limit-file-size",
    "--limit-cpu",
    "--limit-workspace",
    "--limit-processes",
    RESUME_FLAG,
)
FLAGS = ("--nproc-rlimit", "--pid-namespace")


def parse_args(argv: list[str]) -> dict[str, str]:
    """`--root R [--max-output N] [--max-file-bytes N] [--limit-* N] [flags]`; no argparse: it costs a
    third of our start-up."""
    opts = {"--max-output": str(1 << 20), "--max-file-bytes": str(16 << 20)}
    it = iter(argv)
    for flag in it:
        if flag in FLAGS:
            opts[flag] = "1"
        elif flag in VALUE_OPTIONS:
            opts[flag] = next(it, "")
        else:
            raise SystemExit(f"runner: unknown option {flag}")
    if not opts.get("--root"):
        raise SystemExit("runner: --root is required")
    return opts


def limits_from(opts: dict[str, str]) -> RunnerLimits:
    def num(flag: str) -> int | None:
        return int(opts[flag]) if opts.get(flag) else None

    return RunnerLimits(
        memory=num("--limit-memory"),
        file_size=num("--limit-file-size"),
        cpu_seconds=num("--limit-cpu"),
        workspace=num("--limit-workspace"),
        processes=num("--limit-processes"),
        nproc_rlimit="--nproc-rlimit" in opts,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    limits = limits_from(opts)
    limits.apply_to_self()
    become_subreaper()
    die_with_parent()
    # the slot's processes (our user) must not open our pipes to the server through /proc (to forge
    # answers or read requests), trace us or read our memory
    forbid_inspection()
    resume: ResumeState | None = json.loads(opts[RESUME_FLAG]) if opts.get(RESUME_FLAG) else None
    if resume is None:  # a resumed runner is the same process, already niced
        # below the server: a slot full of busy commands must not starve the server's control plane
        os.nice(_NICENESS)
    root = opts["--root"]
    os.chdir(root)
    cap, file_limit = int(opts["--max-output"]), int(opts["--max-file-bytes"])
    asyncio.run(serve(root, cap, file_limit, limits, "--pid-namespace" in opts, resume))
    return 0


if __name__ == "__main__":
    sys.exit(main())
