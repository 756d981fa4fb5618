"""Tree transfer: `POST /upload` and `GET /download` on a real server (bubblewrap and plain), hostile
archives refused with nothing touched outside the slot, and the pool's upload_tree/download_tree."""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator

import httpx
import pytest
import zstandard

from atropos.errors import InvalidToolCall
from atropos.slots import SlotPool, SlotPoolConfig
from tests.server_process import RunningServer, run_server


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], compression: str = "none") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    if compression == "gzip":
        return gzip.compress(raw)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, data


def _entry(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755
    return info, None


def _upload(srv: RunningServer, slot: int, body: bytes, path: str = ".") -> httpx.Response:
    with srv.client() as c:
        return c.post("/upload", params={"slot": slot, "path": path}, content=body)


def _download(srv: RunningServer, slot: int, path: str = ".", compression: str = "gzip") -> httpx.Response:
    with srv.client() as c:
        return c.get("/download", params={"slot": slot, "path": path, "compression": compression})


def _workspace(srv: RunningServer, slot: int) -> str:
    return os.path.join(srv.data_dir, "slots", str(slot))


def _listing(root: str) -> dict[str, str]:
    """Every entry below `root`: a file's content, a link's target, a directory's 'dir'."""
    found: dict[str, str] = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(top, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                found[rel] = "-> " + os.readlink(full)
            elif os.path.isdir(full):
                found[rel] = "dir"
            else:
                with open(full, "rb") as fh:
                    found[rel] = fh.read().decode(errors="replace")
    return found


@pytest.fixture
def outside() -> Iterator[str]:
    """A directory outside every slot that hostile archives aim at."""
    path = tempfile.mkdtemp(prefix="atropos-outside-")
    os.chmod(path, 0o777)  # a server that dropped root could write here if it were fooled
    with open(os.path.join(path, "victim"), "w") as fh:
        fh.write("untouched")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_upload_then_download_round_trip(server: RunningServer, compression: str) -> None:
    body = _tar(
        [
            _entry("proj", tarfile.DIRTYPE),
            _file("proj/a.txt", b"alpha\n"),
            _file("proj/run.sh", b"#!/bin/sh\necho ran\n", 0o755),
            _file("proj/empty", b""),
            _file("proj/deep/er/ünï.txt", "ünïcode\n".encode()),
            _entry("proj/link", tarfile.SYMTYPE, "a.txt"),
            _entry("proj/python", tarfile.SYMTYPE, "/usr/bin/python3"),
            _entry("proj/hard", tarfile.LNKTYPE, "proj/a.txt"),
        ],
        compression,
    )
    r = _upload(server, 0, body, path="dest")
    assert r.status_code == 200, r.text
    done = r.json()
    assert (done["files"], done["symlinks"], done["hardlinks"], done["bytes"]) == (
        4,
        2,
        1,
        6 + 19 + 0 + len("ünïcode\n".encode()),
    )
    out = server.execute(0, "bash", command="cd dest/proj && cat link && ./run.sh && cat deep/er/ünï.txt && "
                         "readlink python && stat -c %h a.txt")  # fmt: skip
    assert out["stdout"] == "alpha\nran\nünïcode\n/usr/bin/python3\n2\n", out

    r = _download(server, 0, "dest", compression="zstd" if compression == "zstd" else "gzip")
    assert r.status_code == 200, r.text
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(r.content) if compression == "zstd" else None
    with tarfile.open(fileobj=io.BytesIO(raw if raw is not None else r.content), mode="r:*") as tf:
        names = {m.name: m for m in tf.getmembers()}
        assert tf.extractfile(names["proj/deep/er/ünï.txt"]).read() == "ünïcode\n".encode()  # type: ignore[union-attr]
        assert names["proj/link"].issym() and names["proj/link"].linkname == "a.txt"
        assert names["proj/run.sh"].mode & 0o777 == 0o755
        assert names["proj/python"].linkname == "/usr/bin/python3"
    server.execute(0, "bash", command="rm -rf dest")


def test_upload_merges_and_replaces_like_tar(server: RunningServer) -> None:
    server.execute(1, "bash", command="mkdir -p m/keep && echo old > m/file && echo kept > m/keep/x")
    r = _upload(server, 1, _tar([_file("file", b"new\n"), _file("keep/y", b"added\n")]), path="m")
    assert r.status_code == 200, r.text
    assert server.execute(1, "bash", command="cat m/file m/keep/x m/keep/y")["stdout"] == "new\nkept\nadded\n"
    server.execute(1, "bash", command="rm -rf m")


@pytest.mark.parametrize(
    ("members", "says"),
    [
        ([_file("../escape", b"x")], "'..'"),
        ([_file("a/../../escape", b"x")], "'..'"),
        ([_file("/tmp/atropos-abs-escape", b"x")], "absolute"),
        ([_entry("dev", tarfile.CHRTYPE)], "device node"),
        ([_entry("blk", tarfile.BLKTYPE)], "device node"),
        ([_entry("fifo", tarfile.FIFOTYPE)], "FIFO"),
        ([_entry("hl", tarfile.LNKTYPE, "/etc/passwd")], "absolute"),
        ([_entry("hl", tarfile.LNKTYPE, "../x")], "'..'"),
        ([_entry("hl", tarfile.LNKTYPE, "not-in-archive")], "hard link"),
    ],
)
def test_hostile_member_is_refused_and_nothing_changes(
    server: RunningServer, members: list[tuple[tarfile.TarInfo, bytes | None]], says: str
) -> None:
    server.execute(2, "bash", command="rm -rf ./* && echo old > keep")
    before = _listing(_workspace(server, 2))
    # a good member first: all or nothing means it is not kept either
    r = _upload(server, 2, _tar([_file("keep", b"overwritten"), _file("good", b"g"), *members]))
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]
    assert _listing(_workspace(server, 2)) == before
    assert not os.path.exists("/tmp/atropos-abs-escape")
    assert not os.path.exists(os.path.join(server.data_dir, "slots", "escape"))


def test_symlink_then_file_through_it_is_refused(server: RunningServer, outside: str) -> None:
    server.execute(3, "bash", command="rm -rf ./*")
    body = _tar([_entry("l", tarfile.SYMTYPE, outside), _file("l/evil", b"pwned")])
    r = _upload(server, 3, body)
    assert r.status_code == 400, r.text
    assert "not a directory" in r.json()["error"]
    assert sorted(os.listdir(outside)) == ["victim"]
    assert _listing(_workspace(server, 3)) == {}


def test_a_slots_own_symlink_is_never_followed(server: RunningServer, outside: str) -> None:
    """The slot plants links to a directory outside (as the server would see it); an upload to
    them or through them, and a download of them, never reach it."""
    server.execute(3, "bash", command=f"rm -rf ./* && ln -s {outside} planted && mkdir d && ln -s {outside} d/inner")
    r = _upload(server, 3, _tar([_file("evil", b"pwned")]), path="planted")
    assert r.status_code == 400 and "outside the workspace" in r.json()["error"], r.text
    # a member named like the link: the link is replaced by the member's directory, never entered
    r = _upload(server, 3, _tar([_file("d/inner/evil", b"pwned")]))
    assert r.status_code == 200, r.text
    assert sorted(os.listdir(outside)) == ["victim"]
    assert server.execute(3, "bash", command="cat d/inner/evil")["stdout"] == "pwned"
    r = _download(server, 3, "planted")
    assert r.status_code == 400, r.text
    r = _download(server, 3, ".")
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tf:
        planted = tf.getmember("planted")
        assert planted.issym() and planted.linkname == outside
        assert not any(m.name.startswith("planted/") for m in tf.getmembers())
        assert "victim" not in {os.path.basename(m.name) for m in tf.getmembers()}


def test_download_errors_are_clear(server: RunningServer) -> None:
    assert _download(server, 0, "../..").status_code == 400
    missing = _download(server, 0, "no/such/dir")
    assert missing.status_code == 404 and "no such directory" in missing.json()["error"]
    assert _download(server, 0, ".", compression="bz2").status_code == 400
    assert _download(server, 99, ".").status_code == 404
    with server.client() as c:
        assert c.get("/download", params={"slot": "x"}).status_code == 400
        assert c.get("/download", params={"slot": "³"}).status_code == 400  # a digit to str.isdigit only
        # a parameter the document does not name (schemathesis sent `=null`): refused, not ignored
        extra = c.get("/download", params={"slot": 0, "": "null"})
        assert extra.status_code == 400 and "unknown query parameter" in extra.json()["error"], extra.text
        assert c.post("/upload", params={"slot": 0, "compression": "gzip"}, content=b"").status_code == 400
        assert httpx.get(server.url + "/download", params={"slot": 0}).status_code == 401


def test_damaged_archive_is_refused(server: RunningServer) -> None:
    r = _upload(server, 0, b"this is not a tar archive at all" * 40)
    assert r.status_code == 400, r.text
    truncated = _tar([_file("big", os.urandom(100_000))], "gzip")[:5000]
    r = _upload(server, 0, truncated)
    assert r.status_code == 400, r.text


@pytest.fixture(scope="module")
def small_server() -> Iterator[RunningServer]:
    """A server whose uploads may unpack 1 MiB, and whose slots' workspaces hold 4 MiB."""
    data_dir = tempfile.mkdtemp(prefix="atropos-test-upload-")
    try:
        with run_server(data_dir, "--slots", "2", "--max-upload", str(1 << 20), "--limit-workspace", "4M") as srv:
            yield srv
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_huge_member_is_refused_before_its_data(small_server: RunningServer) -> None:
    info = tarfile.TarInfo("huge")
    info.size = 10 << 30  # the header says 10 GiB; none of it follows
    r = _upload(small_server, 0, info.tobuf(format=tarfile.PAX_FORMAT) + b"\0" * 4096)
    assert r.status_code == 413, r.text
    assert "huge" in r.json()["error"] and "limit" in r.json()["error"]
    assert _listing(_workspace(small_server, 0)) == {}


def test_bomb_is_refused(small_server: RunningServer) -> None:
    bomb = _tar([_file(f"zeros{i}", bytes(400_000)) for i in range(8)], "gzip")  # 3.2 MB in ~30 KB
    assert len(bomb) < 100_000
    r = _upload(small_server, 0, bomb)
    assert r.status_code == 413, r.text
    assert _listing(_workspace(small_server, 0)) == {}


def test_workspace_limit_bounds_an_upload(small_server: RunningServer) -> None:
    small_server.execute(1, "bash", command="head -c 3700000 /dev/zero > filler")
    r = _upload(small_server, 1, _tar([_file("more", bytes(600_000))]))
    assert r.status_code == 413, r.text
    small_server.execute(1, "bash", command="rm -f filler")
    assert _upload(small_server, 1, _tar([_file("more", bytes(600_000))])).status_code == 200


def test_pool_upload_and_download_tree(tmpdir_path: str) -> None:
    src = os.path.join(tmpdir_path, "src")
    os.makedirs(os.path.join(src, "pkg"))
    blob = os.urandom(3 << 20)
    with open(os.path.join(src, "pkg", "blob.bin"), "wb") as fh:
        fh.write(blob)
    os.symlink("pkg/blob.bin", os.path.join(src, "alias"))
    back = os.path.join(tmpdir_path, "back")

    async def scenario() -> None:
        async with SlotPool(SlotPoolConfig(slots_per_container=1, min_containers=1, max_containers=1)) as pool:
            slot = await pool.acquire("t")
            done = await pool.upload_tree(slot, src, "tree")
            assert (done.files, done.symlinks, done.bytes) == (1, 1, len(blob))
            result = await pool.execute(slot, "bash", {"command": "md5sum < tree/alias"})
            assert result.ok, result
            unpacked = await pool.download_tree(slot, "tree", back)
            assert unpacked.bytes == len(blob)
            with pytest.raises(InvalidToolCall, match="outside the workspace"):
                await pool.download_tree(slot, "..", back)
            with pytest.raises(ValueError, match="no such directory"):
                await pool.upload_tree(slot, os.path.join(tmpdir_path, "missing"), "x")

    asyncio.run(scenario())
    with open(os.path.join(back, "pkg", "blob.bin"), "rb") as fh:
        assert fh.read() == blob
    assert os.readlink(os.path.join(back, "alias")) == "pkg/blob.bin"
