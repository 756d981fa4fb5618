"""What a hostile slot tries, as shell it runs, and how a test reads the outcome.

Every probe prints a line `LEAK <what>` only when the attack worked, so a test asserts that no such
line came back; `shown_to_work` tests run the same probes where they must succeed (isolation none,
network allow), so a probe that could never print LEAK would be caught.

Network probes only ever target loopback addresses, the slot's server, and addresses inside network
namespaces the test made itself (see `egress_host`).
"""

from __future__ import annotations

import os
import secrets
import shlex
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

PTRACE_ATTACH = 16


def attack_script(pid: int) -> str:
    """Shell run in the attacking slot: each line prints ATTACK-<name>-OK only if the attack worked."""
    ptrace = (
        f"import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
        f"print('ATTACK-ptrace-OK' if libc.ptrace({PTRACE_ATTACH}, {pid}, 0, 0) == 0 else 'ptrace refused')"
    )
    lines = [
        f"kill -0 {pid} 2>/dev/null && echo ATTACK-signal0-OK",
        f"kill -STOP {pid} 2>/dev/null && echo ATTACK-stop-OK",
        f"head -c 64 /proc/{pid}/environ 2>/dev/null && echo ATTACK-environ-OK",
        f"dd if=/proc/{pid}/mem bs=1 count=1 skip=$((0x400000)) 2>/dev/null | wc -c | grep -q 1 && echo ATTACK-mem-OK",
        f"cat /proc/{pid}/cmdline 2>/dev/null | grep -q . && echo ATTACK-cmdline-OK",
        f"ls /proc/{pid}/root/ >/dev/null 2>&1 && echo ATTACK-root-OK",
        f'command -v python3 >/dev/null && python3 -c "{ptrace}"',
        f"command -v strace >/dev/null && timeout 5 strace -p {pid} -e trace=none 2>&1 | head -3 | "
        "grep -q 'attached' && echo ATTACK-strace-OK",
        f"command -v gdb >/dev/null && timeout 10 gdb -batch -p {pid} -ex 'info proc' 2>&1 | "
        "grep -q 'process {pid}' && echo ATTACK-gdb-OK",
    ]
    return "\n".join(lines) + "\ntrue"


def leaks(output: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in output.splitlines() if line.startswith("LEAK ")]


def file_probe(paths: list[str], needle: str) -> str:
    """Try to read each path (globs allowed); LEAK when `needle` shows up."""
    lines = [f'for f in {p}; do grep -qs -- {shlex.quote(needle)} "$f" && echo LEAK file:"$f"; done' for p in paths]
    return "\n".join(lines) + "\ntrue"


def token_probe(token: str) -> str:
    """Environment of every visible process, the usual token files: LEAK when the token shows up."""
    q = shlex.quote(token)
    return "\n".join(
        [
            f"env | grep -q -- {q} && echo LEAK env",
            f"for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < \"$f\" 2>/dev/null "
            f"| grep -q -- {q} && echo LEAK $f; done",
            f"for f in /data/token ../../token ../token /workspace/../../token; do "
            f'grep -qs -- {q} "$f" && echo LEAK $f; done',
            "true",
        ]
    )


def connect_probe(targets: list[tuple[str, int]]) -> str:
    """A TCP connect to each (host, port) with a 3 s limit; LEAK host:port when it connected."""
    lines = [
        f"timeout 3 bash -c 'exec 3<>/dev/tcp/{host}/{port}' 2>/dev/null && echo LEAK {host}:{port}"
        for host, port in targets
    ]
    return "\n".join(lines) + "\ntrue"


def host_uid(pid: int) -> int:
    """The real uid of a process as the node sees it."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


@contextmanager
def loopback_listener(host: str = "127.0.0.1") -> Iterator[int]:
    """A TCP listener on this machine's loopback that accepts and closes; yields its port."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(16)
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                conn.close()
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        sock.close()


