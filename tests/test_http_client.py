"""The pool's small HTTP/1.1 client against a real aiohttp server on loopback: answers of known
length and chunked ones, kept-alive connections reused, a late answer never read as the next one,
refused and reset connections, and requests in flight aborted at once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from atropos.sandbox.http import HttpClient, HttpRefused, HttpTransportError


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"got": (await request.read()).decode(), "auth": request.headers.get("Authorization")})


async def _chunked(_request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(_request)
    for part in (b'{"a": ', b"1", b"}"):
        await response.write(part)
        await asyncio.sleep(0.01)
    await response.write_eof()
    return response


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "0.5")))
    return web.json_response({"slow": request.query.get("tag")})


async def _drop(request: web.Request) -> web.Response:
    assert request.transport is not None
    request.transport.close()  # no answer at all
    await asyncio.sleep(1)
    return web.Response()


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[int]]]:
    peers: list[int] = []  # the client port of every connection the server accepted

    @web.middleware
    async def count(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer and peer[1] not in peers:
            peers.append(peer[1])
        return await handler(request)

    app = web.Application(middlewares=[count])
    app.router.add_post("/echo", _echo)
    app.router.add_get("/chunked", _chunked)
    app.router.add_get("/slow", _slow)
    app.router.add_get("/drop", _drop)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", peers
    await runner.cleanup()


async def test_answers_of_known_length_reuse_one_kept_alive_connection(server: tuple[str, list[int]]) -> None:
    url, peers = server
    client = HttpClient(url, headers={"Authorization": "Bearer t"})
    for i in range(5):
        status, body = await client.request("POST", "/echo", f'{{"n": {i}}}'.encode(), timeout=5)
        assert status == 200 and body == f'{{"got": "{{\\"n\\": {i}}}", "auth": "Bearer t"}}'.encode(), body
    assert len(peers) == 1  # one connection for all five
    await client.close()


async def test_a_chunked_answer_is_read_whole(server: tuple[str, list[int]]) -> None:
    client = HttpClient(server[0])
    assert await client.request("GET", "/chunked", None, timeout=5) == (200, b'{"a": 1}')
    await client.close()


async def test_a_timed_out_request_never_lends_its_late_answer_to_the_next(server: tuple[str, list[int]]) -> None:
    client = HttpClient(server[0])
    with pytest.raises(asyncio.TimeoutError):
        await client.request("GET", "/slow?s=0.5&tag=late", None, timeout=0.1)
    await asyncio.sleep(0.6)  # the late answer arrives (on a connection that was dropped)
    assert await client.request("GET", "/slow?s=0&tag=next", None, timeout=5) == (200, b'{"slow": "next"}')
    assert len(server[1]) == 2
    await client.close()


async def test_no_answer_and_nothing_listening_are_transport_errors(server: tuple[str, list[int]]) -> None:
    client = HttpClient(server[0])
    with pytest.raises(HttpTransportError, match="connection closed before the whole answer"):
        await client.request("GET", "/drop", None, timeout=5)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    with pytest.raises(HttpRefused, match=f"cannot connect to 127.0.0.1:{free}"):
        await HttpClient(f"http://127.0.0.1:{free}").request("GET", "/", None, timeout=5)
    await client.close()


async def test_abort_all_fails_the_requests_in_flight_at_once(server: tuple[str, list[int]]) -> None:
    client = HttpClient(server[0])
    calls = [asyncio.ensure_future(client.request("GET", "/slow?s=30", None, timeout=60)) for _ in range(3)]
    await asyncio.sleep(0.2)
    client.abort_all("the server was declared lost")
    done, pending = await asyncio.wait(calls, timeout=2)
    assert not pending and len(done) == 3
    for call in done:
        with pytest.raises(HttpTransportError, match="declared lost"):
            call.result()
    await client.close()


def test_only_plain_http_addresses() -> None:
    with pytest.raises(ValueError, match="http://host:port"):
        HttpClient("https://example.invalid:443")


async def test_a_connection_idle_too_long_is_not_reused(server: tuple[str, list[int]]) -> None:
    """The server closes idle connections after its keep-alive time: a request on one it is closing
    would fail without having run, so an old idle connection is replaced instead."""
    url, peers = server
    client = HttpClient(url, max_idle=0.2)
    await client.request("POST", "/echo", b"1", timeout=5)
    await client.request("POST", "/echo", b"2", timeout=5)
    assert len(peers) == 1  # reused while fresh
    await asyncio.sleep(0.3)
    await client.request("POST", "/echo", b"3", timeout=5)
    assert len(peers) == 2
    await client.close()


async def test_a_silent_address_is_a_timeout_within_the_requests_own_timeout() -> None:
    # a listener that accepts nothing with its backlog full: the kernel drops further SYNs, as for a
    # node whose link went down (no refusal comes back). The request's timeout bounds the connect.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the backlog (non-blocking: the last ones stay pending)
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        try:
            with pytest.raises(
                asyncio.TimeoutError, match=rf"no connection to 127.0.0.1:{port} within 0.4s \(silent\)"
            ):
                await HttpClient(f"http://127.0.0.1:{port}").request("GET", "/health", None, timeout=0.4)
        finally:
            for filler in fillers:
                filler.close()


def test_a_connection_lost_before_its_request_is_a_transport_error() -> None:
    """A server killed between a new connection's connect and its request: a transport error (the
    pool's SlotLost), not an AssertionError (seen in CI once, in the Nomad fault test)."""
    from atropos.sandbox.http import HttpTransportError, _Connection

    conn = _Connection()
    conn.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
    with pytest.raises(HttpTransportError, match="before the request was sent"):
        conn.send(b"GET /health HTTP/1.1\r\n\r\n")
