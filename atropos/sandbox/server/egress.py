"""Network mode `public`: each slot gets its own network namespace that reaches public addresses only.

`allow` shares the node's network namespace with the slots: the node's loopback services (a Nomad,
Consul or Vault agent, other servers' ports), link-local metadata addresses and the cluster's
private ranges are all one connect() away. `public` puts each slot's sandbox in a fresh network
namespace linked to the server's hub (atropos.sandbox.server.hub): one network namespace with one
`pasta` (Debian's `passt`), a user-space NAT that needs no privileges, for all the server's slots.

    nsenter --user=HUB --preserve-credentials -- unshare --net -- /bin/sh -c SETUP bwrap ... runner

- SETUP, as root of the hub's user namespace (every capability in it and in the slot's new network
  namespace, none outside): a veth pair, `eth0` in the slot and `sN` in the hub, a /30 of its own
  (198.18.0.0/15, a benchmarking range no node uses), the default route through the hub, and a
  `prohibit` route for every loopback, private, link-local, shared, multicast and reserved range and
  for every subnet and address of the node's own interfaces: a connect() there fails at once with
  EACCES inside the slot. Then `exec unshare --user --map-user=UID --map-group=GID` into a nested
  user namespace where the server's own uid is itself again, and from there bubblewrap
  (unprivileged, as without a network of its own). The slot's processes run without capabilities
  and cannot change any of it.
- The hub refuses the same ranges again (its nftables ruleset), and anything from a slot to another
  slot or to the hub itself; what it lets out it masquerades to its own address for pasta.
- pasta options: no port forwarding in either direction (`-t/-u/-T/-U none`: without this the
  hub's 127.0.0.1:PORT would reach the node's PORT), the gateway not mapped to the node's loopback
  (`--no-map-gw`), IPv4 only (`-4`), DNS answered only at one address (`--dns-forward`) and relayed
  to the node's resolver; the slot's /etc/resolv.conf names that address.
- pasta joins the hub's namespaces from outside (it enters them with setns, keeping its capabilities
  there) rather than starting a command itself: a command pasta starts gets its capabilities back
  through exec, which no_new_privs forbids, and Apptainer always sets no_new_privs.

With the compiled runner, its binary does all of this itself (`atropos-runner --slot-net ...`, the
same steps as system calls and netlink messages in one process: the chain's eight programs cost a
slot's start ~15 ms); the Python runner's servers run the chain.

A slot costs no process for its network: hibernation leaves the link in place, and waking needs
nothing. Where pasta (or `ip`, `unshare`, `nsenter`, `nft`, a usable /dev/net/tun) is missing,
`auto` falls back to `deny` and says why.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass

from atropos.sandbox.server.hub import SLOT_LINK, TAP, Hub, default_route_devices, flows_per_slot, ruleset
from atropos.sandbox.settings import TUN_DEVICE

# destinations a slot never reaches, besides the node's own subnets (RFC 6890 special-purpose ranges)
BLOCKED_V4 = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # shared address space (carrier-grade NAT, some cluster fabrics)
    "127.0.0.0/8",  # loopback (the slot's own lo answers for its own addresses)
    "169.254.0.0/16",  # link-local: cloud metadata services
    "172.16.0.0/12",  # private
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, broadcast
)

# where the slot sends DNS queries; pasta relays them to the node's resolver. An IETF
# protocol-assignment address (RFC 6890): never a real host, and outside every blocked range.
DNS_ADDRESS = "192.0.0.53"
# each slot's link to the hub: slot N has the /30 at 4 * N (the hub's end .1, the slot's .2); the
# whole range is blocked, so a slot reaches neither another slot nor, past its own /30, the hub
SLOT_NET = ipaddress.IPv4Network("198.18.0.0/15")
PROBE_SLOT = 4096  # the start-up probe's link, beside every slot's (at most 4096)


def find_pasta() -> str | None:
    """$ATROPOS_PASTA, else `pasta` on PATH."""
    return os.environ.get("ATROPOS_PASTA") or shutil.which("pasta")


def node_prefixes() -> list[str]:
    """Every IPv4 address of this node's interfaces, and the subnet each one is on."""
    proc = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10, check=True)
    found: list[str] = []
    for line in proc.stdout.splitlines():
        words = line.split()
        if "inet" not in words:
            continue
        iface = ipaddress.IPv4Interface(words[words.index("inet") + 1])
        found += [str(iface.network), f"{iface.ip}/32"]
    return list(dict.fromkeys(found))


def blocked_prefixes(extra: list[str]) -> list[str]:
    """BLOCKED_V4 and `extra`, without the ones a wider blocked range already covers."""
    nets = sorted(
        {ipaddress.IPv4Network(p, strict=False) for p in (*BLOCKED_V4, *extra)},
        key=lambda n: (n.prefixlen, int(n.network_address)),
    )
    kept: list[ipaddress.IPv4Network] = []
    for net in nets:
        if not any(net.subnet_of(k) for k in kept):
            kept.append(net)
    return [str(n) for n in kept]


def has_default_route(table: str = "/proc/net/route") -> bool:
    """Whether this network namespace has a default IPv4 route."""
    devices = default_route_devices(table)
    return True if devices is None else bool(devices)  # cannot tell: let pasta try


def slot_link(slot: int) -> tuple[str, str, str]:
    """Slot `slot`'s link to the hub: the hub's device, the hub's address and the slot's (/30)."""
    base = SLOT_NET.network_address + 4 * slot
    if not 0 <= slot <= PROBE_SLOT:
        raise ValueError(f"slot {slot} has no link to the hub (0..{PROBE_SLOT})")
    return f"{SLOT_LINK}{slot}", f"{base + 1}/30", f"{base + 2}/30"


