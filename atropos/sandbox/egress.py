"""Network mode `public`: each slot gets its own network namespace that reaches public addresses only.

`allow` shares the node's network namespace with the slots: the node's loopback services (a Nomad,
Consul or Vault agent, other servers' ports), link-local metadata addresses and the cluster's
private ranges are all one connect() away. `public` puts each slot's sandbox in a fresh user and
network namespace run by `pasta` (Debian's `passt`), a user-space NAT that needs no privileges:

    pasta [options] -- unshare --mount /bin/sh -c 'mount -t proc proc /proc && ip -batch ROUTES &&
        exec "$@"' ROUTES bwrap ... runner

- pasta options: no port forwarding in either direction (`-t/-u/-T/-U none`: without this the
  slot's 127.0.0.1:PORT would reach the host's PORT), the gateway not mapped to the host's loopback
  (`--no-map-gw`), IPv4 only (`-4`), DNS answered only at one address (`--dns-forward`) and relayed
  to the node's resolver; the slot's /etc/resolv.conf names that address.
- ROUTES (as root of pasta's user namespace, before bubblewrap drops every capability): the main
  table flushed, a default route on the tap device (pasta answers ARP for any address), and a
  `prohibit` route for every loopback, private, link-local, shared, multicast and reserved range
  and for every subnet and address of the node's own interfaces. A connect() there fails at once
  with EACCES inside the slot and never reaches pasta. The slot's own 127.0.0.1 is its own
  namespace's loopback, with nothing of the node's on it.
- pasta starts the command in a PID namespace of its own; bubblewrap reads its child's entries in
  /proc, so a private mount namespace gets a /proc of that PID namespace first.
- the slot's processes cannot change any of it: bubblewrap runs them without capabilities in a
  user namespace nested inside pasta's.

Where pasta (or `ip`, or /dev/net/tun) is missing, or the server runs under no_new_privs (inside
Apptainer, which always sets it), `auto` falls back to `deny` and says why.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass

# destinations a slot never reaches, besides the node's own subnets (RFC 6890 special-purpose ranges)
BLOCKED_V4 = (
    "0.0.0.0/8",        # "this network"
    "10.0.0.0/8",       # private
    "100.64.0.0/10",    # shared address space (carrier-grade NAT, some cluster fabrics)
    "127.0.0.0/8",      # loopback (the slot's own lo answers for its own addresses)
    "169.254.0.0/16",   # link-local: cloud metadata services
    "172.16.0.0/12",    # private
    "192.168.0.0/16",   # private
    "198.18.0.0/15",    # benchmarking
    "224.0.0.0/4",      # multicast
    "240.0.0.0/4",      # reserved, broadcast
)

# where the slot sends DNS queries; pasta relays them to the node's resolver. An IETF
# protocol-assignment address (RFC 6890): never a real host, and outside every blocked range.
DNS_ADDRESS = "192.0.0.53"
INTERFACE = "tap0"
TUN_DEVICE = "/dev/net/tun"


def _no_new_privs() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return any(line.split() == ["NoNewPrivs:", "1"] for line in fh)
    except OSError:
        return False


def find_pasta() -> str | None:
    """$ATROPOS_PASTA, else `pasta` on PATH."""
    return os.environ.get("ATROPOS_PASTA") or shutil.which("pasta")


def node_prefixes() -> list[str]:
    """Every IPv4 address of this node's interfaces, and the subnet each one is on."""
    proc = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                          timeout=10, check=True)
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
    nets = sorted({ipaddress.IPv4Network(p, strict=False) for p in (*BLOCKED_V4, *extra)},
                  key=lambda n: (n.prefixlen, int(n.network_address)))
    kept: list[ipaddress.IPv4Network] = []
    for net in nets:
        if not any(net.subnet_of(k) for k in kept):
            kept.append(net)
    return [str(n) for n in kept]


@dataclass(frozen=True)
class Egress:
    """How to start a command inside its own pasta-run network namespace (see the module docstring)."""

    pasta: str
    routes_file: str
    resolv_conf: str

    @classmethod
    def prepare(cls, pasta: str, state_dir: str) -> Egress:
        """Write the route batch and the resolver file once per server, into `state_dir` (the
        data dir, which slots never see)."""
        for tool, package in (("ip", "iproute2"), ("unshare", "util-linux")):
            if shutil.which(tool) is None:
                raise OSError(f"the `{tool}` command ({package}) is not installed")
        if _no_new_privs():
            # the slot's nested user namespace maps pasta's root, which needs CAP_SETFCAP there
            # (Linux >= 5.12); under no_new_privs pasta's command never gets it back
            raise OSError("this process runs with no_new_privs (Apptainer sets it), under which pasta's "
                          "namespaces cannot hold a slot sandbox")
        # without the device pasta waits forever instead of failing
        if not os.access(TUN_DEVICE, os.R_OK | os.W_OK):
            raise OSError(f"{TUN_DEVICE} is missing or not open to this user (pasta needs it; in a container pass "
                          "--device /dev/net/tun, under apptainer --bind /dev/net/tun; on the host mode 0666)")
        lines = ["route flush table main", f"route add default dev {INTERFACE}"]
        lines += [f"route add prohibit {prefix}" for prefix in blocked_prefixes(node_prefixes())]
        routes = os.path.join(state_dir, "slot-routes")
        resolv = os.path.join(state_dir, "slot-resolv.conf")
        for path, text in ((routes, "\n".join(lines) + "\n"), (resolv, f"nameserver {DNS_ADDRESS}\n")):
            with open(path, "w", encoding="ascii") as fh:
                fh.write(text)
        return cls(pasta, routes, resolv)

    def wrap(self, argv: list[str]) -> list[str]:
        options = ["--config-net", "--foreground", "--quiet", "--log-file", "/dev/null", "--ipv4-only",
                   "--no-map-gw", "--tcp-ports", "none", "--udp-ports", "none", "--tcp-ns", "none",
                   "--udp-ns", "none", "--ns-ifname", INTERFACE, "--dns-forward", DNS_ADDRESS,
                   "--no-dhcp", "--no-ndp", "--no-dhcpv6", "--no-ra"]
        setup = 'mount -t proc proc /proc && ip -batch "$0" >/dev/null && exec "$@"'
        return [self.pasta, *options, "--", "unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
                setup, self.routes_file, *argv]
