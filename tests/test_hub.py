"""Network `public` with many slots behind one server's hub (atropos.sandbox.server.hub): one pasta
for all of them, each slot reaching a test host outside the node's subnets, none reaching another
slot, the hub itself or the node's own subnets; and the hub's own ruleset refusing the same even for
a namespace that has none of a slot's prohibit routes. Test hosts live in network namespaces these
tests make (tests/attacks.py), each route checked before a byte is sent."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.attacks import can_make_netns, connect_probe, egress_host, egress_probe, leaks
from tests.security_fixtures import temporary_server
from tests.server_process import RunningServer, hub_holder, server_pastas

REQUIRE_PUBLIC = os.environ.get("ATROPOS_REQUIRE_PUBLIC_NETWORK") == "1"

pytestmark = pytest.mark.skipif(not can_make_netns(), reason="needs root and `ip netns` to make test hosts")

SLOTS = 6
LISTEN = (
    "nohup python3 -c \"import socket; s = socket.socket(); s.bind(('0.0.0.0', {port})); s.listen(64)\n"
    'while True: s.accept()[0].close()" >/dev/null 2>&1 &'
)


def slot_address(slot: int) -> str:
    return f"198.18.{(4 * slot) >> 8}.{(4 * slot + 2) & 255}"


def hub_address(slot: int) -> str:
    return f"198.18.{(4 * slot) >> 8}.{(4 * slot + 1) & 255}"


def run(srv: RunningServer, slot: int, command: str) -> str:
    return str(srv.execute(slot, "bash", command=command, timeout=60)["output"])


def listening(srv: RunningServer, slot: int, port: int) -> None:
    """A TCP service on every address of `slot`, answering its own slot (so it does listen)."""
    srv.execute(slot, "bash_session", command=LISTEN.format(port=port), timeout=30)
    check = f"for i in $(seq 50); do {connect_probe([('127.0.0.1', port)]).splitlines()[0]} && break; sleep 0.1; done"
    assert "LEAK" in run(srv, slot, check), "the slot's own service never answered"


def the_hub(srv: RunningServer) -> int:
    """The hub's holder: the one pasta of this server names its namespaces."""
    pastas = server_pastas(srv.proc.pid)
    assert len(pastas) == 1, pastas
    return hub_holder(pastas[0])


@pytest.fixture
def public() -> None:
    if not REQUIRE_PUBLIC and os.system("command -v pasta >/dev/null && command -v nft >/dev/null") != 0:
        pytest.skip("no pasta or nft here (Debian packages passt, nftables)")


@pytest.mark.usefixtures("public")
def test_many_slots_behind_one_pasta_reach_out_and_not_each_other() -> None:
    port = 31000 + secrets.randbelow(1000)
    options = ("--slots", str(SLOTS), "--network", "public", "--hibernate-after", "0")
    with egress_host() as host, temporary_server("atropos-test-hub-", *options) as srv:
        with ThreadPoolExecutor(SLOTS) as pool:
            outs = list(pool.map(lambda slot: run(srv, slot, egress_probe(host)), range(SLOTS)))
        assert all("EGRESS-OK" in out for out in outs), outs
        the_hub(srv)  # one pasta for the six
        listening(srv, 0, port)
        for slot in range(1, SLOTS):
            targets = [(slot_address(0), port), (hub_address(slot), port), (hub_address(0), port)]
            targets += [(slot_address(other), port) for other in range(SLOTS) if other != slot]
            out = run(srv, slot, connect_probe(targets))
            assert leaks(out) == [], out
        # slot 0 after the others tried: its service still answers, and its own address is its own
        assert "LEAK" in run(srv, 0, connect_probe([(slot_address(0), port)]))


