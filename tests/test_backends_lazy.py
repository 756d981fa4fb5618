"""A local pool loads no cluster client: python-nomad and its HTTP stack (requests, httpx, tenacity)
are imported when a Nomad backend is built, not before."""

from __future__ import annotations

import json
import subprocess
import sys

CLIENTS = ("nomad", "requests", "httpx", "tenacity")


def _loaded(program: str) -> list[str]:
    code = f"CLIENTS = {CLIENTS!r}\n{program}\nprint(json.dumps([m for m in CLIENTS if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_a_local_pool_imports_no_cluster_client() -> None:
    program = """
import asyncio, json, sys
from atropos.slots import SlotPool, SlotPoolConfig

async def main():
    async with SlotPool(SlotPoolConfig(slots_per_container=1, min_containers=1, max_containers=1)) as pool:
        async with pool.slot("t") as slot:
            assert (await pool.execute(slot, "bash", {"command": "true"})).ok

asyncio.run(main())
"""
    assert _loaded(program) == []


def test_a_nomad_config_loads_its_client_only_when_built() -> None:
    program = """
import json, sys
from atropos.backends import BACKEND_KINDS
from atropos.slots import SlotPoolConfig

config = SlotPoolConfig(backend={"type": "nomad", "address": "http://127.0.0.1:1"})
assert BACKEND_KINDS == ("local", "nomad", "slurm")
before = [m for m in CLIENTS if m in sys.modules]
assert before == [], before
config.backend.build(config.server_spec())
"""
    assert {"nomad", "requests", "tenacity"} <= set(_loaded(program))
