"""`atropos-sandbox demo`: bring up a slot pool, run a batch of concurrent agent trajectories over the
task set, write the rollouts as JSONL, print a table and a summary.

The default policy replays each task's reference solution through real tool calls (no model needed);
`--openai-base-url` and `--model` put a model server (OpenAI-compatible chat completions) in charge.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from atropos.backends import BACKEND_KINDS
from atropos.envs.agent_loop import AgentSettings, Rollout
from atropos.envs.batch import ModelFactory, run_batch, summarize
from atropos.envs.chat import ChatModel, ModelError
from atropos.envs.openai_client import OpenAIChatModel
from atropos.envs.reference_policy import ReferencePolicy
from atropos.envs.report import summary_lines, table_header, table_row
from atropos.envs.task_set import Task, TaskError, load_tasks, split_ids
from atropos.envs.tool_calls import validation_summary
from atropos.slots import PoolConfigError, SlotPool, SlotPoolConfig
from atropos.slots.config import parse_backend_options

__all__ = ["register"]

RUNS_DIR = "demo-runs"  # under the working directory; ignored by git
_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class DemoError(Exception):
    """A flag or input the demo cannot work with: printed as one line, exit status 2."""


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a batch of agent trajectories in sandbox slots and score them",
        description="Start a slot pool, run concurrent agent trajectories over the built-in tasks (or --task-file), "
        "score each with the task's hidden checks, write the rollouts as JSONL and print a table. Without "
        "--openai-base-url the policy replays each task's reference solution through real tool calls.",
    )
    work = parser.add_argument_group("work")
    work.add_argument(
        "--tasks", type=int, metavar="N", help="trajectories to run, cycling through the tasks (default: one per task)"
    )
    work.add_argument("--task-ids", metavar="IDS", help="comma-separated task ids to use (default: all)")
    work.add_argument("--task-file", metavar="JSONL", help="tasks from this JSONL file instead of the built-in set")
    work.add_argument("--concurrency", type=int, default=16, metavar="N", help="trajectories at once (default 16)")
    work.add_argument("--max-turns", type=int, default=8, metavar="N", help="model turns per trajectory (default 8)")
    work.add_argument("--tool-timeout", type=float, default=60.0, metavar="S", help="seconds per tool call")
    work.add_argument(
        "--tool-call-format",
        choices=("openai", "hermes"),
        default="openai",
        help="openai: the API's tool_calls; hermes: <tool_call> JSON in the text (default openai)",
    )
    work.add_argument(
        "--out",
        metavar="PATH",
        help="rollouts JSONL, written as each one finishes; refused if it exists (default: "
        f"{RUNS_DIR}/<UTC time>-<id>/rollouts.jsonl, a new directory per run)",
    )

    model = parser.add_argument_group("model (default: the reference policy)")
    model.add_argument(
        "--openai-base-url", metavar="URL", help="OpenAI-compatible server, e.g. http://localhost:8000/v1"
    )
    model.add_argument("--model", metavar="NAME", help="model name sent to the server")
    model.add_argument("--api-key", metavar="KEY", help="bearer token (default: $OPENAI_API_KEY)")
    model.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    model.add_argument("--max-tokens", type=int, default=1024, metavar="N", help="max tokens per turn")

    pool = parser.add_argument_group("sandbox pool")
    pool.add_argument(
        "--backend", choices=BACKEND_KINDS, default="local",
        help="default: local; slurm: servers as sbatch jobs (pool dir ~/.cache/atropos-sandbox/slurm, which the "
        "nodes must see)",
    )  # fmt: skip
    pool.add_argument(
        "--driver", choices=("process", "docker", "singularity"), default="process", help="default: process"
    )
    pool.add_argument("--image", metavar="IMAGE", help="docker image (driver docker)")
    pool.add_argument("--singularity-image", metavar="SIF", help="SIF path or reference (driver singularity)")
    pool.add_argument("--nomad-address", metavar="URL", help="Nomad API (backend nomad; default $NOMAD_ADDR)")
    pool.add_argument(
        "--backend-option", action="append", default=[], metavar="KEY=VALUE",
        help="a setting of the backend (repeatable), e.g. partition=cpu, time_limit=4:00:00 or "
        "pool_dir=/shared/atropos for slurm; a value starting with [ or { is JSON (sbatch_args='[\"--exclusive\"]')",
    )  # fmt: skip
    pool.add_argument("--slots-per-container", type=int, default=8, metavar="N", help="default 8")
    pool.add_argument("--containers", type=int, default=2, metavar="N", help="servers started (default 2)")
    pool.add_argument("--max-containers", type=int, default=4, metavar="N", help="servers at most (default 4)")
    pool.add_argument(
        "--isolation",
        choices=("auto", "bwrap", "none"),
        default="auto",
        help="slot isolation: auto and bwrap need bubblewrap (a server without it is refused); none "
        "accepts slots that see each other (default auto)",
    )
    pool.add_argument(
        "--network",
        choices=("auto", "public", "allow", "deny"),
        default="auto",
        help="slot network: public = own namespace, public addresses only; deny = none; allow = the "
        "node's network; auto = public where it works, else deny (default auto)",
    )
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    try:
        plan = _Plan.from_args(args)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(plan.run())


class _Plan:
    def __init__(
        self, args: argparse.Namespace, pool_config: SlotPoolConfig, settings: AgentSettings, tasks: list[Task]
    ) -> None:
        self.args = args
        self.pool_config = pool_config
        self.settings = settings
        self.tasks = tasks

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> _Plan:
        for flag in ("tasks", "concurrency", "max_turns", "slots_per_container", "max_containers", "max_tokens"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise DemoError(f"--{flag.replace('_', '-')} must be at least 1, not {value}")
        if bool(args.openai_base_url) != bool(args.model):
            raise DemoError("--openai-base-url and --model go together (a model server needs a model name)")
        try:
            pool_config = SlotPoolConfig.from_flags(
                backend_options=parse_backend_options(args.backend_option),
                backend=args.backend,
                driver=args.driver,
                image=args.image,
                singularity_image=args.singularity_image,
                nomad_address=args.nomad_address,
                slots_per_container=args.slots_per_container,
                min_containers=args.containers,
                max_containers=args.max_containers,
                tool_timeout=args.tool_timeout,
                isolation=args.isolation,
                network=args.network,
            )
            settings = AgentSettings(
                max_turns=args.max_turns, tool_call_format=args.tool_call_format, tool_timeout=args.tool_timeout
            )
        except ValidationError as exc:
            raise DemoError(validation_summary(exc)) from None
        except PoolConfigError as exc:
            raise DemoError(str(exc)) from None
        try:
            tasks = load_tasks(args.task_file, split_ids(args.task_ids))
        except TaskError as exc:
            raise DemoError(str(exc)) from None
        if not args.openai_base_url:
            missing = [task.id for task in tasks if not task.reference]
            if missing:
                raise DemoError(f"the reference policy needs a reference solution; none for: {', '.join(missing)}")
        count = args.tasks or len(tasks)
        if args.out and Path(args.out).exists():
            raise DemoError(f"--out {args.out} exists: rollouts are never written over; give a new path")
        return cls(args, pool_config, settings, list(itertools.islice(itertools.cycle(tasks), count)))

    def _output(self) -> Path:
        """Where the rollouts go: --out, or a new run directory (never one that exists)."""
        if self.args.out:
            out = Path(self.args.out)
        else:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            out = Path(RUNS_DIR) / f"{stamp}-{uuid.uuid4().hex[:6]}" / "rollouts.jsonl"
        return out.absolute()

    def _header(self, description: str, enforcement: dict[str, Any]) -> dict[str, Any]:
        return {
            "run": {
                "enforcement": enforcement,
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "policy": description,
                "model": self.args.model,
                "tasks": len(self.tasks),
                "concurrency": self.args.concurrency,
                "pool": self.pool_config.model_dump(mode="json"),
            }
        }

    def _policy(self) -> tuple[ModelFactory, OpenAIChatModel | None, str]:
        args = self.args
        if not args.openai_base_url:
            fmt = self.settings.tool_call_format

            def reference(task: Task) -> ChatModel:
                return ReferencePolicy(task, fmt)

            return (
                reference,
                None,
                (
                    "reference solutions replayed through real tool calls (no model; pass "
                    "--openai-base-url and --model to use one)"
                ),
            )
        client = OpenAIChatModel(
            args.openai_base_url,
            args.model,
            args.api_key or os.environ.get("OPENAI_API_KEY"),
            temperature=args.temperature,
            max_tokens=args.max_tokens,
        )
        return (
            (lambda _task: client),
            client,
            (f"model {args.model} at {args.openai_base_url} ({self.settings.tool_call_format} tool calls)"),
        )

    async def run(self) -> int:
        """The batch; Ctrl-C or SIGTERM stops it, closes the pool (nothing is left running) and keeps
        every rollout that finished (each is written, flushed, as it ends)."""
        out = self._output()
        kept = [0]
        stopped_by: list[signal.Signals] = []
        main = asyncio.current_task()
        assert main is not None
        loop = asyncio.get_running_loop()

        def stop(sig: signal.Signals) -> None:
            if not stopped_by:
                stopped_by.append(sig)
                print(f"\n{sig.name}: stopping; the pool closes and the finished rollouts are kept", flush=True)
                main.cancel()

        handled = []
        for sig in _SIGNAL_EXIT:
            try:
                loop.add_signal_handler(sig, stop, sig)
            except (ValueError, RuntimeError):  # not the main thread: whoever runs us owns the signals
                continue
            handled.append(sig)
        try:
            return await self._run(out, kept)
        except asyncio.CancelledError:
            if not stopped_by:
                raise
            where = f"kept in {out}" if kept[0] else "none finished"
            print(f"interrupted: {kept[0]} finished rollout(s) {where}", file=sys.stderr, flush=True)
            return _SIGNAL_EXIT[stopped_by[0]]
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    async def _run(self, out: Path, kept: list[int]) -> int:
        model_for, client, description = self._policy()
        c = self.pool_config
        print(f"policy: {description}")
        at_once = min(self.args.concurrency, len(self.tasks))
        print(
            f"pool: {c.backend.type} backend, {c.driver.describe()} driver, {c.initial_containers}..{c.max_containers} "
            f"server(s) x {c.slots_per_container} slots; {len(self.tasks)} trajectories, {at_once} at once",
            flush=True,
        )
        print(f"rollouts go to {out}", flush=True)
        if client is not None:
            try:
                await client.check()
            except ModelError as exc:
                await client.aclose()
                print(f"error: {exc}", file=sys.stderr)
                return 1
        with contextlib.ExitStack() as files:

            def finished(rollout: Rollout) -> None:
                sink.write(rollout.model_dump_json() + "\n")
                sink.flush()
                kept[0] += 1
                print(table_row(rollout), flush=True)

            ready = False
            try:
                async with SlotPool(c, progress=lambda message: print(f"  .. {message}", flush=True)) as pool:
                    ready = True
                    out.parent.mkdir(parents=True, exist_ok=True)
                    sink = files.enter_context(out.open("x", encoding="utf-8"))  # only once the pool runs
                    sink.write(json.dumps(self._header(description, pool.enforcement())) + "\n")
                    sink.flush()
                    print(enforcement_line(pool.enforcement()), flush=True)
                    print(f"\n{table_header()}", flush=True)
                    started = time.monotonic()
                    rollouts = await run_batch(
                        pool, self.tasks, model_for, self.settings, self.args.concurrency, on_rollout=finished
                    )
                    wall = time.monotonic() - started
                    enforced = pool.enforcement()
                    sandbox_calls = sum(call.count for call in pool.stats().calls.values())
            except Exception as exc:  # the pool could not start, or broke beyond single trajectories
                what = "failed" if ready else "could not start"
                print(f"error: the sandbox pool {what}: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 1
            finally:
                if client is not None:
                    await client.aclose()
            summary = summarize(rollouts, wall)
            print("\n" + "\n".join(summary_lines(summary)))
            print(f"sandbox           {enforcement_line(enforced).removeprefix('in force: ')}")
            rate = sandbox_calls / wall
            print(f"sandbox calls     {sandbox_calls} (tool calls + task setup + hidden checks), {rate:.1f}/s")
            print(f"rollouts          {out}")
            return 0 if summary.errors == 0 and summary.infra_failures == 0 else 1


def enforcement_line(per_server: dict[str, dict[str, Any]]) -> str:
    """`in force: isolation bwrap, network public, slots as uid 65534 (2 servers)`, one clause per
    distinct setting, with the reason where a server's `auto` fell back."""
    seen: dict[tuple[object, ...], list[str]] = {}
    for sid, e in per_server.items():
        seen.setdefault((e.get("isolation"), e.get("network"), e.get("uid"), e.get("network_reason")), []).append(sid)
    parts = []
    for (isolation, network, uid, why), ids in seen.items():
        part = f"isolation {isolation}, network {network}, slots as uid {uid} ({len(ids)} server(s))"
        if why:
            part += f"; network fell back: {why}"
        parts.append(part)
    return "in force: " + "; ".join(parts)
