"""Bad input gets a clear 4xx or a refused tool result, and never harms the server or other slots."""

from __future__ import annotations

import httpx
import pytest

from tests.server_process import RunningServer


def post(
    server: RunningServer, path: str, content: bytes | None = None, json: object = None, token: str | None = "valid"
) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {server.token if token == 'valid' else token}"}
    return httpx.post(server.url + path, content=content, json=json, headers=headers, timeout=30)


@pytest.mark.parametrize("path", ["/execute", "/batch", "/reset", "/openapi.json"])
def test_auth_required(server: RunningServer, path: str) -> None:
    assert post(server, path, json={}, token=None).status_code in (401, 405)
    r = post(server, path, json={"slot": 0, "tool": "bash", "args": {"command": "true"}}, token="wrong")
    assert r.status_code in (401, 405)
    if path != "/openapi.json":
        assert r.json()["error"] == "missing or wrong bearer token"


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../../x", "/workspace/../etc/hosts"])
def test_path_escape_refused(server: RunningServer, path: str) -> None:
    res = server.execute(0, "read_file", path=path)
    assert res["ok"] is False and "outside the workspace" in str(res["error"])
    res = server.execute(0, "write_file", path=path, content="x")
    assert res["ok"] is False and "outside the workspace" in str(res["error"])


def test_symlink_out_refused(server: RunningServer) -> None:
    server.execute(1, "bash", command="ln -sf /etc/hostname link; ln -sfn /etc dirlink")
    for path in ("link", "dirlink/passwd", "dirlink/new.txt"):
        for tool, args in (("read_file", {}), ("write_file", {"content": "x"})):
            res = server.execute(1, tool, path=path, **args)
            assert res["ok"] is False and "outside the workspace" in str(res["error"]), (tool, path)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "malformed JSON"),
        (b'{"slot": 99, "tool": "bash", "args": {"command": "true"}}', 404, "unknown slot 99"),
        (b'{"slot": 0, "tool": "rm_rf", "args": {}}', 400, "unknown tool"),
        (b'{"slot": 0, "tool": "bash", "args": {}}', 422, "invalid args for bash"),
        (b'{"slot": 0, "tool": "bash", "args": {"command": "x", "extra": 1}}', 422, "invalid args"),
        (b'{"slot": -1, "tool": "bash", "args": {"command": "true"}}', 422, "invalid request"),
        (b'{"slot": 0, "tool": "bash", "args": {"command": "true"}, "timeout": -5}', 422, "invalid request"),
        (b"[1, 2]", 422, "invalid request"),
        (b'{"slot": 0, "tool": "bash", "args": {"command": "echo \\ud800"}}', 400, "not part of a pair"),
        (b'{"slot": 0, "tool": "write_file", "args": {"path": "a\\uDC00", "content": ""}}', 400, "not part of a pair"),
    ],
)
def test_bad_execute_bodies(server: RunningServer, body: bytes, status: int, needle: str) -> None:
    r = post(server, "/execute", content=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_oversized_body(server: RunningServer) -> None:
    r = post(
        server, "/execute", json={"slot": 0, "tool": "write_file", "args": {"path": "big", "content": "x" * 5_000_000}}
    )
    assert r.status_code == 413 and "too large" in r.json()["error"]


def test_write_over_file_limit_refused(server: RunningServer) -> None:
    res = server.execute(0, "write_file", path="big", content="x" * 1_100_000)
    assert res["ok"] is False and "write limit" in str(res["error"])


def test_bad_base64_refused(server: RunningServer) -> None:
    res = server.execute(0, "write_file", path="b", content="%%%notb64", encoding="base64")
    assert res["ok"] is False and "base64" in str(res["error"])


def test_batch_validates_everything_first(server: RunningServer) -> None:
    calls = [
        {"slot": 0, "tool": "write_file", "args": {"path": "batch-first", "content": "1"}},
        {"slot": 0, "tool": "nope", "args": {}},
    ]
    r = post(server, "/batch", json={"calls": calls})
    assert r.status_code == 400
    assert server.execute(0, "bash", command="test -e batch-first || echo absent")["stdout"] == "absent\n"


def test_reset_unknown_slot(server: RunningServer) -> None:
    r = post(server, "/reset", json={"slot": 42})
    assert r.status_code == 404 and "unknown slot" in r.json()["error"]


def test_server_survives_and_other_slots_unaffected(server: RunningServer) -> None:
    server.execute(2, "write_file", path="keep.txt", content="kept")
    for body in (b"\xff\xfe", b"null", b'{"slot": "x"}', b"{}" * 1000):
        post(server, "/execute", content=body)
    assert server.execute(2, "read_file", path="keep.txt")["output"] == "kept"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_invalid_request_does_not_echo_the_input(server: RunningServer) -> None:
    big = "y" * 200_000
    r = post(server, "/execute", json={"slot": 0, "tool": "bash", "args": {"command": "x", "junk": big}})
    assert r.status_code == 422 and "invalid args" in r.json()["error"]
    assert big[:1000] not in r.text and len(r.content) < 2000, len(r.content)
    assert any(e["loc"] == ["junk"] for e in r.json()["detail"]), r.json()


async def test_a_servers_own_bug_is_a_json_500_with_its_cause_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception no handler expected (a bug) answers like every other error: JSON with `error`,
    what failed and where, the traceback in the server's log; the next request is served."""
    from aiohttp.test_utils import TestServer

    from atropos.sandbox.models import Enforcement
    from atropos.sandbox.server.app import SandboxApp

    enforcement = Enforcement(isolation="none", runner="python", network="allow", uid=0, limits={}, cgroups=[])
    api = SandboxApp([], token="t", default_timeout=5, enforcement=enforcement, max_body=1 << 20)

    async def broken(_request: object) -> object:
        raise KeyError("slot-state")

    monkeypatch.setattr(api, "status", broken)
    async with TestServer(api.build()) as srv, httpx.AsyncClient(base_url=str(srv.make_url(""))) as client:
        r = await client.get("/status", headers={"Authorization": "Bearer t"})
        assert r.status_code == 500 and r.headers["Content-Type"].startswith("application/json"), r.text
        assert r.json()["error"] == "internal error of the server on GET /status: KeyError: 'slot-state'", r.text
        assert (await client.get("/health")).status_code == 200
    assert "Traceback" in caplog.text and "event=internal_error" in caplog.text
