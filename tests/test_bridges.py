"""Bridges (`sb.bridge`): a slot in its own network namespace reaches one loopback service of the
node, the one the pool's user named, at a port of its own loopback, and nothing else of the node;
the bridge ends with the lease. On a real local pool (bubblewrap, the default network), a real
TCP service on this machine's loopback."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from atropos.errors import SlotFailed
from atropos.sandbox.server.bridges import MAX_CONNECTIONS
from atropos.sandbox.status import render
from atropos.slots import SlotPool, SlotPoolConfig, SyncSlotPool
from tests.attacks import connect_probe, leaks, loopback_listener
from tests.server_process import pids_with_arg, runner_above, wait_for_pids


@contextmanager
def echo_service(needle: str) -> Iterator[int]:
    """A TCP service on 127.0.0.1: reads until the client half-closes, answers `needle` and what it
    read, reversed, then closes. Yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(needle.encode() + b" " + data[::-1])

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.settimeout(30)
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def _ask(port: int, text: str, *, from_file: bool = False) -> str:
    """Shell for the slot: send `text` (with `from_file`, the file of that name) to 127.0.0.1:port,
    half-close, print the answer."""
    return (
        f"exec 3<>/dev/tcp/127.0.0.1/{port} || exit 9\n"
        + (f"cat {text} >&3\n" if from_file else f"printf %s {text} >&3\n")
        +
        # bash cannot half-close a /dev/tcp socket; python can, where the slot has it
        "python3 -c 'import os,socket; s=socket.socket(fileno=3); s.shutdown(socket.SHUT_WR); "
        'os.write(1, b"".join(iter(lambda: s.recv(65536), b"")))\''
    )


def _cfg() -> SlotPoolConfig:
    return SlotPoolConfig(slots_per_container=2, min_containers=1, max_containers=1)


async def test_a_bridge_reaches_the_named_service_and_nothing_else_of_the_node() -> None:
    needle = secrets.token_hex(8)
    with echo_service(needle) as service, loopback_listener() as other:
        async with SlotPool(_cfg()) as pool:
            health = next(iter((await pool.servers_health()).values()))
            assert not isinstance(health, BaseException)
            assert health["network"] in ("public", "deny"), health
            async with pool.sandbox(trajectory_id="a") as sb, pool.sandbox(trajectory_id="b") as other_sb:
                # before the bridge: the service is out of reach, as every loopback service is
                assert leaks((await sb.run(connect_probe([("127.0.0.1", service)]))).output) == []
                opened = await sb.bridge(service)
                assert not opened.direct and opened.host == "127.0.0.1"
                status = await pool.server_status(sb.slot)
                listed = {a.slot: a.bridges for a in status.slot_activity}
                assert listed[sb.slot.index] == {opened.port: f"127.0.0.1:{service}"}, listed
                assert listed[other_sb.slot.index] == {}, listed
                assert f":{opened.port}->127.0.0.1:{service}" in render("url", status)  # `atropos-sandbox status`
                answer = await sb.run(_ask(opened.port, "hello-bridge"))
                assert answer.stdout == f"{needle} egdirb-olleh", answer
                # a large payload both ways, intact
                await sb.write("payload", "x" * 200_000 + "END")
                big = await sb.run(_ask(opened.port, "payload", from_file=True))
                assert big.stdout == f"{needle} DNE" + "x" * 200_000, big.stdout[:80]
                # the same port opens nothing else: the node's other loopback services stay shut
                probe = connect_probe([("127.0.0.1", other), ("127.0.0.1", service)])
                assert leaks((await sb.run(probe)).output) == []
                # the other sandbox has no bridge: its own port of that number is closed
                assert leaks((await other_sb.run(connect_probe([("127.0.0.1", opened.port)]))).output) == []
                # a port asked for by number, and that port twice
                fixed = await sb.bridge(service, port=18080)
                assert fixed.port == 18080
                assert (await sb.run(_ask(18080, "ab"))).stdout == f"{needle} ba"
                with pytest.raises(SlotFailed, match="already bridged"):
                    await sb.bridge(service, port=18080)
                first_port = opened.port
            # released: the next lease of the slot has no bridge
            async with pool.sandbox(trajectory_id="c") as again, pool.sandbox(trajectory_id="d") as again2:
                for later in (again, again2):
                    probe = connect_probe([("127.0.0.1", first_port), ("127.0.0.1", 18080)])
                    assert leaks((await later.run(probe)).output) == []


async def test_a_bridge_to_a_closed_port_refuses_the_connection_and_the_slot_goes_on() -> None:
    with loopback_listener() as closing:
        pass  # the port is free again: nothing listens there
    async with SlotPool(_cfg()) as pool, pool.sandbox() as sb:
        opened = await sb.bridge(closing)
        out = await sb.run(f"timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{opened.port}; cat <&3'; echo rc=$?")
        assert "rc=0" in out.stdout  # accepted, then closed at once: the service is not there
        assert (await sb.run("echo still")).stdout == "still\n"


async def test_a_slot_that_shares_the_nodes_network_needs_no_bridge() -> None:
    needle = secrets.token_hex(8)
    with echo_service(needle) as service:
        async with SlotPool(_cfg().model_copy(update={"network": "allow"})) as pool, pool.sandbox() as sb:
            opened = await sb.bridge(service)
            assert opened.direct and (opened.host, opened.port) == ("127.0.0.1", service)
            assert (await sb.run(_ask(service, "abc"))).stdout == f"{needle} cba"


