"""Scenario 10: what network mode `public` (a network namespace per slot behind the server's hub) costs against
`allow` (the node's network), both pools up at once and sampled in interleaved rounds."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable

from atropos.backends.local import LocalBackend
from atropos.bench.measure import Row, Summary, pss_mb, sample_interleaved
from atropos.bench.scenarios import Sizes, ms, pool_config
from atropos.host import snapshot, tree_members
from atropos.slots import Slot, SlotPool

_SLOTS = 16


def per_slot_pss(pool: SlotPool) -> float:
    """PSS of the server's descendants (the hub's pasta, each slot's bubblewrap, runner and shell) per slot."""
    backend = pool.backend
    assert isinstance(backend, LocalBackend)
    (server_id,) = pool.server_ids()
    pid = backend.pid(server_id)
    members = tree_members(pid, snapshot(), include_root=False)
    return sum(pss_mb(p) for p in members) / _SLOTS


async def _first_calls(pool: SlotPool, slots: list[Slot]) -> list[float]:
    """Each slot's first call starts its sandbox (and, with `public`, its link to the hub): one at a time."""
    took = []
    for slot in slots:
        t0 = time.perf_counter()
        await pool.execute(slot, "bash_session", {"command": "true"})
        took.append(time.perf_counter() - t0)
    return took


async def network_rows(sizes: Sizes, say: Callable[[str], None]) -> list[Row]:
    say(f"network: public against allow, 1 server x {_SLOTS} slots each")
    pools = {mode: SlotPool(pool_config(slots_per_container=_SLOTS, network=mode)) for mode in ("allow", "public")}
    rows: list[Row] = []
    try:
        for pool in pools.values():
            await pool.start()
        enforced = {mode: next(iter(p.enforcement().values()))["network"] for mode, p in pools.items()}
        if enforced["public"] != "public":
            return [Row("10 network", "skipped", 0.0, "", note=f"network public unavailable here: {enforced}")]
        slots = {mode: [await p.acquire(f"net-{mode}-{i}") for i in range(_SLOTS)] for mode, p in pools.items()}
        first = {mode: Summary.of(await _first_calls(pools[mode], slots[mode])) for mode in pools}
        ops: dict[str, Callable[[], Awaitable[object]]] = {}
        for mode, pool in pools.items():
            for key, tool in (("oneshot", "bash"), ("session", "bash_session")):
                ops[f"{mode}-{key}"] = functools.partial(pool.execute, slots[mode][0], tool, {"command": "true"})
        t = {k: Summary.of(v) for k, v in (await sample_interleaved(ops, sizes.latency_n)).items()}
        memory = {mode: per_slot_pss(pool) for mode, pool in pools.items()}
        for label, key in (("bash true", "oneshot"), ("bash_session true", "session")):
            allow, public = t[f"allow-{key}"], t[f"public-{key}"]
            rows.append(
                Row(
                    "10 network",
                    f"{label} p50 (public)",
                    ms(public.p50),
                    "ms",
                    f"{label} p50 (allow)",
                    ms(allow.p50),
                    ratio=public.p50 / allow.p50,
                    extra={"p99_ms": ms(public.p99), "allow_p99_ms": ms(allow.p99)},
                )
            )
        rows.append(
            Row(
                "10 network",
                "slot start: first call p50 (public)",
                ms(first["public"].p50),
                "ms",
                "first call p50 (allow)",
                ms(first["allow"].p50),
                ratio=first["public"].p50 / first["allow"].p50,
                note="the slot's sandbox (and link to the hub) start",
                extra={"p99_ms": ms(first["public"].p99), "allow_p99_ms": ms(first["allow"].p99)},
            )
        )
        rows.append(
            Row(
                "10 network",
                "PSS per slot, open session (public)",
                memory["public"],
                "MB",
                "PSS per slot (allow)",
                memory["allow"],
                ratio=memory["public"] / memory["allow"],
                note="the hub's pasta shared by all + bubblewrap + runner + shell, shared pages counted once",
            )
        )
        for mode, pool in pools.items():
            for slot in slots[mode]:
                pool.release(slot)
    finally:
        for pool in pools.values():
            await pool.close()
    return rows
