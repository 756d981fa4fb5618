"""The bearer token: refused in every wrong shape without a 5xx, and never echoed, logged or exposed.

Kept out of command lines elsewhere (not repeated here): tests/test_backend_local_drivers.py
(process, docker, apptainer argv), tests/test_nomad_e2e.py (`assert_token_in_no_command_line` over
every live process with a Nomad job), tests/test_images_real.py (a real apptainer server).
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.security_fixtures import temporary_server
from tests.server_process import RunningServer, pids_with_arg, runner_pids


@pytest.fixture(scope="module")
def token_server() -> Iterator[RunningServer]:
    with temporary_server("atropos-test-token-", "--slots", "1", "--isolation", "bwrap") as srv:
        yield srv


def wrong_authorizations(token: str) -> list[str]:
    return [
        "",
        "Bearer",
        f"Bearer {token[:-1]}",
        f"Bearer {token}x",
        f"Bearer {token[1:]}",
        f"Basic {token}",
        token,
        f"Bearer  {token[:8]}",
        f"Bearer {token.upper()}x",
        "Bearer " + "A" * 8000,
        f"Token {token}",
    ]


def raw_request(url: str, header_line: bytes) -> bytes:
    """One POST /execute with a raw header line (bytes no HTTP client would send); the raw reply,
    empty if the server closed the connection without one (it may, before reading a 1 MB header)."""
    parts = urlsplit(url)
    body = b'{"slot": 0, "tool": "bash", "args": {"command": "echo pwned"}}'
    request = (
        b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + header_line
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )
    chunks = []
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=30) as sock:
        try:
            sock.sendall(request)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass
    return b"".join(chunks)


def status_of(reply: bytes) -> int:
    """The reply's status; 400 for a connection the server closed without a reply (a refusal)."""
    return int(reply.split(b" ", 2)[1]) if reply else 400


def test_wrong_tokens_are_refused_with_401_and_never_echoed(token_server: RunningServer) -> None:
    srv = token_server
    for value in wrong_authorizations(srv.token):
        r = httpx.post(
            srv.url + "/execute",
            headers={"Authorization": value},
            json={"slot": 0, "tool": "bash", "args": {"command": "echo pwned"}},
            timeout=30,
        )
        assert r.status_code == 401, (value[:40], r.status_code, r.text)
        assert srv.token not in r.text and "pwned" not in r.text


@pytest.mark.parametrize(
    "header_line",
    [
        b"Authorization: Bearer \xff\xfe\x80",  # not UTF-8
        b"Authorization: Bearer " + b"B" * (1 << 20),  # 1 MB
        b"Authorization: Bearer a\x00b",
        b"Authorization: Bearer ",
        b"Authorization: Bearer " + "é".encode() * 40,
        b"Authorization: Bearer " + b"\t" * 100,
        b"Authorization : Bearer x",
        b"Authorization: Bearer x\r\nAuthorization: Bearer y",
    ],
)
def test_malformed_or_huge_authorization_is_a_4xx(token_server: RunningServer, header_line: bytes) -> None:
    reply = raw_request(token_server.url, header_line)
    assert 400 <= status_of(reply) < 500, reply[:300]
    assert token_server.token.encode() not in reply and b"pwned" not in reply
    with token_server.client() as client:
        assert client.get("/health").status_code == 200  # the server took no harm


def test_health_and_error_bodies_never_hold_the_token(token_server: RunningServer) -> None:
    srv = token_server
    with srv.client() as client:
        bodies = [
            client.get("/health").text,
            client.post("/execute", content=b"{not json").text,
            client.post("/execute", json={"slot": 9, "tool": "bash", "args": {"command": "x"}}).text,
            client.post("/execute", json={"slot": 0, "tool": "nope"}).text,
            client.post("/execute", json={"slot": 0, "tool": "bash", "args": {"x": srv.token}}).text,
            client.post("/reset", json={"slot": "zero"}).text,
            client.get("/nowhere").text,
            client.put("/execute").text,
        ]
    assert httpx.get(srv.url + "/health").json().keys() >= {"status", "isolation"}
    for body in bodies[:4] + bodies[5:]:
        assert srv.token not in body, body
    # an invalid request is echoed to its sender only, who already holds the token: that is the one echo


def test_commands_in_a_slot_cannot_find_the_token(token_server: RunningServer) -> None:
    srv = token_server
    res = srv.execute(
        0,
        "bash",
        command="env; cat /proc/1/environ /proc/self/environ 2>/dev/null; "
        "grep -rs ATROPOS_SANDBOX_TOKEN /proc/*/environ; ls -a ~; cat ~/token",
        timeout=60,
    )
    assert srv.token not in str(res["output"])


def test_the_token_is_in_no_command_line_and_no_runner_environment(token_server: RunningServer) -> None:
    srv = token_server
    own = pids_with_arg(srv.data_dir)
    assert srv.proc.pid in own and len(own) >= 2  # the server and its slot's sandbox
    for pid in own:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            assert srv.token.encode() not in fh.read(), pid
    for pid in runner_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                assert srv.token.encode() not in fh.read(), pid
        except FileNotFoundError:
            continue


def test_the_server_log_never_holds_the_token() -> None:
    with temporary_server("atropos-test-token-log-", "--slots", "1", "--isolation", "bwrap") as srv:
        for value in wrong_authorizations(srv.token)[:6]:
            httpx.post(srv.url + "/execute", headers={"Authorization": value}, json={}, timeout=30)
        with srv.client() as client:  # a slot failure (its runner killed) gets logged
            client.post("/execute", json={"slot": 0, "tool": "bash", "args": {"command": "kill -9 -1"}})
        srv.execute(0, "bash", command=f"echo {srv.token[:4]}")
        srv.proc.send_signal(signal.SIGTERM)
        out, err = srv.proc.communicate(timeout=30)
    assert err or out  # it did log something
    assert srv.token not in out and srv.token not in err
