"""A node cut off from the pool: a server in a network namespace this test makes, reached through a
veth pair, whose packets stop being answered (dropped inside the namespace: no refusal comes back,
as when a node's link goes down). The pool declares it lost within about `health_timeout` plus one
probe interval, and names it silent, never refused."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest

from atropos.backends.base import SandboxBackend, ServerInfo
from atropos.errors import BackendError
from atropos.progress import Progress, no_progress
from atropos.slots import SlotLost, SlotPool, SlotPoolConfig
from tests.attacks import can_make_netns
from tests.faults import wait_for
from tests.server_process import wait_ready

pytestmark = pytest.mark.skipif(
    not can_make_netns() or subprocess.run(["which", "iptables"], capture_output=True).returncode != 0,
    reason="needs root, network namespaces and iptables",
)


SLOTS = 4


@dataclass(frozen=True)
class Node:
    ns: str
    url: str
    token: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@contextmanager
def node_with_a_server() -> Iterator[Node]:
    """A sandbox server in a namespace of its own, on 198.51.100.x (TEST-NET-2) behind a veth pair."""
    tag = secrets.token_hex(3)
    ns, outer, inner = f"atr-cut-{tag}", f"atrct{tag}o", f"atrct{tag}i"
    net = 128 + secrets.randbelow(32) * 4
    outer_ip, inner_ip = f"198.51.100.{net + 1}", f"198.51.100.{net + 2}"
    token = secrets.token_hex(16)
    data_dir = tempfile.mkdtemp(prefix="atropos-cut-")
    server: subprocess.Popen[str] | None = None
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("addr", "add", f"{outer_ip}/30", "dev", outer)
        _ip("link", "set", outer, "up")
        _ip("-n", ns, "addr", "add", f"{inner_ip}/30", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        route = subprocess.run(["ip", "route", "get", inner_ip], capture_output=True, text=True, check=True).stdout
        assert f"dev {outer} " in route, route  # into our namespace, nowhere else
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "atropos.sandbox.server", "--host", inner_ip,
             "--port", "0", "--data-dir", data_dir, "--slots", str(SLOTS)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "ATROPOS_SANDBOX_TOKEN": token},
        )  # fmt: skip
        yield Node(ns, wait_ready(server, "the server on the node"), token)
    finally:
        if server is not None:
            server.kill()
            server.communicate(timeout=20)
        subprocess.run(["ip", "link", "del", outer], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["rm", "-rf", data_dir], check=False)


class OneNode(SandboxBackend):
    """The pool's one server is the node's; a replacement has nowhere to go."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def add_servers(self, count: int, progress: Progress = no_progress) -> list[ServerInfo]:
        return [ServerInfo("node-1", self.node.url, self.node.token, SLOTS)]

    async def remove_server(self, server_id: str) -> None:
        return None

    async def replace_server(self, server_id: str, progress: Progress = no_progress) -> list[ServerInfo]:
        raise BackendError("no other node")

    async def close(self) -> None:
        return None


async def test_a_node_cut_off_is_lost_within_the_health_timeout_and_named_silent() -> None:
    health_timeout, interval = 1.0, 0.25
    config = SlotPoolConfig(
        min_containers=1, max_containers=1, health_interval=interval, health_timeout=health_timeout, start_timeout=30
    )
    said: list[str] = []
    with node_with_a_server() as node:
        async with SlotPool(config, backend=OneNode(node), progress=said.append) as pool:
            slots = [await pool.acquire(f"on-the-node-{i}") for i in range(SLOTS)]
            # calls in flight hold every kept-alive connection: the next health probe needs a new one,
            # and a new connection to a silent node is where the wait was 5 s whatever health_timeout said
            calls = [asyncio.ensure_future(pool.execute(s, "bash", {"command": "sleep 60"})) for s in slots]
            async with httpx.AsyncClient() as probe:  # not the pool's: its connections stay as the calls left them
                while (await probe.get(node.url + "/health", timeout=5)).json()["busy"] < SLOTS:
                    await asyncio.sleep(0.05)
            # the cut: everything that reaches the node is dropped, nothing answers, nothing refuses
            subprocess.run(["ip", "netns", "exec", node.ns, "iptables", "-I", "INPUT", "-j", "DROP"], check=True)
            cut = time.monotonic()
            assert await wait_for(lambda: pool.stats().servers_lost == 1, every=0.02)
            lost_after = time.monotonic() - cut
            for call in calls:
                with pytest.raises(SlotLost):
                    await call
    print(f"[node cut] declared lost {lost_after:.2f}s after the cut (health_timeout {health_timeout}s)")
    line = next(m for m in said if " lost (" in m)
    assert "/health unanswered" in line and "refused" not in line, line
    # the deadline of the health probe, connect included, plus one probe interval (and the loop's own tick)
    assert lost_after < health_timeout + interval + 1.0, lost_after  # it was 5 s: the connect timeout
