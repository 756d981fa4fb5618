"""Fault-test harness: many concurrent trajectories make calls (`execute` and `execute_batch`)
through a SlotPool while a fault scenario runs; every call is accounted in a `CallLedger`.

    report = await calls_during(pool, scenario(), trajectories=8)
    assert_exactly_once(report)
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections.abc import Awaitable, Callable

from atropos.bench.ledger import CallLedger, LedgerReport
from atropos.sandbox.models import ExecuteResult
from atropos.slots import Slot, SlotPool, SlotPoolError

# every outcome a call may have besides a result: the pool's typed errors
EXPECTED_ERRORS = {"SlotLost", "SlotDraining", "SlotFailed", "AcquireTimeout", "LeaseError", "InfrastructureError"}


async def calls_during(
    pool: SlotPool, scenario: Awaitable[None], *, trajectories: int, deadline: float = 150.0, call_timeout: float = 30.0
) -> tuple[LedgerReport, list[str]]:
    """Run trajectories (acquire, then calls of about a second each, re-acquiring after a loss)
    until `scenario` ends; returns the ledger's report and any result that was not the call's own."""
    ledger = CallLedger(deadline=deadline)
    done = asyncio.Event()
    wrong: list[str] = []
    tokens = itertools.count()

    async def trajectory(n: int) -> None:
        while not done.is_set():
            slot = await ledger.call(pool.acquire(f"f{n}-{next(tokens)}", timeout=60))
            if slot is None:
                await asyncio.sleep(0.1)
                continue
            try:
                while not done.is_set() and _leased(pool, slot):
                    await _one_round(pool, ledger, slot, next(tokens), wrong, call_timeout)
            finally:
                pool.release(slot)

    workers = [asyncio.ensure_future(trajectory(n)) for n in range(trajectories)]
    try:
        await scenario
    finally:
        done.set()
        await asyncio.wait(workers, timeout=deadline)
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return ledger.report(), wrong


async def _one_round(
    pool: SlotPool, ledger: CallLedger, slot: Slot, token: int, wrong: list[str], timeout: float
) -> None:
    single = await ledger.execute(pool, slot, "bash", {"command": f"sleep 0.3; echo one-{token}"}, timeout=timeout)
    _check(single, f"one-{token}\n", wrong)
    calls = [(slot, "bash", {"command": f"sleep 0.2; echo b{i}-{token}"}, timeout) for i in range(2)]
    for i, outcome in enumerate(await ledger.execute_batch(pool, calls)):
        if isinstance(outcome, ExecuteResult):
            _check(outcome, f"b{i}-{token}\n", wrong)


def _check(result: ExecuteResult | None, expected: str, wrong: list[str]) -> None:
    if result is not None and result.stdout != expected:
        wrong.append(f"expected {expected!r}, got {result.stdout!r}")


def _leased(pool: SlotPool, slot: Slot) -> bool:
    """Still ours, and its server not retiring (a trajectory told so ends its episode there)."""
    try:
        pool.heartbeat(slot)
        return not pool.draining(slot)
    except SlotPoolError:
        return False


def assert_exactly_once(report: LedgerReport, wrong: list[str]) -> None:
    assert report.lost == 0 and report.hung == 0, report
    assert report.duplicated == 0, report
    assert report.untyped == {}, report
    assert set(report.errors) <= EXPECTED_ERRORS, report.errors
    assert wrong == [], wrong
    assert report.ok > 0, report


def signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


async def wait_for(predicate: Callable[[], object], *, attempts: int = 900, every: float = 0.1) -> bool:
    """Poll `predicate()` until true (readiness, not a timing assertion)."""
    for _ in range(attempts):
        if predicate():
            return True
        await asyncio.sleep(every)
    return False


async def until_server_state(pool: SlotPool, key: str, want: object, attempts: int = 200) -> object:
    """`key` of the /health of the pool's one server once it equals `want`, else its last value
    (polled: a state, not a timing assertion)."""
    state: object = None
    for _ in range(attempts):
        (health,) = (await pool.servers_health()).values()
        assert isinstance(health, dict), health
        state = health.get(key)
        if state == want:
            break
        await asyncio.sleep(0.05)
    return state


SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGSTOP": signal.SIGSTOP}