@dataclass(frozen=True)
class EgressHost:
    """A TCP server in a network namespace this test made, reached only through its own veth."""

    address: str
    port: int
    interface: str
    neighbour: str  # its address on the veth's /30, one of this node's subnets: it answers there too


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@dataclass(frozen=True)
class VethNamespace:
    """A network namespace this test made, behind a veth pair: `outer` (this machine's end, at
    `outer_ip`) and its peer inside the namespace, at `inner_ip`, on a /30 of 198.51.100.x."""

    ns: str
    outer: str
    outer_ip: str
    inner_ip: str

    def assert_routed_here(self, address: str) -> None:
        """Before a byte is sent: `address` is routed into this namespace and nowhere else."""
        route = subprocess.run(["ip", "route", "get", address], capture_output=True, text=True, check=True).stdout
        assert f"dev {self.outer} " in route, route


@contextmanager
def veth_namespace(tag: str, first_net: int) -> Iterator[VethNamespace]:
    """A namespace with its loopback and its veth end up, linked on a /30 inside
    198.51.100.`first_net`.. (TEST-NET-2, never routed on the internet); removed afterwards."""
    suffix = secrets.token_hex(3)
    ns, outer, inner = f"atr-{tag}-{suffix}", f"atr{tag}{suffix}o", f"atr{tag}{suffix}i"
    link_net = first_net + secrets.randbelow(16) * 4
    made = VethNamespace(ns, outer, f"198.51.100.{link_net + 1}", f"198.51.100.{link_net + 2}")
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("addr", "add", f"{made.outer_ip}/30", "dev", outer)
        _ip("link", "set", outer, "up")
        _ip("-n", ns, "addr", "add", f"{made.inner_ip}/30", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield made
    finally:
        subprocess.run(["ip", "link", "del", outer], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@contextmanager
def egress_host() -> Iterator[EgressHost]:
    """A host outside this machine's subnets, the way a public server is: 198.51.100.x (TEST-NET-2,
    never routed on the internet) on the loopback of a namespace behind a veth pair, with a route
    on this machine through that veth only. Root only (the caller skips otherwise)."""
    address = f"198.51.100.{1 + secrets.randbelow(60)}"
    with veth_namespace("eg", 64) as net:
        server: subprocess.Popen[bytes] | None = None
        try:
            _ip("-n", net.ns, "addr", "add", f"{address}/32", "dev", "lo")
            _ip("-n", net.ns, "route", "add", "default", "via", net.outer_ip)
            _ip("route", "add", f"{address}/32", "via", net.inner_ip, "dev", net.outer)
            net.assert_routed_here(address)
            port = 20000 + secrets.randbelow(10000)
            code = (
                "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                f"s.bind(('0.0.0.0', {port})); s.listen(16)\n"
                "while True:\n    c, _ = s.accept(); c.sendall(b'egress-ok'); c.close()"
            )
            server = subprocess.Popen(["ip", "netns", "exec", net.ns, "python3", "-c", code])
            yield EgressHost(address, port, net.outer, net.inner_ip)
        finally:
            if server is not None:
                server.kill()
                server.wait()
            subprocess.run(["ip", "route", "del", f"{address}/32"], capture_output=True, check=False)


def egress_probe(host: EgressHost) -> str:
    """Prints EGRESS-OK when the slot reached the test host and read its greeting."""
    return (
        f"timeout 5 bash -c 'exec 3<>/dev/tcp/{host.address}/{host.port}; head -c 9 <&3' 2>/dev/null | "
        "grep -q egress-ok && echo EGRESS-OK; true"
    )


def can_make_netns() -> bool:
    return (
        os.geteuid() == 0 and subprocess.run(["ip", "netns", "list"], capture_output=True, check=False).returncode == 0
    )


@contextmanager
def node_uids(mark: str) -> Iterator[set[int]]:
    """The real uids (on the node) of the processes whose argv[0] is `mark`, while the block runs."""
    uids: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.1):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                with suppress(OSError):
                    if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == mark.encode():
                        status = Path(f"/proc/{pid}/status").read_text()
                        uids.add(int(next(x for x in status.splitlines() if x.startswith("Uid:")).split()[1]))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield uids
    finally:
        stop.set()
        thread.join()
