"""A short soak run (scripts/soak.py runs the long one): a mixed workload on a local pool while
servers are killed and frozen and slot runners killed. No call lost, none untyped, no wrong
result, no process left behind."""

from __future__ import annotations

from atropos.bench.soak import Soak, SoakOptions


async def test_short_soak_loses_nothing_and_leaks_nothing() -> None:
    options = SoakOptions(duration=20.0, slots=3, servers=2, seed=11, fault_every=2.5, report_every=5.0, think=0.05)
    report = await Soak(options).run()
    print(report.to_json())
    assert report.ledger["calls"] > 100, report.ledger
    assert report.ledger["lost"] == 0 and report.ledger["duplicated"] == 0, report.ledger
    assert report.ledger["untyped"] == {}, report.untyped_examples
    assert report.wrong == []
    assert report.leaked == {}
    assert sum(report.faults.values()) >= 3, report.faults  # faults were injected, and survived
