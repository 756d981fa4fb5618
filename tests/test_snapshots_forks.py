"""Snapshots and forks on a real server (bubblewrap: overlay forks; plain processes: copy forks):
forks isolated from each other and from the snapshot, a fork gets the snapshot's state whatever
the source did later, reset returns a fork to an empty workspace, the API's refusals, snapshots
dying with the server, and the pool's prepare / acquire(from_snapshot=...)."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from atropos.errors import SetupFailed
from atropos.slots import SlotPool, SlotPoolConfig
from tests.server_process import RunningServer, run_server

_SOURCE = 0
_FORKS = (1, 2, 3)


def _sh(srv: RunningServer, slot: int, command: str) -> str:
    out = srv.execute(slot, "bash", command=command)
    assert out["exit_code"] == 0, out
    return str(out["stdout"])


def _post(srv: RunningServer, path: str, body: dict[str, object]) -> httpx.Response:
    with srv.client() as c:
        return c.post(path, json=body)


def _reset_all(srv: RunningServer) -> None:
    with srv.client() as c:
        for slot in range(4):
            assert c.post("/reset", json={"slot": slot}).status_code == 200
        for snap in c.get("/snapshots").json()["snapshots"]:
            assert c.delete(f"/snapshots/{snap['name']}").status_code == 200


def _prepared(srv: RunningServer, name: str) -> None:
    _reset_all(srv)
    _sh(srv, _SOURCE, "mkdir -p repo/src && echo base > repo/src/f && echo secret > repo/k && chmod 600 repo/k "
        "&& ln -s src/f repo/link && (setsid sleep 30 >/dev/null 2>&1 &)")  # fmt: skip
    r = _post(srv, "/snapshot", {"slot": _SOURCE, "name": name})
    assert r.status_code == 200, r.text
    assert (r.json()["files"], r.json()["bytes"]) == (2, len("base\nsecret\n"))


def _mechanism(srv: RunningServer) -> str:
    with srv.client() as c:
        return str(c.get("/health").json()["fork"])


def test_forks_are_isolated_from_each_other_and_the_snapshot(server: RunningServer) -> None:
    _prepared(server, "iso")
    r = _post(server, "/fork", {"snapshot": "iso", "slots": list(_FORKS)})
    assert r.status_code == 200, r.text
    # what the server says it does (an overlay where its bubblewrap and kernel allow, else a copy)
    assert r.json()["mechanism"] == _mechanism(server)
    assert "none" not in server.data_dir or r.json()["mechanism"] == "copy"
    # one fork writes, deletes, renames and chmods; the others and the snapshot see none of it
    _sh(server, 1, "echo one > repo/src/f && rm repo/k && mv repo/src repo/moved && chmod 700 repo && touch new")
    for slot in (2, 3):
        assert _sh(server, slot, "cat repo/src/f repo/link repo/k; stat -c %a repo/k repo; ls") == (
            "base\nbase\nsecret\n600\n755\nrepo\n"
        )
    _sh(server, 2, "echo two > repo/src/f")
    assert _sh(server, 3, "cat repo/src/f") == "base\n"
    assert _sh(server, 1, "cat repo/moved/f; ls repo; ls") == "one\nlink\nmoved\nnew\nrepo\n"
    # and a fork of the same snapshot made now still starts from it
    assert _post(server, "/fork", {"snapshot": "iso", "slots": [1]}).status_code == 200
    assert _sh(server, 1, "cat repo/src/f repo/k; ls") == "base\nsecret\nrepo\n"


def test_fork_gets_the_snapshot_not_the_source_as_it_is_now(server: RunningServer) -> None:
    _prepared(server, "frozen")
    _sh(server, _SOURCE, "echo later > repo/src/f && rm repo/k && touch repo/added")
    assert _post(server, "/fork", {"snapshot": "frozen", "slots": [2]}).status_code == 200
    assert _sh(server, 2, "cat repo/src/f repo/k; ls repo") == "base\nsecret\nk\nlink\nsrc\n"
    # nothing of the source's processes came along: its `sleep 30` is not in the fork's PID namespace
    # (without bubblewrap there is none: every slot sees the host's processes)
    if "none" not in server.data_dir:
        assert _sh(server, 2, "pgrep -c sleep || true") == "0\n"


def test_reset_of_a_fork_empties_it_and_frees_the_snapshot(server: RunningServer) -> None:
    _prepared(server, "gone")
    assert _post(server, "/fork", {"snapshot": "gone", "slots": [1, 3]}).status_code == 200
    _sh(server, 3, "echo extra > extra")
    with server.client() as c:
        listed = c.get("/snapshots").json()["snapshots"]
        assert [(s["name"], s["forks"]) for s in listed] == [("gone", [1, 3])]
        if _mechanism(server) == "overlay":  # an overlay stands on it: not deleted under the forks
            refused = c.delete("/snapshots/gone")
            assert refused.status_code == 409 and "[1, 3]" in refused.json()["error"]
        for slot in (1, 3):
            assert c.post("/reset", json={"slot": slot}).status_code == 200
            assert _sh(server, slot, "ls -A") == ""
        assert c.get("/snapshots").json()["snapshots"][0]["forks"] == []
        assert c.delete("/snapshots/gone").status_code == 200
        assert c.get("/snapshots").json()["snapshots"] == []
        assert c.delete("/snapshots/gone").status_code == 404
    assert os.listdir(os.path.join(server.data_dir, "snapshots")) == []


def test_a_fork_can_be_snapshotted_and_downloaded(server: RunningServer) -> None:
    _prepared(server, "base")
    assert _post(server, "/fork", {"snapshot": "base", "slots": [1]}).status_code == 200
    _sh(server, 1, "rm repo/k && echo v2 > repo/v2")
    r = _post(server, "/snapshot", {"slot": 1, "name": "second"})
    assert r.status_code == 200, r.text
    assert _post(server, "/fork", {"snapshot": "second", "slots": [2]}).status_code == 200
    assert _sh(server, 2, "ls repo; cat repo/v2") == "link\nsrc\nv2\nv2\n"
    with server.client() as c:
        tar = c.get("/download", params={"slot": 1, "path": "repo", "compression": "none"})
    assert tar.status_code == 200
    assert b"v2" in tar.content and b"secret" not in tar.content


def test_refusals_are_clear(server: RunningServer) -> None:
    _prepared(server, "ok")
    cases = [
        ("/snapshot", {"slot": 0, "name": "ok"}, 409, "exists"),
        ("/snapshot", {"slot": 0, "name": "../x"}, 422, "invalid request"),
        ("/snapshot", {"slot": 0, "name": ".hidden"}, 422, "invalid request"),
        ("/snapshot", {"slot": 9, "name": "x"}, 404, "unknown slot"),
        ("/fork", {"snapshot": "nope", "slots": [1]}, 404, "no snapshot 'nope'"),
        ("/fork", {"snapshot": "ok", "slots": [1, 1]}, 400, "twice"),
        ("/fork", {"snapshot": "ok", "slots": [7]}, 404, "unknown slot"),
        ("/fork", {"snapshot": "ok", "slots": []}, 422, "invalid"),
    ]
    for path, body, status, says in cases:
        r = _post(server, path, body)
        assert r.status_code == status and says in r.json()["error"], (path, body, r.text)


def test_snapshots_count_against_limits_and_die_with_the_server(tmpdir_path: str) -> None:
    data_dir = os.path.join(tmpdir_path, "data")
    with run_server(data_dir, "--slots", "2", "--max-snapshots", "1", "--limit-workspace", "2M") as srv:
        _sh(srv, 0, "head -c 1500000 /dev/zero > big")
        assert _post(srv, "/snapshot", {"slot": 0, "name": "one"}).status_code == 200
        full = _post(srv, "/snapshot", {"slot": 0, "name": "two"})
        assert full.status_code == 409 and "--max-snapshots" in full.json()["error"]
        assert _post(srv, "/fork", {"snapshot": "one", "slots": [1]}).status_code == 200
        # the fork's workspace holds the snapshot's 1.5 MB: 1 MB more is over its 2 MB limit
        over = srv.execute(1, "bash", command="head -c 1000000 /dev/zero > more; sleep 2; echo done")
        assert over["limit"] == "workspace", over
        assert os.listdir(os.path.join(data_dir, "snapshots")) == ["one"]
    assert os.listdir(os.path.join(data_dir, "snapshots")) == []


def test_pool_prepares_once_per_server_and_forks(tmpdir_path: str) -> None:
    with open(os.path.join(tmpdir_path, "data.txt"), "w") as fh:
        fh.write("from the setup\n")

    async def scenario() -> None:
        config = SlotPoolConfig(slots_per_container=4, min_containers=2, max_containers=2)
        async with SlotPool(config) as pool:
            setup = [("bash", {"command": "echo $RANDOM$RANDOM > stamp && mkdir -p dep && echo installed > dep/x"})]
            await pool.prepare("task-1", setup)

            async def rollout(i: int) -> tuple[str, str]:
                async with pool.slot(f"r{i}", from_snapshot="task-1") as slot:
                    result = await pool.execute(slot, "bash", {"command": f"cat stamp dep/x && echo {i} > stamp"})
                    assert result.ok, result
                    return slot.server_id, result.stdout

            outputs = await asyncio.gather(*(rollout(i) for i in range(8)))
            by_server: dict[str, set[str]] = {}
            for server_id, out in outputs:
                assert out.endswith("installed\n")
                by_server.setdefault(server_id, set()).add(out)
            # one setup per server: every rollout on a server starts from the same stamp
            assert len(by_server) == 2 and all(len(stamps) == 1 for stamps in by_server.values()), by_server
            with pytest.raises(ValueError, match="prepare"):
                await pool.acquire("x", from_snapshot="never-prepared")
            with pytest.raises(SetupFailed, match="exit 3"):
                await pool.prepare("broken", [("bash", {"command": "exit 3"})])
            # a pool-held slot still gets a tree from the caller's machine, then is forked over
            async with pool.slot("up") as slot:
                await pool.upload_tree(slot, tmpdir_path, "in")
                assert (await pool.execute(slot, "bash", {"command": "cat in/data.txt"})).stdout == "from the setup\n"

    asyncio.run(scenario())
