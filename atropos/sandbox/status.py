"""`atropos-sandbox status URL`: what a sandbox server enforces and what each of its slots runs now.

The token comes from `--token-file` or `$ATROPOS_SANDBOX_TOKEN` (`/status` needs it, like every
route but `/health`). `--watch` redraws the table every few seconds until Ctrl-C. Leases are the
pool's business, not the server's: a pool says what it leases with `SlotPool.stats()`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time

from atropos.errors import SlotPoolError
from atropos.sandbox.client import ServerClient, ServerRefused
from atropos.sandbox.models import StatusResponse
from atropos.sandbox.settings import TOKEN_ENV

__all__ = ["register", "render"]

_TIMEOUT = 5.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="a sandbox server's slots: what each runs now, and what the server enforces",
        description="Show a sandbox server's isolation, network mode, limits and cgroups, and what each of "
        f"its slots runs now. The token comes from --token-file or ${TOKEN_ENV}.",
    )
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8080")
    p.add_argument("--token-file", help=f"file holding the bearer token (default: ${TOKEN_ENV})")
    p.add_argument(
        "--watch", nargs="?", type=float, const=2.0, metavar="SECONDS", help="redraw every SECONDS (default 2)"
    )
    p.set_defaults(handler=status_from_args)


def render(url: str, status: StatusResponse) -> str:
    limits = ", ".join(f"{k} {'off' if v is None else v}" for k, v in status.limits.items())
    lines = [
        f"server {url}  version {status.version}  {status.slots} slot(s), {status.busy} busy",
        f"isolation {status.isolation}"
        + (f" ({status.isolation_reason})" if status.isolation_reason else "")
        + f"  network {status.network}"
        + (f" ({status.network_reason})" if status.network_reason else "")
        + f"  slots run as uid {status.uid}",
        f"limits: {limits}; cgroups: {', '.join(status.cgroups) or 'none'}",
        f"slot root: {_ROOTS.get(status.root, status.root)}; binds: {', '.join(status.binds) or 'none'}",
        f"task images unpacked: {', '.join(status.images) or 'none'}",
        _sleep_line(status),
        "",
        f"{'slot':>4}  {'state':<8} {'tool':<13} {'running':>9} {'queued':>6} {'calls':>7}  image / bridges",
    ]
    for a in status.slot_activity:
        running = f"{a.running_s:.1f}s" if a.running_s is not None else "-"
        state = "asleep" if a.asleep else "starting" if a.starting else a.state
        lines.append(
            f"{a.slot:>4}  {state:<8} {a.tool or '-':<13} {running:>9} {a.queued:>6} {a.calls:>7}  {a.image or '-'}"
            + "".join(f"  :{port}->{target}" for port, target in a.bridges.items())
        )
    return "\n".join(lines)


_ROOTS = {
    "system": "system (the node's /usr, /bin, /sbin, /lib*, /sys and a curated /etc)",
    "image": "image (the container's root minus what its runtime mounted)",
    "host": "host (the node's whole root, read-only)",
    "none": "none (no sandbox: the server's whole file system)",
}


def _sleep_line(status: StatusResponse) -> str:
    h = status.hibernation
    if h is None or not h.after_s:
        return "hibernation off"
    return f"hibernation after {h.after_s:g}s idle: {h.asleep} slot(s) asleep"


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as fh:
            return fh.read().strip()
    return os.environ.get(TOKEN_ENV) or None


def status_from_args(args: argparse.Namespace) -> int:
    try:
        token = _token(args)
    except OSError as exc:
        print(f"atropos-sandbox status: error: cannot read --token-file {args.token_file}: {exc.strerror}",
              file=sys.stderr)  # fmt: skip
        return 2
    if token is None:
        print(f"atropos-sandbox status: error: no token: pass --token-file or set {TOKEN_ENV}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_show(args.url, token, args.watch))
    return 0


async def _show(url: str, token: str, watch: float | None) -> int:
    client = ServerClient("status", url, token, max_connections=1)
    try:
        while True:
            try:
                status = await client.status(_TIMEOUT)
            except (ServerRefused, SlotPoolError, OSError, asyncio.TimeoutError) as exc:
                print(f"atropos-sandbox status: error: {url}: {exc or type(exc).__name__}", file=sys.stderr)
                return 1
            if watch is not None:
                print("\033[2J\033[H" + time.strftime("%H:%M:%S"), end="  ")
            print(render(url, status), flush=True)
            if watch is None:
                return 0
            await asyncio.sleep(watch)
    finally:
        await client.aclose()