@dataclass(frozen=True)
class Egress:
    """How to start a command in its own network namespace behind the server's hub (see the
    module docstring)."""

    hub: Hub
    blocked: tuple[str, ...]
    resolv_conf: str
    helper: str | None = None  # the compiled runner's binary: links a slot itself (`--slot-net`)

    @classmethod
    def prepare(cls, pasta: str, state_dir: str, slots: int, helper: str | None = None) -> Egress:
        """The hub for `slots` slots started, its ruleset and the slots' resolver file written into
        `state_dir` (the data dir, which slots never see); `helper`: see the module docstring."""
        for tool, package in (
            ("ip", "iproute2"),
            ("unshare", "util-linux"),
            ("nsenter", "util-linux"),
            ("nft", "nftables"),
        ):
            if shutil.which(tool) is None:
                raise OSError(f"the `{tool}` command ({package}) is not installed")
        # without the device pasta waits forever instead of failing
        if not os.access(TUN_DEVICE, os.R_OK | os.W_OK):
            raise OSError(
                f"{TUN_DEVICE} is missing or not open to this user (pasta needs it; in a container pass "
                "--device /dev/net/tun, under apptainer --bind /dev/net/tun; on the host mode 0666)"
            )
        if not has_default_route():
            # pasta takes the slots' traffic out through the node's default route; with none it
            # never sets up the hub's network (an air-gapped node): say so now, not after a wait
            raise OSError("this node has no default IPv4 route: a slot's traffic could go nowhere public")
        nodes = node_prefixes()
        clash = [p for p in nodes if ipaddress.IPv4Network(p).overlaps(SLOT_NET)]
        if clash:
            raise OSError(f"this node's addresses {', '.join(clash)} are in {SLOT_NET}, the slots' links")
        blocked = tuple(blocked_prefixes(nodes))
        rules = os.path.join(state_dir, "hub.nft")
        resolv = os.path.join(state_dir, "slot-resolv.conf")
        texts = ((rules, ruleset(list(blocked), flows_per_slot(slots))), (resolv, f"nameserver {DNS_ADDRESS}\n"))
        for path, text in texts:
            with open(path, "w", encoding="ascii") as fh:
                fh.write(text)
        hub = Hub.start(rules, lambda pid: pasta_argv(pasta, pid), os.path.join(state_dir, "hub-pasta.log"))
        return cls(hub, blocked, resolv, helper)

    def wrap(self, argv: list[str], slot: int) -> list[str]:
        """`argv` (bubblewrap's) started in a new network namespace linked to the hub as slot `slot`
        (see the module docstring)."""
        hub_dev, hub_addr, addr = slot_link(slot)
        gateway = hub_addr.split("/")[0]
        if self.helper is not None:
            return [
                self.helper,
                "--slot-net",
                *("--hub-user", self.hub.userns, "--hub-net", self.hub.netns),
                *("--hub-dev", hub_dev, "--hub-addr", hub_addr, "--addr", addr, "--gateway", gateway),
                *("--prohibit", ",".join(self.blocked), "--map", f"{os.getuid()}:{os.getgid()}"),
                "--",
                *argv,
            ]
        link = f"ip link add eth0 type veth peer name {hub_dev} netns {self.hub.netns}"
        hub_side = f"addr add {hub_addr} dev {hub_dev}\nlink set {hub_dev} up\n"
        slot_side = "\n".join(
            [
                f"addr add {addr} dev eth0",
                "link set eth0 up",
                "link set lo up",
                f"route add default via {gateway}",
                *(f"route add prohibit {prefix}" for prefix in self.blocked),
            ]
        )
        setup = (
            "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6 2>/dev/null; "
            # a link the slot's last sandbox left in the hub (its namespace not yet gone): replaced
            f"{link} 2>/dev/null || {{ nsenter --net={self.hub.netns} -- ip link del {hub_dev}; {link}; }} || exit 1; "
            f"printf '{hub_side}' | nsenter --net={self.hub.netns} -- ip -batch - || exit 1; "
            f"printf '{slot_side}\n' | ip -batch - || exit 1; "
            f'exec unshare --user --map-user={os.getuid()} --map-group={os.getgid()} -- "$@"'
        )
        return [
            "nsenter",
            f"--user={self.hub.userns}",
            "--preserve-credentials",  # the hub refuses setgroups; our uid is its root anyway
            "--",
            "unshare",
            "--net",
            "--",
            "/bin/sh",
            "-c",
            setup,
            "atropos-slot-net",
            *argv,
        ]

    def close(self) -> None:
        self.hub.close()


def pasta_argv(pasta: str, pid: int) -> list[str]:
    """pasta for the hub's namespaces (those of its holder, `pid`)."""
    return [
        pasta,
        "--config-net",
        "--foreground",
        "--quiet",
        "--ipv4-only",
        "--no-map-gw",
        "--tcp-ports",
        "none",
        "--udp-ports",
        "none",
        "--tcp-ns",
        "none",
        "--udp-ns",
        "none",
        "--ns-ifname",
        TAP,
        "--dns-forward",
        DNS_ADDRESS,
        "--no-dhcp",
        "--no-ndp",
        "--no-dhcpv6",
        "--no-ra",
        "--netns",
        f"/proc/{pid}/ns/net",
        "--userns",
        f"/proc/{pid}/ns/user",
    ]
