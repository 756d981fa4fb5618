"""Isolation of a plain-process server with its defaults, attacked from inside a slot.

A slot must not run as root on the node, see another slot's files or the server's token, or reach
the node's loopback services (a listener this test opens, the server's own port) under the default
network mode; with `deny` nothing is reachable; with `public` a host outside the node's subnets
(in a network namespace this test made) is. Each probe is also run where the attack must work
(isolation none, network allow), so a probe that cannot detect a leak fails.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.attacks import (
    can_make_netns,
    connect_probe,
    egress_host,
    egress_probe,
    file_probe,
    host_uid,
    leaks,
    loopback_listener,
    token_probe,
)
from tests.security_fixtures import temporary_server
from tests.server_process import (
    RunningServer,
    hub_holder,
    pids_with_arg,
    server_pastas,
    wait_for_pids,
    wait_ready,
)

# CI installs pasta and opens /dev/net/tun: there the default network mode must be `public`
REQUIRE_PUBLIC = os.environ.get("ATROPOS_REQUIRE_PUBLIC_NETWORK") == "1"


@pytest.fixture(scope="module")
def default_server() -> Iterator[RunningServer]:
    with temporary_server("atropos-test-defaults-", "--slots", "2") as srv:
        yield srv


@pytest.fixture(scope="module")
def open_server() -> Iterator[RunningServer]:
    with temporary_server("atropos-test-open-", "--slots", "2", "--isolation", "none") as srv:
        yield srv


def health(srv: RunningServer) -> dict[str, object]:
    return dict(httpx.get(srv.url + "/health", timeout=10).json())


def run(srv: RunningServer, slot: int, command: str) -> str:
    return str(srv.execute(slot, "bash", command=command, timeout=60)["output"])


def server_port(srv: RunningServer) -> int:
    port = urlsplit(srv.url).port
    assert port is not None
    return port


def test_defaults_are_bwrap_and_confined_network(default_server: RunningServer) -> None:
    h = health(default_server)
    assert h["isolation"] == "bwrap", h
    if REQUIRE_PUBLIC:
        assert h["network"] == "public", h
    assert h["network"] in ("public", "deny"), h  # never `allow` unless asked for
    assert h["uid"] != 0 and "token" not in str(h)


def test_slot_processes_never_run_as_root_on_the_node(default_server: RunningServer) -> None:
    marker = f"4444.{secrets.randbelow(10**9):09d}"
    default_server.execute(0, "bash", command=f"setsid sleep {marker} >/dev/null 2>&1 &")
    assert wait_for_pids(marker, 1) == 1
    pid = pids_with_arg(marker)[0]
    try:
        assert host_uid(pid) != 0
        assert host_uid(pid) == health(default_server)["uid"]
        assert run(default_server, 0, "id -u").strip() != "0"
    finally:
        default_server.execute(0, "bash", command=f"pkill -f 'sleep {marker}'")


def _cross_slot_paths(srv: RunningServer) -> list[str]:
    return [
        os.path.join(srv.data_dir, "slots", "0", "secret.txt"),
        "../0/secret.txt",
        "/workspace/../0/secret.txt",
        "/proc/[0-9]*/cwd/secret.txt",
        "/proc/[0-9]*/root/workspace/secret.txt",
    ]


def test_another_slots_files_are_invisible(default_server: RunningServer, open_server: RunningServer) -> None:
    needle = secrets.token_hex(12)
    for srv in (default_server, open_server):
        srv.execute(0, "write_file", path="secret.txt", content=needle)
    assert leaks(run(default_server, 1, file_probe(_cross_slot_paths(default_server), needle))) == []
    # the probe finds the file where nothing separates the slots
    assert leaks(run(open_server, 1, file_probe(_cross_slot_paths(open_server), needle)))


def test_the_token_is_unreadable_from_a_slot(default_server: RunningServer) -> None:
    assert leaks(run(default_server, 1, token_probe(default_server.token))) == []


def test_token_probe_detects_a_token_in_sight(open_server: RunningServer) -> None:
    """The probe itself: a token in the slot's environment is reported."""
    out = run(open_server, 1, f"export LEAKED={open_server.token}\n{token_probe(open_server.token)}")
    assert "env" in leaks(out)


def test_default_network_reaches_no_loopback_service_of_the_node(default_server: RunningServer) -> None:
    with loopback_listener() as port:
        targets = [("127.0.0.1", port), ("127.0.0.1", server_port(default_server)), ("localhost", port)]
        assert leaks(run(default_server, 1, connect_probe(targets))) == []


