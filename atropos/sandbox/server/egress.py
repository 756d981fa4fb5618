"""Network mode `public`: each slot gets its own network namespace that reaches public addresses only.

`allow` shares the node's network namespace with the slots: the node's loopback services (a Nomad,
Consul or Vault agent, other servers' ports), link-local metadata addresses and the cluster's
private ranges are all one connect() away. `public` puts each slot's sandbox in a fresh user and
network namespace, connected by `pasta` (Debian's `passt`), a user-space NAT that needs no
privileges:

    unshare --user --map-root-user --net -- /bin/sh -c SETUP ROUTES bwrap ... runner
    pasta [options] --netns /proc/PID/ns/net --userns /proc/PID/ns/user      (started by the server)

- SETUP, as root of the new user namespace (every capability in it, none outside): say
  NETNS_READY on stdout, wait until pasta has put its tap device and default route in, apply
  ROUTES, then `exec unshare --user --map-user=UID --map-group=GID` into a nested user namespace
  where the server's own uid is itself again, and from there bubblewrap (unprivileged, as without
  pasta). The slot's processes run without capabilities and cannot change any of it.
- ROUTES: the main table flushed, a default route on the tap device (pasta answers ARP for any
  address), and a `prohibit` route for every loopback, private, link-local, shared, multicast and
  reserved range and for every subnet and address of the node's own interfaces. A connect() there
  fails at once with EACCES inside the slot and never reaches pasta. The slot's own 127.0.0.1 is its
  own namespace's loopback, with nothing of the node's on it.
- pasta options: no port forwarding in either direction (`-t/-u/-T/-U none`: without this the
  slot's 127.0.0.1:PORT would reach the node's PORT), the gateway not mapped to the node's loopback
  (`--no-map-gw`), IPv4 only (`-4`), DNS answered only at one address (`--dns-forward`) and relayed
  to the node's resolver; the slot's /etc/resolv.conf names that address.
- pasta joins the namespaces from outside (it enters them with setns, keeping its capabilities there)
  rather than starting the command itself: a command pasta starts gets its capabilities back
  through exec, which no_new_privs forbids, and Apptainer always sets no_new_privs.

Where pasta (or `ip`, `unshare`, a usable /dev/net/tun) is missing, `auto` falls back to `deny` and
says why.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass

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
INTERFACE = "tap0"
NETNS_READY = "ATROPOS-NETNS-READY"  # the wrapped command's first line: its namespaces exist
_PASTA_WAIT_S = 10.0
_NS_GET_USERNS = 0xB701  # ioctl on a namespace fd: the user namespace that owns it (linux/nsfs.h)


def _until_routed() -> str:
    """Shell: wait until pasta has put its default route into this network namespace."""
    waits = int(_PASTA_WAIT_S / 0.01)
    return (
        f"i=0; until ip -4 route show default | grep -q .; do i=$((i+1)); "
        f"[ $i -gt {waits} ] && {{ echo 'pasta did not set up the network' >&2; exit 1; }}; sleep 0.01; done"
    )


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
    """Whether this network namespace has a default IPv4 route (destination and mask 0)."""
    try:
        with open(table, encoding="ascii") as fh:
            rows = [line.split() for line in fh.read().splitlines()[1:]]
    except OSError:
        return True  # cannot tell: let pasta try
    return any(len(row) > 7 and row[1] == "00000000" and row[7] == "00000000" for row in rows)


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
        for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("nsenter", "util-linux")):
            if shutil.which(tool) is None:
                raise OSError(f"the `{tool}` command ({package}) is not installed")
        # without the device pasta waits forever instead of failing
        if not os.access(TUN_DEVICE, os.R_OK | os.W_OK):
            raise OSError(
                f"{TUN_DEVICE} is missing or not open to this user (pasta needs it; in a container pass "
                "--device /dev/net/tun, under apptainer --bind /dev/net/tun; on the host mode 0666)"
            )
        if not has_default_route():
            # pasta takes the slot's traffic out through the node's default route; with none it
            # never sets up the slot's network (an air-gapped node): say so now, not after a wait
            raise OSError("this node has no default IPv4 route: a slot's traffic could go nowhere public")
        lines = ["route flush table main", f"route add default dev {INTERFACE}"]
        lines += [f"route add prohibit {prefix}" for prefix in blocked_prefixes(node_prefixes())]
        routes = os.path.join(state_dir, "slot-routes")
        resolv = os.path.join(state_dir, "slot-resolv.conf")
        for path, text in ((routes, "\n".join(lines) + "\n"), (resolv, f"nameserver {DNS_ADDRESS}\n")):
            with open(path, "w", encoding="ascii") as fh:
                fh.write(text)
        return cls(pasta, routes, resolv)

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` (bubblewrap's) started in a new user and network namespace (see the module docstring)."""
        setup = (
            f'echo {NETNS_READY}; {_until_routed()}; ip -batch "$0" >/dev/null && '
            f'exec unshare --user --map-user={os.getuid()} --map-group={os.getgid()} -- "$@"'
        )
        return ["unshare", "--user", "--map-root-user", "--net", "--", "/bin/sh", "-c", setup, self.routes_file, *argv]

    def pasta_argv(self, pid: int, userns: str | None = None) -> list[str]:
        """pasta for the namespaces of `pid` (the wrapped command, once it said NETNS_READY), or
        for its network namespace and `userns` (the one that owns it; see `owner_fd`)."""
        return [
            self.pasta,
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
            INTERFACE,
            "--dns-forward",
            DNS_ADDRESS,
            "--no-dhcp",
            "--no-ndp",
            "--no-dhcpv6",
            "--no-ra",
            "--netns",
            f"/proc/{pid}/ns/net",
            "--userns",
            userns or f"/proc/{pid}/ns/user",
        ]

    @staticmethod
    def owner_fd(pid: int) -> int:
        """An fd of the user namespace that owns `pid`'s network namespace. Once the wrapped
        command has gone on into its nested user namespace no process is in that one any more,
        but pasta and the route batch need its capabilities over the network namespace."""
        netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return fcntl.ioctl(netns, _NS_GET_USERNS)
        finally:
            os.close(netns)

    def reroute_argv(self, pid: int, userns: str) -> list[str]:
        """Once a new pasta joined `pid`'s network namespace (a slot waking from hibernation): wait
        for its default route, then the route batch again, as at the slot's start (pasta's own
        routes flushed, every blocked range prohibited)."""
        script = f'{_until_routed()}; exec ip -batch "$0" >/dev/null'
        return [
            "nsenter",
            "--preserve-credentials",  # the namespace refuses setgroups; our uid is its root anyway
            f"--user={userns}",
            f"--net=/proc/{pid}/ns/net",
            "--",
            "/bin/sh",
            "-c",
            script,
            self.routes_file,
        ]

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
        """Run a wrapped command to its end with its pasta (the start-up probe)."""
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != NETNS_READY.encode():
                out, err = proc.communicate(timeout=timeout)
                return subprocess.CompletedProcess(argv, proc.wait(), out, err)
            with subprocess.Popen(
                self.pasta_argv(proc.pid),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ) as pasta:
                try:
                    out, err = proc.communicate(timeout=timeout)
                finally:
                    pasta.kill()
            return subprocess.CompletedProcess(argv, proc.returncode, out, err)