@pytest.mark.usefixtures("public")
def test_the_hubs_ruleset_refuses_what_a_slot_without_routes_would_send() -> None:
    """A namespace linked to the hub as a slot is, but with none of a slot's prohibit routes and
    every capability (what a slot would be if it ever escaped its routes): the hub still refuses
    another slot, itself, and the node's own subnets, and still lets the public test host through."""
    port = 32000 + secrets.randbelow(1000)
    with egress_host() as host, temporary_server("atropos-test-hub-rules-", "--slots", "2") as srv:
        listening(srv, 0, port)
        holder = the_hub(srv)
        link = f"/proc/{holder}/ns/net"
        fake = 4000  # a link number no slot of this server uses
        greeting = f"import socket; print(socket.create_connection(('{host.neighbour}', {host.port}), 5).recv(9))"
        reached = subprocess.run([sys.executable, "-c", greeting], capture_output=True, text=True, timeout=30)
        assert "egress-ok" in reached.stdout, reached  # from the node, the neighbour does answer
        script = f"""
set -e
nsenter --net={link} -- python3 -c "{LISTEN.split('"')[1].format(port=port)}" >/dev/null 2>&1 & listener=$!
ip link add eth0 type veth peer name s{fake} netns {link}
nsenter --net={link} -- ip addr add {hub_address(fake)}/30 dev s{fake}
nsenter --net={link} -- ip link set s{fake} up
ip addr add {slot_address(fake)}/30 dev eth0
ip link set eth0 up
ip link set lo up
ip route add default via {hub_address(fake)}
set +e
{egress_probe(host)}
{connect_probe([(slot_address(0), port), (hub_address(fake), port), (host.neighbour, host.port)])}
nsenter --net={link} -- {connect_probe([("127.0.0.1", port)]).splitlines()[0].replace("LEAK", "HUB-LISTENS")}
kill "$listener"
"""
        uid, gid = os.stat(f"/proc/{holder}").st_uid, os.stat(f"/proc/{holder}").st_gid
        as_server = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        in_hub = ["nsenter", f"--user=/proc/{holder}/ns/user", "--preserve-credentials", "--", "unshare", "--net"]
        done = subprocess.run(  # as the server's user, the hub's owner, as the server links a slot
            [*as_server, *in_hub, "--", "/bin/sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "EGRESS-OK" in done.stdout, (done.stdout, done.stderr)
        assert leaks(done.stdout) == [], done.stdout
        assert "HUB-LISTENS" in done.stdout, done.stdout  # the hub's own service was there to refuse


@pytest.mark.usefixtures("public")
def test_a_killed_pasta_is_started_again_and_the_slots_go_on() -> None:
    """The hub's one pasta is every slot's way out: killed, the server starts another into the same
    hub, and the slots (awake and asleep) reach the test host again, with their confinement."""
    options = ("--slots", "2", "--network", "public", "--hibernate-after", "0.2")
    with egress_host() as host, temporary_server("atropos-test-hub-pasta-", *options) as srv:
        for slot in (0, 1):
            assert "EGRESS-OK" in run(srv, slot, egress_probe(host))
        (first,) = server_pastas(srv.proc.pid)
        holder = the_hub(srv)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not (again := [p for p in server_pastas(srv.proc.pid) if p != first]):
            assert time.monotonic() < deadline, "no new pasta"
            time.sleep(0.05)
        assert the_hub(srv) == holder  # the same hub: the slots' links are where they were
        for slot in (0, 1):
            out = ""
            for _ in range(50):  # the new pasta's routes may still be on their way
                out = run(srv, slot, egress_probe(host) + "\n" + connect_probe([(host.neighbour, host.port)]))
                if "EGRESS-OK" in out:
                    break
                time.sleep(0.1)
            assert "EGRESS-OK" in out and leaks(out) == [], out
        assert again == server_pastas(srv.proc.pid)


HOLD = """
import resource, socket, sys, time
t0 = time.monotonic()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held, refused = [], 0
for _ in range({tries}):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(("{address}", {port}))
        held.append(s)
    except OSError:
        refused += 1
        s.close()
print("HELD", len(held), "REFUSED", refused, "IN", round(time.monotonic() - t0, 1), flush=True)
sys.stdin.read()  # hold them until the session ends the program
"""


@pytest.mark.usefixtures("public")
def test_a_slot_flooding_the_shared_pasta_with_connections_is_capped_and_the_others_go_on() -> None:
    """One pasta serves every slot: a slot that opens connections without end gets the hub's cap
    (its share of pasta's file descriptors: a few hundred with 64 slots here), the rest refused at
    once, and another slot still goes out."""
    from atropos.sandbox.server.hub import flows_per_slot

    cap = flows_per_slot(64)
    options = ("--slots", "64", "--warm-slots", "0")
    with egress_host() as host, temporary_server("atropos-test-hub-flood-", *options) as srv:
        script = HOLD.format(tries=cap + 100, address=host.address, port=host.port)
        srv.execute(0, "write_file", path="hold.py", content=script, timeout=30)
        srv.execute(0, "bash_session", command="python3 hold.py > held.txt 2>&1 < <(sleep 600) &", timeout=30)
        out = ""
        for _ in range(600):
            out = run(srv, 0, "cat held.txt")
            if "HELD" in out:
                break
            time.sleep(0.1)
        held, refused = (int(n) for n in out.split()[1:4:2])
        # conntrack's count is exact but for connections still on their way when it is read
        assert cap <= held <= cap + cap // 10 and held + refused == cap + 100, out
        assert "EGRESS-OK" in run(srv, 1, egress_probe(host))  # the neighbour is not starved


TAMPER = """
ip addr add {other}/30 dev eth0 2>/dev/null && echo LEAK addr-add
ip addr del {own}/30 dev eth0 2>/dev/null && echo LEAK addr-del
ip route del prohibit 10.0.0.0/8 2>/dev/null && echo LEAK route-del
ip route replace default dev eth0 2>/dev/null && echo LEAK route-replace
ip link set eth0 down 2>/dev/null && echo LEAK link-down
ip link add x0 type veth peer name x1 2>/dev/null && echo LEAK link-add
python3 -c 'import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)' 2>/dev/null && echo LEAK packet-socket
python3 -c 'from socket import *; socket(AF_INET, SOCK_RAW, IPPROTO_TCP)' 2>/dev/null && echo LEAK raw-socket
ip -6 addr show dev eth0 | grep -q inet6 && echo LEAK ipv6-address
ip -o link show | grep -v -e ' lo:' -e ' eth0@' && echo LEAK other-link
ip -4 -o addr show eth0 | grep -q '{own}/30' || echo LEAK lost-own-address
true
"""


@pytest.mark.usefixtures("public")
def test_a_slot_cannot_change_its_link_spoof_a_neighbour_or_open_raw_sockets() -> None:
    """What a hostile agent tries on its own link: take another slot's address, drop its prohibit
    routes, reroute, add links, send raw packets, or use IPv6 around the hub's IPv4 rules."""
    with egress_host() as host, temporary_server("atropos-test-hub-tamper-", "--slots", "2") as srv:
        for slot in (0, 1):
            out = run(srv, slot, TAMPER.format(own=slot_address(slot), other=slot_address(1 - slot)))
            assert leaks(out) == [], out
            assert "EGRESS-OK" in run(srv, slot, egress_probe(host))  # and its network still works


@pytest.mark.usefixtures("public")
def test_a_link_left_in_the_hub_under_a_slots_name_is_replaced() -> None:
    """A slot's last sandbox may leave its link in the hub a moment (its namespace not yet gone):
    the next sandbox of that slot removes it and links itself, with its whole confinement."""
    options = ("--slots", "2", "--network", "public", "--warm-slots", "0")
    with egress_host() as host, temporary_server("atropos-test-hub-relink-", *options) as srv:
        assert "EGRESS-OK" in run(srv, 0, egress_probe(host))  # the hub is up
        in_hub = ["nsenter", "-t", str(the_hub(srv)), "-U", "-n"]
        subprocess.run([*in_hub, "ip", "link", "add", "s1", "type", "veth", "peer", "name", "old1"], check=True)
        refused = connect_probe([(host.neighbour, host.port), (hub_address(0), 22)])
        out = run(srv, 1, egress_probe(host) + "\n" + refused)
        assert "EGRESS-OK" in out and leaks(out) == [], out
        shown = subprocess.run([*in_hub, "ip", "-d", "-o", "link", "show", "s1"], capture_output=True, text=True)
        assert "link-netnsid" in shown.stdout, shown.stdout + shown.stderr  # its peer is the slot's eth0
