"""Soak: a long mixed workload on a local pool while its servers are killed, frozen and abused.

Trajectories acquire a slot, run a random mix of tool calls (bash, bash_session, write/read file,
batches, commands that time out, flood their output or leave TERM-ignoring processes behind) and
release it. A fault loop kills or freezes servers and kills slot runners at random. Every call goes
through a `CallLedger`: at the end no call may be lost, duplicated or end in an untyped error, no
result may be wrong (another slot's, or stale), and no process of the run may outlive the pool.

    python scripts/soak.py --duration 900 --slots 4 --servers 3 --seed 1 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from atropos.bench.ledger import CallLedger
from atropos.bench.procwatch import ProcessWatch
from atropos.bench.soak_faults import FAULT_KINDS, LocalFaults
from atropos.sandbox.models import ExecuteResult
from atropos.slots import Slot, SlotPool, SlotPoolConfig, SlotPoolError

# weights of the operations a trajectory picks from
OPERATIONS: dict[str, int] = {
    "bash": 30,
    "session": 20,
    "files": 20,
    "batch": 12,
    "timeout": 4,
    "flood": 3,
    "term_ignorer": 4,
    "background": 4,
    "bad_call": 2,
}


@dataclass
class SoakOptions:
    duration: float = 60.0
    slots: int = 4
    servers: int = 2
    trajectories: int = 0
    """concurrent trajectories (0: one per slot plus a quarter, so acquires wait)"""
    seed: int = 0
    fault_every: float = 6.0
    """mean seconds between faults (0: none)"""
    report_every: float = 10.0
    isolation: str = "auto"
    think: float = 0.02
    """mean seconds a trajectory waits between its calls (an agent's model thinking)"""

    @property
    def workers(self) -> int:
        return self.trajectories or self.slots * self.servers + max(1, self.slots * self.servers // 4)


@dataclass
class SoakReport:
    seconds: float
    options: dict[str, Any]
    ledger: dict[str, Any]
    wrong: list[str]
    state_lost: dict[str, int]
    """session variables or files gone after the slot's runner was killed between calls"""
    faults: dict[str, int]
    servers_lost: int
    leaked: dict[int, str]
    memory: list[dict[str, float]]
    pool_errors: dict[str, int]
    untyped_examples: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            self.ledger["lost"] == 0
            and self.ledger["duplicated"] == 0
            and not self.ledger["untyped"]
            and not self.wrong
            and not self.leaked
        )

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "leaked": {str(k): v for k, v in self.leaked.items()}, "passed": self.passed}


