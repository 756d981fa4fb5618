"""The hub: one network namespace per server that all its slots' traffic leaves through (network `public`).

    holder:  unshare --user --map-root-user --net -- /bin/sh -c SETUP RULESET    (the hub's namespaces)
    pasta [options] --netns /proc/HOLDER/ns/net --userns /proc/HOLDER/ns/user     (its one way out)

- SETUP, as root of the new user namespace (every capability in it, none outside): IP forwarding on,
  IPv6 off, the nftables RULESET loaded, a line on stdout, then it waits on its stdin (a pipe only
  the server holds), so it ends with the server. Its namespaces are the hub's.
- pasta joins them from outside (see atropos.sandbox.server.egress for its options) and puts its tap
  device, the node's address and the default route into the hub. One pasta for the whole server,
  restarted by `watch` if it ever dies.
- Each slot's network namespace is a child of the hub's user namespace and is linked to the hub by a
  veth pair (atropos.sandbox.server.egress.Egress.wrap); the hub routes it out through pasta,
  masqueraded to the hub's address, and its ruleset refuses the rest (see `ruleset`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable

from atropos.host.lifetime import die_with_parent

log = logging.getLogger("atropos.sandbox.server")

HUB_READY = "ATROPOS-HUB-READY"
TAP = "tap0"  # pasta's device in the hub
SLOT_LINK = "s"  # the hub's end of slot N's veth pair is `sN`
_WAIT_S = 10.0
MAX_FLOWS = 1024  # connections one slot holds through the hub at once

_SETUP = (
    "set -e; echo 1 > /proc/sys/net/ipv4/ip_forward; "
    "if [ -w /proc/sys/net/ipv6/conf/default/disable_ipv6 ]; then "
    "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; fi; "
    f'nft -f "$0"; echo {HUB_READY}; exec cat >/dev/null'
)


def ruleset(blocked: list[str], flows: int) -> str:
    """nftables for the hub: a slot's packets go out through pasta, masqueraded, to any address
    outside `blocked`; to a blocked one, to another slot or to the hub itself they are refused at
    once (an ICMP error, never a silent wait); only replies come back in. A slot holds at most
    `flows` connections at once (counted by conntrack): one pasta serves every slot, and a slot
    that opens connections without end must not use up pasta's file descriptors for the others."""
    slots = f'iifname "{SLOT_LINK}*"'
    return f"""table inet atropos {{
    set blocked {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {", ".join(blocked)} }} }}
    set flows {{ type ipv4_addr; flags dynamic; size 65535; }}
    chain input {{
        type filter hook input priority 0; policy accept;
        {slots} reject with icmpx type admin-prohibited
    }}
    chain forward {{
        type filter hook forward priority 0; policy drop;
        iifname "{TAP}" oifname "{SLOT_LINK}*" ct state established,related accept
        {slots} oifname "{TAP}" ip daddr @blocked reject with icmpx type admin-prohibited
        {slots} oifname "{TAP}" ct state new add @flows {{ ip saddr ct count over {flows} }} goto refuse
        {slots} oifname "{TAP}" meta nfproto ipv4 accept
        {slots} reject with icmpx type admin-prohibited
    }}
    chain refuse {{
        meta l4proto tcp reject with tcp reset
        reject with icmpx type admin-prohibited
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{TAP}" masquerade
    }}
}}
"""


