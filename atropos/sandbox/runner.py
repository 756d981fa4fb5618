"""The slot runner: one long-lived process per slot, inside the slot's sandbox.

The server starts it once (under bubblewrap, or plainly with `--isolation none`) and sends it
requests as JSON lines on stdin; answers are JSON lines on stdout. Keeping the sandbox alive
and starting commands inside it is what makes an isolated command cost about as much as a plain
subprocess. Requests run concurrently, so `reset` can cut a running command short.

Protocol: {"id": N, "op": "bash"|"session"|"read_file"|"write_file"|"reset"|"ping", ...}
  -> {"id": N, "result": {...}} or {"id": N, "error": "..."}
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

from atropos.sandbox.children import Children
from atropos.sandbox.files import empty_dir, read_file, write_file
from atropos.sandbox.oneshot import run_oneshot
from atropos.sandbox.procs import become_subreaper, die_with_parent, kill_tree
from atropos.sandbox.session import BashSession

_MAX_REQUEST = 256 * 1024 * 1024
_NICENESS = 5


class Runner:
    def __init__(self, root: str, cap: int, file_limit: int) -> None:
        self.root = root
        self.cap = cap
        self.file_limit = file_limit
        self.loop = asyncio.get_running_loop()
        self.children = Children(self.loop, dict(os.environ))  # children inherit our cwd: the workspace
        self.session = BashSession(self.children)
        self._session_lock = asyncio.Lock()
        self._out = sys.stdout.buffer

    def reply(self, msg: dict[str, Any]) -> None:
        self._out.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
        self._out.flush()

    async def handle(self, req: dict[str, Any]) -> None:
        rid = req.get("id")
        try:
            result = await self.dispatch(req)
        except Exception as exc:  # a bug here must not take the slot down
            self.reply({"id": rid, "error": f"{type(exc).__name__}: {exc}"})
            return
        self.reply({"id": rid, "result": result})

    async def dispatch(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        timeout = float(req.get("timeout") or 60.0)
        if op == "bash":
            return await run_oneshot(self.children, req["command"], timeout=timeout, cap=self.cap)
        if op == "session":
            async with self._session_lock:
                return await self.session.run(req["command"], timeout=timeout, cap=self.cap)
        if op == "read_file":
            return read_file(self.root, req["args"], self.file_limit)
        if op == "write_file":
            return write_file(self.root, req["args"], self.file_limit)
        if op == "reset":
            return await self.reset()
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        raise ValueError(f"unknown op {op!r}")

    async def reset(self) -> dict[str, Any]:
        started = time.monotonic()
        killed = self.session.close()
        killed += kill_tree(os.getpid(), include_root=False)
        self.children.reap()
        await asyncio.to_thread(empty_dir, self.root)
        return {"ok": True, "killed": killed, "duration_ms": (time.monotonic() - started) * 1000.0}

    def shutdown(self) -> None:
        self.session.close()
        kill_tree(os.getpid(), include_root=False)


async def serve(root: str, cap: int, file_limit: int) -> None:
    runner = Runner(root, cap, file_limit)
    loop = runner.loop
    reader = asyncio.StreamReader(limit=_MAX_REQUEST)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks: set[asyncio.Task[None]] = set()
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
        task = asyncio.ensure_future(runner.handle(req))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    runner.shutdown()


def parse_args(argv: list[str]) -> dict[str, str]:
    """`--root R --max-output N --max-file-bytes N`; no argparse: it costs a third of our start-up."""
    opts = {"--max-output": str(1 << 20), "--max-file-bytes": str(16 << 20)}
    it = iter(argv)
    for flag in it:
        if flag not in ("--root", "--max-output", "--max-file-bytes"):
            raise SystemExit(f"runner: unknown option {flag}")
        opts[flag] = next(it, "")
    if not opts.get("--root"):
        raise SystemExit("runner: --root is required")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    become_subreaper()
    die_with_parent()
    # below the server: a slot full of busy commands must not starve the server's control plane
    os.nice(_NICENESS)
    root = opts["--root"]
    os.chdir(root)
    asyncio.run(serve(root, int(opts["--max-output"]), int(opts["--max-file-bytes"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