def test_network_allow_reaches_the_nodes_loopback(tmpdir_path: str) -> None:
    """Where the probe must succeed: `allow` shares the node's network (why it is not the default)."""
    with (
        temporary_server("atropos-test-allow-", "--slots", "1", "--network", "allow") as srv,
        loopback_listener() as port,
    ):
        assert health(srv)["network"] == "allow"
        found = leaks(run(srv, 0, connect_probe([("127.0.0.1", port), ("127.0.0.1", server_port(srv))])))
        assert found == [f"127.0.0.1:{port}", f"127.0.0.1:{server_port(srv)}"]


@pytest.mark.skipif(not can_make_netns(), reason="needs root and `ip netns` to make a test host")
@pytest.mark.parametrize("network", ["public", "deny"])
def test_egress_to_a_host_outside_the_node(network: str) -> None:
    if network == "public" and not REQUIRE_PUBLIC and os.system("command -v pasta >/dev/null") != 0:
        pytest.skip("no pasta here (Debian package passt)")
    with (
        egress_host() as host,
        temporary_server(f"atropos-test-{network}-", "--slots", "1", "--network", network) as srv,
        loopback_listener() as port,
    ):
        assert health(srv)["network"] == network
        out = run(srv, 0, egress_probe(host) + "\n" + connect_probe([("127.0.0.1", port)]))
        assert ("EGRESS-OK" in out) == (network == "public"), out
        assert leaks(out) == []


@pytest.mark.skipif(not can_make_netns(), reason="needs root and `ip netns` to make a test host")
def test_public_network_refuses_the_nodes_own_subnets() -> None:
    """An address on one of the node's interfaces' subnets (here: the test host's veth) is prohibited."""
    if not REQUIRE_PUBLIC and os.system("command -v pasta >/dev/null") != 0:
        pytest.skip("no pasta here (Debian package passt)")
    with egress_host() as host, temporary_server("atropos-test-subnet-", "--slots", "1", "--network", "public") as srv:
        link = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "dev", host.interface],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.split()[3]
        peer = link.split("/")[0].rsplit(".", 1)
        inner = f"{peer[0]}.{int(peer[1]) + 1}"
        out = run(srv, 0, f"timeout 3 bash -c 'exec 3<>/dev/tcp/{inner}/{host.port}' 2>&1; echo rc=$?")
        assert "rc=0" not in out and "ermission denied" in out, out


def test_one_pasta_per_server_and_it_dies_with_a_killed_server() -> None:
    """All slots leave through the server's hub: one pasta, whatever the number of slots awake. It
    and the hub's holder (which keeps the hub's namespaces) would outlive a killed server: they die with it."""
    if not REQUIRE_PUBLIC and os.system("command -v pasta >/dev/null") != 0:
        pytest.skip("no pasta here (Debian package passt)")
    options = ("--slots", "3", "--network", "public", "--hibernate-after", "0")
    with temporary_server("atropos-test-pasta-", *options) as srv:
        for slot in (0, 1, 2):
            srv.execute(slot, "bash", command="true")
        pastas = server_pastas(srv.proc.pid)
        assert len(pastas) == 1
        holder = hub_holder(pastas[0])
        assert _parent(holder) == srv.proc.pid
        srv.proc.kill()
        srv.proc.wait()
        assert wait_gone([*pastas, holder]) == []


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[1])
    except OSError:
        return -1


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [
            p
            for p in alive
            if os.path.exists(f"/proc/{p}")
            and _parent(p) != -1
            and open(f"/proc/{p}/stat", "rb").read().rsplit(b")", 1)[1].split()[0] != b"Z"
        ]
        time.sleep(0.05)
    return alive


@pytest.mark.skipif(not can_make_netns(), reason="needs root to make a network namespace")
def test_a_node_without_a_default_route_falls_back_to_deny_at_once_and_says_why(tmpdir_path: str) -> None:
    # an air-gapped node: only loopback. `auto` used to wait 10 s for pasta before it fell back;
    # the reason now comes from the node's own routes, before any slot starts
    ns = f"atr-noroute-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=20)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True, timeout=20)
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "atropos.sandbox.server", "--port", "0",
             "--data-dir", os.path.join(tmpdir_path, "data"), "--slots", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "ATROPOS_SANDBOX_TOKEN": "t"},
        )  # fmt: skip
        try:
            url = wait_ready(server, "server in a namespace with loopback only")
            probe = (
                f"import urllib.request; print(urllib.request.urlopen({url + '/health'!r}, timeout=10).read().decode())"
            )
            health = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-c", probe], capture_output=True, text=True, timeout=30
            )
        finally:
            server.terminate()
            server.communicate(timeout=20)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False, timeout=20)
    assert health.returncode == 0, health.stderr
    body = json.loads(health.stdout)
    assert (body["isolation"], body["network"]) == ("bwrap", "deny"), body
    assert "no default IPv4 route" in body["network_reason"], body