def test_the_synchronous_twin_opens_bridges_too() -> None:
    needle = secrets.token_hex(8)
    with echo_service(needle) as service, SyncSlotPool(_cfg()) as pool, pool.sandbox() as sb:
        opened = sb.bridge(service)
        assert sb.run(_ask(opened.port, "xy")).stdout == f"{needle} yx"


async def test_a_hibernated_slot_keeps_its_bridge_and_wakes_for_a_new_one() -> None:
    needle = secrets.token_hex(8)
    with echo_service(needle) as service:
        async with SlotPool(_cfg().model_copy(update={"hibernate_after": 0.2})) as pool, pool.sandbox() as sb:
            opened = await sb.bridge(service)
            assert (await sb.session("echo up")).ok
            for _ in range(100):  # until the server reports the slot asleep
                status = next(iter((await pool.servers_health()).values()))
                assert not isinstance(status, BaseException)
                if (status.get("hibernation") or {}).get("asleep", 0) >= 1:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"the slot never hibernated: {status}")
            ports = [opened.port]
            for _ in range(12):  # each bridge asked for of a sleeping slot, or one about to sleep again
                await asyncio.sleep(0.3)
                ports.append((await sb.bridge(service)).port)
            for port in ports:
                assert (await sb.run(_ask(port, "zz1"))).stdout == f"{needle} 1zz"


async def test_a_slot_cannot_make_the_server_hold_more_than_its_share_of_connections() -> None:
    """A hostile agent opening connection after connection through its bridge: past the cap the
    server closes the new ones, and the first ones still work."""
    needle = secrets.token_hex(8)
    flood = (
        "import socket, time\n"
        "conns = [socket.create_connection(('127.0.0.1', PORT)) for _ in range(300)]\n"
        "time.sleep(1)\n"  # the server has taken them all by now
        "answered = 0\n"
        "for c in conns:\n"
        "    c.shutdown(socket.SHUT_WR)\n"
        "    c.settimeout(10)\n"
        "    try:\n"
        "        answered += c.recv(100).startswith(b'NEEDLE')\n"
        "    except OSError:\n"
        "        pass\n"
        "print(answered)\n"
    )
    with echo_service(needle) as service:
        async with SlotPool(_cfg()) as pool, pool.sandbox() as sb:
            opened = await sb.bridge(service)
            await sb.write("flood.py", flood.replace("PORT", str(opened.port)).replace("NEEDLE", needle))
            out = await sb.run("python3 flood.py", timeout=60)
            assert out.stdout.strip() == str(MAX_CONNECTIONS), out
            assert (await sb.run(_ask(opened.port, "ok"))).stdout == f"{needle} ko"


async def test_a_sandbox_that_restarts_says_its_bridges_closed_and_opens_them_again() -> None:
    needle = secrets.token_hex(8)
    with echo_service(needle) as service:
        async with SlotPool(_cfg()) as pool, pool.sandbox() as sb:
            opened = await sb.bridge(service, port=18081)
            # the runner killed (from outside: the slot's processes cannot) while a call runs: the sandbox ends
            marker = f"sleep 7.{secrets.randbelow(10**6):06d}"
            call = asyncio.ensure_future(sb.run(marker))
            assert await asyncio.to_thread(wait_for_pids, marker, 1) == 1
            os.kill(runner_above(pids_with_arg(marker)[0]), signal.SIGKILL)
            with pytest.raises(SlotFailed):
                await call
            after = await sb.run("echo back")
            assert after.stdout == "back\n"
            assert "bridges (127.0.0.1:18081) are closed" in after.output, after
            assert leaks((await sb.run(connect_probe([("127.0.0.1", opened.port)]))).output) == []
            again = await sb.bridge(service, port=18081)  # the same port: free again
            assert (await sb.run(_ask(again.port, "re"))).stdout == f"{needle} er"


async def test_a_slot_that_races_its_runner_to_the_channel_changes_nothing() -> None:
    """A hostile agent watches its /tmp for the server's channel and sends a pipe over it before
    the runner sends the listening socket: the server takes only what the runner sent (its peer's
    pid), so every bridge opens and works; the agent's connections are closed unread."""
    needle = secrets.token_hex(8)
    racer = (
        "import os, socket\n"
        "r, w = os.pipe()\n"
        "while True:\n"
        "    for name in os.listdir('/tmp'):\n"
        "        if name.startswith('.atropos-bridge-'):\n"
        "            try:\n"
        "                s = socket.socket(socket.AF_UNIX); s.connect('/tmp/' + name)\n"
        "                socket.send_fds(s, [b'x'], [r]); print('raced', flush=True)\n"
        "            except OSError:\n"
        "                pass\n"
    )
    with echo_service(needle) as service:
        async with SlotPool(_cfg()) as pool, pool.sandbox() as sb:
            await sb.write("racer.py", racer)
            assert (await sb.session("python3 racer.py > raced.log 2>&1 &")).ok
            opened = [(await sb.bridge(service)).port for _ in range(12)]
            for port in opened:
                assert (await sb.run(_ask(port, "ok"))).stdout == f"{needle} ko"
            assert "raced" in await sb.read("raced.log")  # the agent did connect, and sent its pipe
