"""The benchmark program runs and reports (its figures are not asserted: it is a program, not a test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from atropos.bench.cli import format_table
from atropos.bench.measure import Row, judged


def test_judged_ratio_and_target() -> None:
    row = judged(Row("s", "m", 3.0, "ms", "floor", 2.0, "<= 2.0x"), 2.0)
    assert row.ratio == 1.5 and row.met is True
    row = judged(Row("s", "rate", 30.0, "/s", "floor", 100.0, ">= 0.6x"), 0.6, higher_is_better=True)
    assert row.met is False
    table = format_table([row])
    assert "NO" in table and "0.30x" in table
    # a target on the value itself ("<= 2 s") beside a baseline: 7 s is a miss, whatever the ratio
    row = judged(Row("s", "p99", 7.0, "s", "no warm slots", 14.0, "<= 2 s"), 2.0, of_value=True)
    assert row.ratio == 0.5 and row.met is False


def test_bench_runs_and_writes_json(tmpdir_path: str) -> None:
    out = os.path.join(tmpdir_path, "bench.json")
    proc = subprocess.run(
        [sys.executable, "-m", "atropos.cli", "bench", "--quick", "--only", "startup", "--out", out],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(open(out).read())
    metrics = {r["metric"] for r in doc["rows"]}
    assert "cold start 4 x 16 slots to all ready" in metrics
    assert all(r["value"] > 0 for r in doc["rows"])
    assert doc["machine"]["cpus"] and "server RSS idle, 64 slots" in proc.stdout


def test_bench_rejects_unknown_scenario() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "atropos.cli", "bench", "--only", "nope"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "unknown scenario" in proc.stderr


def test_abuse_row_fails_on_any_lost_ping_or_slow_p99() -> None:
    from atropos.bench.abuse import Watched, _abuse_row
    from atropos.bench.measure import Summary
    from atropos.sandbox.models import ExecuteResult

    quiet = Summary.of([0.002, 0.003])
    fast = Watched(seconds=[0.002] * 50)
    stopped = ExecuteResult(ok=False, limit="processes")
    assert _abuse_row("bomb", stopped, fast, fast, quiet, quiet).met is True
    assert "stopped by processes" in _abuse_row("bomb", stopped, fast, fast, quiet, quiet).note
    assert _abuse_row("bomb", stopped, Watched(seconds=[0.002] * 50, failures=1), fast, quiet, quiet).met is False
    assert _abuse_row("bomb", stopped, Watched(seconds=[0.5] * 50), fast, quiet, quiet).met is False
    assert _abuse_row("bomb", stopped, fast, Watched(seconds=[0.002], failures=2), quiet, quiet).met is False
