"""A node cut off from the pool: a server in a network namespace this test makes, reached through a
veth pair, whose packets stop being answered (dropped inside the namespace: no refusal comes back,
as when a node's link goes down). The pool declares it lost within about `health_timeout` plus one
probe interval, and names it silent, never refused."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
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
from tests.attacks import can_make_netns, veth_namespace
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


@contextmanager
def node_with_a_server() -> Iterator[Node]:
    """A sandbox server in a namespace of its own, behind a veth pair (tests.attacks.veth_namespace)."""
    token = secrets.token_hex(16)
    data_dir = tempfile.mkdtemp(prefix="atropos-cut-")
    server: subprocess.Popen[str] | None = None
    with veth_namespace("ct", 192) as net:
        try:
            net.assert_routed_here(net.inner_ip)
            server = subprocess.Popen(
                ["ip", "netns", "exec", net.ns, sys.executable, "-m", "atropos.sandbox.server", "--host", net.inner_ip,
                 "--port", "0", "--data-dir", data_dir, "--slots", str(SLOTS)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                env={**os.environ, "ATROPOS_SANDBOX_TOKEN": token},
            )  # fmt: skip
            yield Node(net.ns, wait_ready(server, "the server on the node"), token)
        finally:
            if server is not None:
                server.kill()
                server.communicate(timeout=20)
            shutil.rmtree(data_dir, ignore_errors=True)


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
