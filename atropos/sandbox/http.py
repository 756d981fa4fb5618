"""A small HTTP/1.1 client for the pool's calls to its sandbox servers: keep-alive connections,
one request at a time on each, bodies of known length (or chunked), plain HTTP only.

The pool runs inside the training process, where CPU is scarce, and every tool call is one
request: a general client (aiohttp's: ~0.3 ms of CPU per call measured here, a task and a dozen
objects per request) costs more than the call's own bookkeeping. Here a request is one write of
prepared bytes and its answer is parsed from the bytes as they arrive, in the connection's
protocol callbacks, with no task of its own.

Failures are transport errors (`HttpTransportError`; `HttpRefused` when nothing listens) or
`asyncio.TimeoutError` when the address stays silent (no answer, or no connection, within the
request's timeout: a node whose link went down sends no refusal); what a status means is the
caller's business. `abort_all` fails every request in flight at once (a server
declared lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from urllib.parse import urlsplit

_CONNECT_TIMEOUT = 5.0  # at most, whatever the request's timeout; a shorter timeout bounds it too
_MAX_HEAD = 64 * 1024
# an idle connection older than this is not reused: the server closes idle ones after 75 s
# (aiohttp's keep-alive), and a request sent as it does so would fail without having run
_MAX_IDLE = 30.0


class HttpTransportError(ConnectionError):
    """The request did not get a whole answer: refused, reset, closed, malformed or aborted."""


class HttpRefused(HttpTransportError):
    """Nothing listens at the address (connection refused, or no route to it)."""


class HttpUnreachable(HttpRefused):
    """No route to the address: no host there answered (the refusal came from the network)."""


class HttpSilent(asyncio.TimeoutError):
    """No connection within the wait: nothing at the address answered, not even with a refusal."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; `send` one request, its future gets (status, body)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.reusable = False
        self.idle_since = 0.0
        self._buf = bytearray()
        self._head: tuple[int, int | None, bool, bool] | None = None  # status, length, chunked, close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        if self.transport is None:  # closed between its connect and this request (a server killed then)
            raise HttpTransportError("connection closed before the request was sent")
        self.waiter = asyncio.get_running_loop().create_future()
        self.reusable = False
        self._buf.clear()
        self._head = None
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            self._parse()
        except (HttpTransportError, ValueError) as exc:  # ValueError: a length that is no number
            self.fail(exc if isinstance(exc, HttpTransportError) else HttpTransportError(f"malformed answer: {exc}"))

    def eof_received(self) -> bool | None:
        if self._head is not None and self._head[1] is None and not self._head[2]:  # body to the end
            self._finish(bytes(self._buf))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.reusable = False
        self.fail(HttpTransportError(f"connection closed before the whole answer ({exc or 'by the server'})"))

    def fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def _parse(self) -> None:
        if self.waiter is None:
            if self._buf:
                raise HttpTransportError("data from the server with no request outstanding")
            return
        if self._head is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEAD:
                    raise HttpTransportError("answer's header too large")
                return
            self._head = _head(bytes(self._buf[:end]))
            del self._buf[: end + 4]
        status, length, chunked, close = self._head
        body: bytes | None
        if status in (204, 304):  # never a body
            body = b""
        elif chunked:
            body = _dechunk(self._buf)
            if body is None:
                return
        elif length is not None:
            if len(self._buf) < length:
                return
            body = bytes(self._buf[:length])
        else:
            return  # read to EOF
        self.reusable = not close
        self._finish(body)

    def _finish(self, body: bytes) -> None:
        assert self._head is not None
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self._head[0], body))


def _head(raw: bytes) -> tuple[int, int | None, bool, bool]:
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HttpTransportError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    length: int | None = None
    chunked = False
    close = parts[0] == b"HTTP/1.0"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value.strip())
        elif key == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif key == b"connection":
            close = value.strip().lower() == b"close"
    return int(parts[1]), length, chunked, close


def _dechunk(buf: bytearray) -> bytes | None:
    """The whole body of a chunked answer in `buf`, or None while more is to come."""
    body = bytearray()
    at = 0
    while True:
        eol = buf.find(b"\r\n", at)
        if eol < 0:
            return None
        size = int(bytes(buf[at:eol]).split(b";", 1)[0], 16)
        start = eol + 2
        if size == 0:
            return bytes(body) if buf.find(b"\r\n", start) >= 0 else None
        if len(buf) < start + size + 2:
            return None
        body += buf[start : start + size]
        at = start + size + 2


class HttpClient:
    """Requests to one `http://host:port` server over a set of kept-alive connections."""

    def __init__(
        self, url: str, headers: dict[str, str] | None = None, keep: int = 16, max_idle: float = _MAX_IDLE
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"{url!r}: an http://host:port address")
        self.host = parts.hostname
        self.port = parts.port or 80
        fixed = {"Host": parts.netloc, **(headers or {})}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode()
        self.keep = keep
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._closed = False

    async def request(self, method: str, path: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
        """(status, body) of one request; HttpTransportError, or asyncio.TimeoutError after `timeout`."""
        if self._closed:
            raise HttpTransportError("the client is closed")
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self._fixed
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        data = head + b"\r\n" + (body or b"")
        deadline = time.monotonic() + timeout  # the connection's wait and the answer's, together
        conn = await self._connection(timeout)
        self._busy.add(conn)
        # a timer that fails the connection's answer: wait_for cost each request a turn of the loop and
        # a future more
        timer = asyncio.get_running_loop().call_later(
            max(0.0, deadline - time.monotonic()), conn.fail, asyncio.TimeoutError()
        )
        try:
            answer = await conn.send(data)
        except BaseException:
            conn.fail(HttpTransportError("request abandoned"))  # its answer may still come: never reuse it
            raise
        finally:
            timer.cancel()
            self._busy.discard(conn)
        if conn.reusable and conn.transport is not None and len(self._idle) < self.keep and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        return answer

    async def _connection(self, timeout: float) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is None or conn.transport.is_closing():
                continue
            if time.monotonic() - conn.idle_since > self.max_idle:
                conn.transport.close()
                continue
            return conn
        loop = asyncio.get_running_loop()
        wait = min(_CONNECT_TIMEOUT, timeout)
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(_Connection, self.host, self.port), wait)
        except asyncio.TimeoutError:
            # silence, not a refusal: nothing answered (a node cut off, a full backlog)
            raise HttpSilent(f"no connection to {self.host}:{self.port} within {wait:g}s (silent)") from None
        except OSError as exc:
            kind = HttpRefused if exc.errno == errno.ECONNREFUSED else HttpUnreachable
            raise kind(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        return conn

    def abort_all(self, reason: str) -> None:
        """Every request in flight fails now with HttpTransportError(reason)."""
        for conn in list(self._busy):
            conn.fail(HttpTransportError(reason))

    async def close(self) -> None:
        self._closed = True
        self.abort_all("the client is closed")
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)  # let the transports' close callbacks run