class Soak:
    def __init__(self, options: SoakOptions, progress: Callable[[str], None] = print) -> None:
        self.options = options
        self.progress = progress
        self.rng = random.Random(options.seed)
        self.ledger = CallLedger(deadline=120.0)
        self.tag = f"7{self.rng.randrange(10_000, 99_999)}"  # `sleep 7NNNNN<k>`: this run's processes
        self.watch = ProcessWatch(markers=[f"sleep {self.tag}"])
        self.wrong: list[str] = []
        self.state_lost: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._counter = 0

    def config(self) -> SlotPoolConfig:
        o = self.options
        return SlotPoolConfig.model_validate(
            {
                "slots_per_container": o.slots,
                "min_containers": o.servers,
                "max_containers": o.servers,
                "isolation": o.isolation,
                "health_interval": 0.25,
                "acquire_timeout": 60.0,
                "tool_timeout": 30.0,
                "lease_ttl": 120.0,
                "max_output": 1 << 20,
            }
        )

    async def run(self) -> SoakReport:
        started = time.monotonic()
        pool = SlotPool(self.config())
        await pool.start()
        self.watch.markers.append(getattr(pool.backend, "workdir", "/nonexistent-workdir"))
        faults = LocalFaults(pool, random.Random(self.options.seed + 1))
        try:
            workers = [asyncio.ensure_future(self._trajectories(pool, i)) for i in range(self.options.workers)]
            background = [asyncio.ensure_future(self._faults(faults)), asyncio.ensure_future(self._report(pool))]
            await asyncio.sleep(self.options.duration)
            self._stop.set()
            _done, pending = await asyncio.wait(workers, timeout=self.ledger.deadline)
            for task in [*pending, *background]:
                task.cancel()
            await asyncio.gather(*workers, *background, return_exceptions=True)
            faults.resume_all()
            await self._await_capacity(pool)
            stats = pool.stats()
        finally:
            faults.resume_all()
            await pool.close()
        self.watch.sample()
        leaked = await self._leaked()
        report = SoakReport(
            seconds=round(time.monotonic() - started, 1),
            options=dict(self.options.__dict__),
            ledger=self.ledger.report().to_json(),
            wrong=self.wrong[:50],
            state_lost=dict(self.state_lost),
            faults=dict(faults.injected),
            servers_lost=stats.servers_lost,
            leaked=leaked,
            memory=[s.to_json() for s in self.watch.samples],
            pool_errors=dict(stats.errors),
            untyped_examples=self.ledger.untyped_examples,
        )
        self.progress(self._line(report.seconds, pool_servers=stats.servers, final=True))
        return report

    async def _await_capacity(self, pool: SlotPool) -> None:
        """Give the last replacements a moment: the run ends with the servers it started with."""
        for _ in range(300):
            if pool.stats().servers >= self.options.servers:
                return
            await asyncio.sleep(0.1)

    async def _leaked(self) -> dict[int, str]:
        for _ in range(100):  # processes killed at close may take a moment to disappear
            leaked = self.watch.leaked()
            if not leaked:
                return {}
            await asyncio.sleep(0.1)
        return leaked

    # -- workload ------------------------------------------------------------------------------

    async def _trajectories(self, pool: SlotPool, worker: int) -> None:
        rng = random.Random(self.options.seed * 1000 + worker)
        names, weights = zip(*OPERATIONS.items(), strict=True)
        while not self._stop.is_set():
            slot = await self.ledger.call(pool.acquire(f"w{worker}-{self._next()}", timeout=60))
            if slot is None:
                await asyncio.sleep(0.1)
                continue
            try:
                for _ in range(rng.randint(2, 10)):
                    op = rng.choices(names, weights)[0]
                    await asyncio.sleep(rng.expovariate(1.0 / self.options.think) if self.options.think > 0 else 0)
                    await getattr(self, f"_op_{op}")(pool, slot)
                    if self._stop.is_set() or not _still_leased(pool, slot):
                        break
            finally:
                pool.release(slot)

    def _next(self) -> int:
        self._counter += 1
        return self._counter

    def _expect(self, what: str, result: ExecuteResult | None, expected: str, attr: str = "stdout") -> None:
        """A result must be the call's own. An empty one is state the slot lost when its runner
        was killed (counted apart); anything else is another call's output: wrong."""
        if result is None or getattr(result, attr) == expected:
            return
        got = getattr(result, attr)
        if got.strip() == "" or (what == "read_file" and not result.ok):
            self.state_lost[what] += 1
        else:
            self.wrong.append(f"{what}: expected {expected[:40]!r}, got {got[:80]!r}")

    async def _op_bash(self, pool: SlotPool, slot: Slot) -> None:
        token = f"b{self._next()}"
        result = await self.ledger.execute(pool, slot, "bash", {"command": f"echo {token}"})
        self._expect("bash", result, f"{token}\n")

    async def _op_session(self, pool: SlotPool, slot: Slot) -> None:
        token = f"s{self._next()}"
        first = await self.ledger.execute(pool, slot, "bash_session", {"command": f"export SOAK={token}"})
        if first is not None:
            result = await self.ledger.execute(pool, slot, "bash_session", {"command": "echo $SOAK"})
            self._expect("bash_session", result, f"{token}\n")

    async def _op_files(self, pool: SlotPool, slot: Slot) -> None:
        token = f"f{self._next()}" * self.rng.randint(1, 2000)
        path = f"d/{self._next()}.txt"
        written = await self.ledger.execute(pool, slot, "write_file", {"path": path, "content": token})
        if written is not None and written.ok:
            self._expect(
                "read_file", await self.ledger.execute(pool, slot, "read_file", {"path": path}), token, "output"
            )

    async def _op_batch(self, pool: SlotPool, slot: Slot) -> None:
        tokens = [f"x{self._next()}" for _ in range(self.rng.randint(2, 4))]
        calls = [(slot, "bash", {"command": f"echo {t}"}, None) for t in tokens]
        for token, outcome in zip(tokens, await self.ledger.execute_batch(pool, calls), strict=True):
            if isinstance(outcome, ExecuteResult):
                self._expect("batch", outcome, f"{token}\n")

    async def _op_timeout(self, pool: SlotPool, slot: Slot) -> None:
        result = await self.ledger.execute(
            pool, slot, "bash", {"command": f"echo started; sleep {self.tag}1"}, timeout=0.5
        )
        if result is not None and not result.timed_out:
            self.wrong.append(f"timeout: a 0.5 s call ran to its end: {result.exit_code}")

    async def _op_flood(self, pool: SlotPool, slot: Slot) -> None:
        result = await self.ledger.execute(pool, slot, "bash", {"command": "head -c 20000000 /dev/zero | tr '\\0' x"})
        if result is not None and not result.truncated:
            self.wrong.append("flood: 20 MB of output came back untruncated")

    async def _op_term_ignorer(self, pool: SlotPool, slot: Slot) -> None:
        command = f"(trap '' TERM; exec sleep {self.tag}2) >/dev/null 2>&1 &"
        await self.ledger.execute(pool, slot, "bash", {"command": command})

    async def _op_background(self, pool: SlotPool, slot: Slot) -> None:
        command = f"for i in 1 2 3; do sleep {self.tag}3 & done; setsid sleep {self.tag}4 & echo forked"
        await self.ledger.execute(pool, slot, "bash_session", {"command": command})

    async def _op_bad_call(self, pool: SlotPool, slot: Slot) -> None:
        await self.ledger.execute(pool, slot, "no_such_tool", {})  # InvalidToolCall: a typed error

    # -- faults and reporting ------------------------------------------------------------------

    async def _faults(self, faults: LocalFaults) -> None:
        if self.options.fault_every <= 0:
            return
        while True:
            await asyncio.sleep(self.rng.expovariate(1.0 / self.options.fault_every))
            what = await faults.inject(self.rng.choice(FAULT_KINDS))
            if what:
                self.progress(f"fault: {what}")

    async def _report(self, pool: SlotPool) -> None:
        t0 = time.monotonic()
        while True:
            self.watch.sample()
            await asyncio.sleep(min(1.0, self.options.report_every))
            if len(self.watch.samples) % max(1, int(self.options.report_every)) == 0:
                self.progress(self._line(time.monotonic() - t0, pool_servers=pool.stats().servers))

    def _line(self, elapsed: float, *, pool_servers: int, final: bool = False) -> str:
        r = self.ledger.report()
        memory = self.watch.samples[-1] if self.watch.samples else None
        mem = (
            f"owner {memory.owner_mb:.0f} MB, children {memory.children_mb:.0f} MB ({memory.children})"
            if memory
            else "-"
        )
        pending = "lost" if final else "in flight"
        return (
            f"[{elapsed:6.0f}s] calls={r.calls} ok={r.ok} errors={r.errors} untyped={r.untyped} "
            f"{pending}={r.lost} wrong={len(self.wrong)} servers={pool_servers} rss: {mem}"
        )


