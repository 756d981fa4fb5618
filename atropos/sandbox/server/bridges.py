"""Bridges: a port on a slot's own loopback that reaches one service the pool's user names.

A slot in its own network namespace (network `deny` or `public`) reaches nothing of its node, its
loopback included. Some agent frameworks run their agent program inside the sandbox and have it
call back to a server of the trainer (verifiers' model interception, its tool servers). A bridge
opens exactly that: `127.0.0.1:PORT` inside the slot relays to `HOST:PORT` as this server's node
reaches it, and to nothing else. The slot cannot open or move one (only a caller holding the
server's token can), and every bridge of a slot closes when the slot is reset or stops.

How one opens: the server binds a Unix socket in the slot's /tmp (through /proc/RUNNER/root); the
slot's runner listens on the port inside the slot and passes that socket over the Unix one
(atropos.sandbox.runner.bridge). The server checks what it received is a listening socket on the
slot's loopback at that port, then serves it: each connection is relayed here, byte for byte, so
the runner never carries the traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger("atropos.sandbox")

MAX_BRIDGES = 16  # per slot
MAX_CONNECTIONS = 256  # per bridge at once: a slot cannot make the server hold unbounded connections
_HANDOVER_SECONDS = 10.0
_BACKLOG = 64
_CHUNK = 64 * 1024


class BridgeError(RuntimeError):
    """The bridge was not opened: the message says why."""


@dataclass
class _Bridge:
    port: int
    target: tuple[str, int]
    server: asyncio.Server
    streams: set[asyncio.StreamWriter] = field(default_factory=set)
    connections: int = 0  # counted from the accept, before the service answers


class Bridges:
    """The open bridges of one slot."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self._open: dict[int, _Bridge] = {}

    @property
    def ports(self) -> dict[int, tuple[str, int]]:
        return {port: bridge.target for port, bridge in self._open.items()}

    async def open(
        self, port: int, target: tuple[str, int], runner: int, listen: Callable[[str], Awaitable[int]]
    ) -> int:
        """A bridge from the slot's 127.0.0.1:`port` (0: a free one) to `target`; the slot's port.
        `runner`: the host pid of the slot's runner (the channel is in its /tmp, and only what it
        sends counts); `listen(channel)` asks it to listen and pass its socket to the Unix socket
        `channel` (a path in the slot)."""
        if port in self._open:
            raise BridgeError(f"slot {self.slot}: port {port} is already bridged to {_show(self._open[port].target)}")
        if len(self._open) >= MAX_BRIDGES:
            raise BridgeError(f"slot {self.slot}: it has {MAX_BRIDGES} bridges open, the most a slot may have")
        listener = await self._take_listener(runner, listen)
        bridge = _Bridge(listener.getsockname()[1], target, await asyncio.start_server(self._serve, sock=listener))
        self._open[bridge.port] = bridge
        log.info("slot %d: bridge from its 127.0.0.1:%d to %s", self.slot, bridge.port, _show(target))
        return bridge.port

    async def _take_listener(self, runner: int, listen: Callable[[str], Awaitable[int]]) -> socket.socket:
        name = f".atropos-bridge-{secrets.token_hex(8)}"
        host_path = f"/proc/{runner}/root/tmp/{name}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as channel:
            try:
                channel.bind(host_path)
            except OSError as exc:
                raise BridgeError(f"slot {self.slot}: cannot reach the slot's /tmp: {exc}") from None
            try:
                channel.listen(_BACKLOG)
                channel.setblocking(False)
                # accepted (and what others of the slot sent, dropped) while the runner is asked: a
                # process of the slot that fills the backlog first would keep the runner out
                taken = asyncio.ensure_future(self._from(runner, channel))
                try:
                    bound = await listen(f"/tmp/{name}")
                    fds = await taken
                finally:
                    taken.cancel()
                    if taken.done() and not taken.cancelled():
                        taken.exception()  # retrieved: the call's own failure is the one reported
            except (OSError, asyncio.TimeoutError) as exc:
                raise BridgeError(f"slot {self.slot}: the listening socket was not handed over: {exc!r}") from None
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(host_path)
        # what the runner sent: checked all the same
        for extra in fds[1:]:
            os.close(extra)
        if not fds:
            raise BridgeError(f"slot {self.slot}: the slot's runner passed no socket")
        try:
            listener = socket.socket(fileno=fds[0])
        except OSError:
            os.close(fds[0])
            raise BridgeError(f"slot {self.slot}: what came over the channel is not a socket") from None
        if not _listens_on_loopback(listener, bound):
            listener.close()
            raise BridgeError(f"slot {self.slot}: what came over the channel is not a socket listening on port {bound}")
        listener.setblocking(False)
        return listener

    async def _from(self, runner: int, channel: socket.socket) -> list[int]:
        """The descriptors the runner sent over `channel`; connections of other processes of the
        slot (which can see the channel in its /tmp) are closed unread."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + _HANDOVER_SECONDS
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError
            conn, _ = await asyncio.wait_for(loop.sock_accept(channel), left)
            with conn:
                pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
                if pid != runner:
                    log.warning("slot %d: pid %d of the slot connected to a bridge's channel", self.slot, pid)
                    continue
                conn.settimeout(max(left, 0.1))
                _, fds, _, _ = socket.recv_fds(conn, 16, 4)
                return fds

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = writer.get_extra_info("sockname")[1]
        bridge = self._open.get(port)
        if bridge is None or bridge.connections >= MAX_CONNECTIONS:  # closed meanwhile, or full
            writer.close()
            return
        bridge.connections += 1
        bridge.streams.add(writer)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*bridge.target)
            except OSError as exc:
                log.warning("slot %d: bridge to %s: cannot connect: %s", self.slot, _show(bridge.target), exc)
                return
            bridge.streams.add(up_writer)
            try:
                await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
            finally:
                bridge.streams.discard(up_writer)
                up_writer.close()
        finally:
            bridge.connections -= 1
            bridge.streams.discard(writer)
            writer.close()

    async def close(self) -> None:
        """Close every bridge of the slot and the connections through them."""
        bridges, self._open = list(self._open.values()), {}
        for bridge in bridges:
            bridge.server.close()
            for stream in list(bridge.streams):
                stream.close()
        for bridge in bridges:
            await bridge.server.wait_closed()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until `source` ends, then half-close `sink` (HTTP clients may wait for that); a reset
    on either side ends the copy and, through the caller, both connections."""
    try:
        while data := await source.read(_CHUNK):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except (ConnectionError, OSError):
        sink.close()


def _listens_on_loopback(sock: socket.socket, port: int) -> bool:
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        return sock.family == socket.AF_INET and listening and sock.getsockname() == ("127.0.0.1", port)
    except OSError:
        return False


def _show(target: tuple[str, int]) -> str:
    host, port = target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
