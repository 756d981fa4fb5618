"""Exactly-once accounting of tool calls made through a SlotPool while things break.

Every call is entered in the ledger when it is issued and settled when it ends. A call must end
exactly once, with a result or with one of the pool's typed errors (`SlotPoolError`); the ledger
counts what did not: calls never settled (lost, or still hanging past the deadline), settled twice,
or ended by an exception the pool does not promise (untyped).

    ledger = CallLedger(deadline=120)
    result = await ledger.execute(pool, slot, "bash", {"command": "echo hi"})
    outcomes = await ledger.execute_batch(pool, calls)
    report = ledger.report()   # report.lost == 0 and report.untyped == {} when all went well
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from atropos.sandbox.models import ExecuteResult
from atropos.slots import BatchCall, InfrastructureError, Slot, SlotPool, SlotPoolError

T = TypeVar("T")

OK = "ok"
HUNG = "hung"


@dataclass(frozen=True)
class LedgerReport:
    calls: int
    ok: int
    errors: dict[str, int]
    """typed errors by class name"""
    untyped: dict[str, int]
    """exceptions that are not the pool's typed errors, by class name (must be empty)"""
    hung: int
    """calls still unanswered at the ledger's deadline (cancelled then; must be 0)"""
    lost: int
    """calls that never got an outcome, including the hung ones (must be 0)"""
    duplicated: int
    """calls that got more than one outcome, plus outcomes of no call (must be 0)"""

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "ok": self.ok,
            "errors": dict(self.errors),
            "untyped": dict(self.untyped),
            "hung": self.hung,
            "lost": self.lost,
            "duplicated": self.duplicated,
        }


@dataclass
class CallLedger:
    deadline: float = 300.0
    """a call unanswered after this many seconds counts as hung (and lost)"""
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _outcomes: dict[int, list[str]] = field(default_factory=dict)
    untyped_examples: list[str] = field(default_factory=list)
    _invented: int = 0

    def issue(self) -> int:
        call_id = next(self._ids)
        self._outcomes[call_id] = []
        return call_id

    def settle(self, call_id: int, outcome: str) -> None:
        self._outcomes[call_id].append(outcome)

    def settle_error(self, call_id: int, exc: BaseException) -> None:
        name = type(exc).__name__
        if isinstance(exc, SlotPoolError):
            self.settle(call_id, name)
            return
        self.settle(call_id, f"untyped:{name}")
        if len(self.untyped_examples) < 20:
            self.untyped_examples.append(f"{name}: {exc}")

    async def call(self, awaitable: Awaitable[T]) -> T | None:
        """Await one call, accounted: its value, or None when it ended in an error (or hung)."""
        call_id = self.issue()
        try:
            value = await asyncio.wait_for(awaitable, self.deadline)
        except asyncio.TimeoutError:
            self.settle(call_id, HUNG)
            return None
        except asyncio.CancelledError:
            raise  # our caller gave up: the call stays unsettled and counts as lost
        except Exception as exc:
            self.settle_error(call_id, exc)
            return None
        self.settle(call_id, OK)
        return value

    async def execute(
        self, pool: SlotPool, slot: Slot, tool: str, args: dict[str, Any], timeout: float | None = None
    ) -> ExecuteResult | None:
        """`pool.execute`, accounted."""
        return await self.call(pool.execute(slot, tool, args, timeout))

    async def execute_batch(
        self, pool: SlotPool, calls: Sequence[BatchCall]
    ) -> list[ExecuteResult | InfrastructureError | None]:
        """`pool.execute_batch`, each call accounted on its own. A result or the call's error in
        order; None where the whole batch raised (or a call got no outcome)."""
        ids = [self.issue() for _ in calls]
        try:
            outcomes = await asyncio.wait_for(pool.execute_batch(calls), self.deadline)
        except asyncio.TimeoutError:
            for call_id in ids:
                self.settle(call_id, HUNG)
            return [None] * len(calls)
        except Exception as exc:
            for call_id in ids:
                self.settle_error(call_id, exc)
            return [None] * len(calls)
        # a batch answering fewer (or more) outcomes than calls loses (or invents) some
        for call_id, outcome in zip(ids, outcomes, strict=False):
            if isinstance(outcome, ExecuteResult):
                self.settle(call_id, OK)
            else:
                self.settle_error(call_id, outcome)
        self._invented += max(len(outcomes) - len(ids), 0)
        padded: list[ExecuteResult | InfrastructureError | None] = list(outcomes[: len(ids)])
        return padded + [None] * (len(ids) - len(padded))

    def report(self) -> LedgerReport:
        errors: Counter[str] = Counter()
        untyped: Counter[str] = Counter()
        ok = hung = lost = 0
        duplicated = self._invented
        for outcomes in self._outcomes.values():
            if len(outcomes) != 1:
                lost += not outcomes
                duplicated += len(outcomes) > 1
                continue
            outcome = outcomes[0]
            if outcome == OK:
                ok += 1
            elif outcome == HUNG:
                hung += 1
                lost += 1
            elif outcome.startswith("untyped:"):
                untyped[outcome.removeprefix("untyped:")] += 1
            else:
                errors[outcome] += 1
        return LedgerReport(
            calls=len(self._outcomes),
            ok=ok,
            errors=dict(errors),
            untyped=dict(untyped),
            hung=hung,
            lost=lost,
            duplicated=duplicated,
        )