def _still_leased(pool: SlotPool, slot: Slot) -> bool:
    try:
        pool.heartbeat(slot)
    except SlotPoolError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of workload (default %(default)s)")
    p.add_argument("--slots", type=int, default=4, help="slots per server (default %(default)s)")
    p.add_argument("--servers", type=int, default=2, help="servers (default %(default)s)")
    p.add_argument("--trajectories", type=int, default=0, help="concurrent trajectories (default: slots + 25%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fault-every", type=float, default=6.0, help="mean seconds between faults; 0: none")
    p.add_argument("--report-every", type=float, default=10.0)
    p.add_argument("--isolation", choices=["auto", "bwrap", "none"], default="auto")
    p.add_argument("--think", type=float, default=0.02, help="mean seconds between a trajectory's calls")
    p.add_argument("--json", dest="json_out", help="write the report here")
    args = p.parse_args(argv)
    options = SoakOptions(
        duration=args.duration,
        slots=args.slots,
        servers=args.servers,
        trajectories=args.trajectories,
        seed=args.seed,
        fault_every=args.fault_every,
        report_every=args.report_every,
        isolation=args.isolation,
        think=args.think,
    )
    report = asyncio.run(Soak(options, progress=lambda m: print(m, flush=True)).run())
    print(json.dumps({k: v for k, v in report.to_json().items() if k != "memory"}, indent=2))
    print(_memory_trend(report.memory))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump(report.to_json(), fh, indent=2)
    print("PASS" if report.passed else "FAIL: calls lost, untyped errors, wrong results or leaked processes")
    return 0 if report.passed else 1


def _memory_trend(samples: list[dict[str, float]]) -> str:
    if not samples:
        return "rss: no samples"
    picks = [samples[round(i * (len(samples) - 1) / 5)] for i in range(6)]
    return "rss over time: " + ", ".join(
        f"{s['t']:.0f}s owner {s['owner_mb']:.0f} MB / children {s['children_mb']:.0f} MB" for s in picks
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
