"""`atropos-sandbox bench`: runs the scenarios, prints the table, writes JSON and a PNG chart."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import asdict
from typing import Any

from atropos.bench import scenarios
from atropos.bench.measure import Row, machine

_ALL = (
    "latency",
    "concurrency",
    "leasing",
    "startup",
    "recovery",
    "abuse",
    "network",
    "swerex",
    "slurm",
    "scale",
    "transfer",
    "streaming",
    "root",
    "images",
)


def _say(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


async def run(selected: list[str], quick: bool) -> list[Row]:
    sizes = scenarios.Sizes.for_mode(quick)
    rows: list[Row] = []
    if "latency" in selected:
        rows += await scenarios.latency_rows(sizes, _say)
    if "concurrency" in selected:
        rows += await scenarios.concurrency_rows(sizes, _say)
    if "leasing" in selected:
        rows += await scenarios.acquire_rows(sizes, _say)
    if "startup" in selected:
        rows += await scenarios.startup_rows(_say)
    if "recovery" in selected:
        rows += await scenarios.recovery_rows(_say)
    if "abuse" in selected:
        from atropos.bench.abuse import abuse_rows

        rows += await abuse_rows(_say)
    if "network" in selected:
        from atropos.bench.network import network_rows

        rows += await network_rows(sizes, _say)
    if "swerex" in selected:
        from atropos.bench import peer_swerex

        if peer_swerex.available():
            rows += await peer_swerex.swerex_rows(sizes, _say)
        else:
            rows.append(Row("7 vs swe-rex", "skipped", 0.0, "", note="swe-rex not installed: pip install '.[bench]'"))
    if "scale" in selected:
        from atropos.bench.scale import scale_rows

        rows += await scale_rows(quick, _say)
    if "transfer" in selected:
        from atropos.bench.transfer import transfer_rows

        rows += await transfer_rows(quick, _say)
    if "streaming" in selected:
        from atropos.bench.streaming import streaming_rows

        rows += await streaming_rows(quick, _say)
    if "root" in selected:
        from atropos.bench.rootcost import root_rows

        rows += await root_rows(quick, _say)
    if "images" in selected:
        from atropos.bench import task_images

        why = task_images.unavailable()
        if why is None:
            rows += await task_images.task_image_rows(quick, _say)
        else:
            rows.append(Row("15 task images", "skipped", 0.0, "", note=why))
    if "slurm" in selected:
        from atropos.bench import slurm

        why = slurm.unavailable()
        if why is None:
            rows += await slurm.slurm_rows(_say)
        else:
            rows.append(Row("10 slurm", "skipped", 0.0, "", note=why))
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def format_table(rows: list[Row]) -> str:
    header = ("scenario", "metric", "value", "unit", "baseline", "baseline value", "ratio", "target", "met")
    body = [
        (
            r.scenario,
            r.metric,
            _fmt(r.value),
            r.unit,
            r.baseline,
            _fmt(r.baseline_value),
            f"{r.ratio:.2f}x" if r.ratio is not None else "",
            r.target,
            {True: "yes", False: "NO", None: ""}[r.met],
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)) for line in [header, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    notes = [f"  {r.metric}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + (["notes:", *notes] if notes else []))


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [r for r in rows if r.ratio is not None]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(ratios) + 1.5))
    colors = ["tab:green" if r.met else "tab:red" if r.met is False else "tab:gray" for r in ratios]
    ax.barh([r.metric for r in ratios], [r.ratio or 0.0 for r in ratios], color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("ratio to the baseline measured in the same run (log scale); green: target met, red: missed")
    ax.invert_yaxis()
    ax.set_title("atropos-sandbox bench")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main_from_args(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    selected = [s.strip() for s in args.only.split(",")] if args.only else list(_ALL)
    unknown = [s for s in selected if s not in _ALL]
    if unknown:
        print(f"atropos-sandbox bench: unknown scenario(s) {unknown}; choose from {', '.join(_ALL)}", file=sys.stderr)
        return 2
    info = machine()
    print(f"machine: {info}", file=sys.stderr)
    started = time.perf_counter()
    rows = asyncio.run(run(selected, args.quick))
    elapsed = time.perf_counter() - started
    print(format_table(rows))
    print(
        f"\n{'quick' if args.quick else 'full'} run in {elapsed:.0f} s on {info['cpus']} CPUs "
        f"(load {info['load_avg_1m']} at start)"
    )
    if args.out:
        doc: dict[str, Any] = {
            "machine": info,
            "quick": args.quick,
            "seconds": elapsed,
            "rows": [asdict(r) for r in rows],
        }
        with open(args.out, "w") as fh:
            json.dump(doc, fh, indent=2)
        print(f"wrote {args.out}")
    if args.plot:
        try:
            plot(rows, args.plot)
            print(f"wrote {args.plot}")
        except ImportError:
            print("--plot needs matplotlib: pip install 'atropos-sandbox[bench]'", file=sys.stderr)
            return 2
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="measure latency, concurrency, leasing and startup against baselines",
        description="Benchmarks; every figure is shown next to a baseline measured in the same run.",
    )
    p.add_argument("--quick", action="store_true", help="a run under a minute (fewer repetitions)")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(_ALL)}")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", help="write a PNG chart of the ratios here")
    p.set_defaults(handler=main_from_args)