def flows_per_slot(slots: int) -> int:
    """Connections a slot may hold at once: 1024, or less where pasta's file descriptors (the
    server's hard RLIMIT_NOFILE, which pasta raises its own to) would not hold every slot's."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    budget = hard if hard != resource.RLIM_INFINITY else 1 << 20
    return max(32, min(MAX_FLOWS, (budget - 256) // max(slots, 1)))


def default_route_devices(table: str = "/proc/net/route") -> list[str] | None:
    """The devices of the default IPv4 routes (destination and mask 0) in a routing table as
    /proc shows it (a process's `/proc/PID/net/route`: its network namespace's); None when it
    cannot be read."""
    try:
        with open(table, encoding="ascii") as fh:
            rows = [line.split() for line in fh.read().splitlines()[1:]]
    except OSError:
        return None
    return [row[0] for row in rows if len(row) > 7 and row[1] == "00000000" and row[7] == "00000000"]


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _exited(proc: subprocess.Popen[bytes]) -> None:
    """Returns once `proc` has exited (and is reaped)."""
    try:
        fd = os.pidfd_open(proc.pid)  # readable once the process has exited
    except OSError:  # a kernel before 5.3: a thread waits instead
        await asyncio.to_thread(proc.wait)
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    try:
        loop.add_reader(fd, _settle, exited)
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    proc.wait()


def _dies_with_server() -> None:
    die_with_parent(signal.SIGKILL)


class Hub:
    """The hub's holder and its pasta (see the module docstring)."""

    def __init__(self, holder: subprocess.Popen[bytes], pasta_argv: Callable[[int], list[str]], pasta_log: str) -> None:
        self._holder = holder
        self._pasta_argv = pasta_argv
        self._pasta_log = pasta_log
        self._pasta: subprocess.Popen[bytes] | None = None
        self._closed = False

    @property
    def pid(self) -> int:
        return self._holder.pid

    @property
    def netns(self) -> str:
        return f"/proc/{self._holder.pid}/ns/net"

    @property
    def userns(self) -> str:
        return f"/proc/{self._holder.pid}/ns/user"

    @classmethod
    def start(cls, ruleset_file: str, pasta_argv: Callable[[int], list[str]], pasta_log: str) -> Hub:
        """The hub's namespaces with `ruleset_file` loaded, and its pasta routing (OSError when
        either fails: nftables missing or refused, pasta not setting up its network; pasta's own
        messages go to `pasta_log`)."""
        holder = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--net", "--", "/bin/sh", "-c", _SETUP, ruleset_file],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_dies_with_server,
        )
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != HUB_READY.encode():
            holder.kill()
            _, err = holder.communicate(timeout=_WAIT_S)
            said = err.decode(errors="replace").strip()
            raise OSError(
                f"the hub's network namespace did not start: {said} (its ruleset needs the kernel's nf_tables, "
                "conntrack and NAT, which a user namespace cannot load: modules nf_tables, nft_ct, nft_masq, "
                "nft_reject_inet, nft_connlimit loaded on the node, as Docker or firewalld do)"
            )
        hub = cls(holder, pasta_argv, pasta_log)
        pasta, deadline = hub._spawn_pasta(), time.monotonic() + _WAIT_S
        while (why := hub._pasta_failure(pasta, deadline)) is not None:
            if why:
                hub.close()
                raise OSError(why)
            time.sleep(0.01)  # polling pasta's progress: it says nothing when it is done
        return hub

    def _spawn_pasta(self) -> subprocess.Popen[bytes]:
        with open(self._pasta_log, "ab") as log_file:  # pasta's own words, for a failure's message
            self._pasta = subprocess.Popen(
                self._pasta_argv(self._holder.pid),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                start_new_session=True,
                preexec_fn=_dies_with_server,  # it outlives the hub's holder otherwise (called on the loop's thread)
            )
        return self._pasta

    def _pasta_failure(self, pasta: subprocess.Popen[bytes], deadline: float) -> str | None:
        """Why pasta has not set up the hub's network and never will; "" while it may yet."""
        if self._routed():
            return None
        if pasta.poll() is not None:
            with open(self._pasta_log, encoding="utf-8", errors="replace") as fh:
                said = fh.read().strip().splitlines()[-3:]
            return f"pasta exited ({pasta.returncode}): {' '.join(said)}"
        if time.monotonic() > deadline:
            return f"pasta did not set up the hub's network within {_WAIT_S:.0f}s"
        return ""

    def _routed(self) -> bool:
        """Whether pasta's default route is in the hub (its routing table, read through the holder)."""
        return TAP in (default_route_devices(f"/proc/{self._holder.pid}/net/route") or ())

    async def watch(self) -> None:
        """Runs with the server: a pasta that dies (a crash, a kill) is started again at once, and
        the slots' connections that were open are lost, not the slots' network."""
        while not self._closed and self._pasta is not None:
            pasta = self._pasta
            await _exited(pasta)
            if self._closed:
                return
            log.error("the hub's pasta exited (%s); starting it again", pasta.returncode)
            pasta, deadline = self._spawn_pasta(), time.monotonic() + _WAIT_S
            while (why := self._pasta_failure(pasta, deadline)) is not None:
                if why:
                    log.error("the hub's pasta did not start again: %s; slots have no network now", why)
                    return
                await asyncio.sleep(0.01)

    def close(self) -> None:
        self._closed = True
        for proc in (self._pasta, self._holder):
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        for proc in (self._pasta, self._holder):
            for stream in (proc.stdin, proc.stdout, proc.stderr) if proc is not None else ():
                if stream is not None:
                    stream.close()
