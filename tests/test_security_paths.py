"""Path confinement of read_file/write_file under fuzzing and under a concurrent symlink swapper.

The file functions run in-process against a workspace that sits next to "outside" sentinels (files
holding a marker, a directory, a look-alike sibling `<workspace>foo`). Whatever the path, whatever
symlinks the generated layout plants (in, out, dangling, chains, loops, absolute, via /workspace),
no read may return the marker and no write or reset may change anything outside the workspace.

ATROPOS_FUZZ_EXAMPLES sets the examples per fuzz test (CI default below); the figures of each run
are printed at the end (`pytest -s`) and written to `security-paths-report.json` in pytest's basetemp.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import secrets
import stat
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atropos.sandbox.runner.files import empty_dir, read_file, write_file
from atropos.sandbox.runner.pathsafe import WORKSPACE_ALIAS
from atropos.sandbox.runner.protocol import Outcome, ReadFileOp, WriteFileOp

EXAMPLES = int(os.environ.get("ATROPOS_FUZZ_EXAMPLES", "1500"))


def read_(root: str, args: dict[str, object], limit: int) -> Outcome:
    """read_file with the runner's request built from the tool's arguments (defaults filled in)."""
    op = ReadFileOp(
        op="read_file",
        path=str(args["path"]),
        encoding=args.get("encoding", "text"),
        max_bytes=args.get("max_bytes"),
        timeout=60.0,
    )
    return read_file(root, op, limit)


def write_(root: str, args: dict[str, object], limit: int) -> Outcome:
    """write_file with the runner's request built from the tool's arguments (defaults filled in)."""
    op = WriteFileOp(
        op="write_file",
        path=str(args["path"]),
        content=args.get("content", ""),
        encoding=args.get("encoding", "text"),
        mode=args.get("mode"),
        timeout=60.0,
    )
    return write_file(root, op, limit)


LIMIT = 1 << 16
MARKER = "OUTSIDE-" + secrets.token_hex(8)
FIGURES: Counter[str] = Counter()

# a larger run (ATROPOS_FUZZ_EXAMPLES) gets the time it needs: ~15 ms per example on a busy 2-CPU box
FUZZ_TIMEOUT = pytest.mark.timeout(max(120, EXAMPLES * 0.03))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


@dataclass(frozen=True)
class Arena:
    """<top>/ws is the workspace; everything else under <top> is outside and must never change."""

    top: str

    @property
    def ws(self) -> str:
        return os.path.join(self.top, "ws")

    @property
    def outside(self) -> str:
        return os.path.join(self.top, "outside")


def make_arena(top: str) -> Arena:
    arena = Arena(top)
    os.makedirs(os.path.join(arena.outside, "sub"))
    os.makedirs(os.path.join(arena.outside, "emptydir"))
    os.makedirs(arena.ws)
    os.makedirs(arena.ws + "foo")  # the `/workspacefoo` of the host path
    os.makedirs(os.path.join(arena.outside, "e"))  # mirrors the workspace's d/e: an escape would find files
    for path in (
        "secret.txt",
        "outside/secret.txt",
        "outside/f.txt",
        "outside/a.txt",
        "outside/e/f.txt",
        "outside/sub/secret.txt",
        "wsfoo/f.txt",
    ):
        Path(top, path).write_text(f"{MARKER} {path}")
    return arena


def snapshot_outside(arena: Arena) -> dict[str, tuple[int, int, str]]:
    """Every entry under the arena but the workspace: (mode, mtime_ns, content or link target)."""
    found: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(arena.top):
        if dirpath == arena.top:
            dirnames.remove("ws")
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            if stat.S_ISLNK(st_.st_mode):
                body = os.readlink(path)
            elif stat.S_ISREG(st_.st_mode):
                body = Path(path).read_text()
            else:
                body = ""
            found[os.path.relpath(path, arena.top)] = (st_.st_mode, st_.st_mtime_ns, body)
    return found


def plant_base_tree(ws: str) -> None:
    os.makedirs(os.path.join(ws, "d", "e"))
    Path(ws, "a.txt").write_text("INSIDE a")
    Path(ws, "d", "e", "f.txt").write_text("INSIDE f")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Counter[str]]:
    yield FIGURES
    out = tmp_path_factory.getbasetemp() / "security-paths-report.json"
    out.write_text(json.dumps({"examples_per_fuzz_test": EXAMPLES, **FIGURES}, indent=1))
    print(f"\nsecurity paths fuzz: {dict(FIGURES)} (examples per fuzz test {EXAMPLES}; report {out})")


@pytest.fixture
def arena(tmp_path: Path) -> Arena:
    return make_arena(str(tmp_path))


# ---------------------------------------------------------------- generated paths and layouts

NAMES = [
    "a.txt",
    "d",
    "e",
    "f.txt",
    "new",
    "L1",
    "L2",
    "L3",
    "loop",
    "workspace",
    "workspacefoo",
    "ws",
    "wsfoo",
    "outside",
    "secret.txt",
    "sub",
    "..",
    ".",
    "",
    "...",
    " ",
    "~",
    "$HOME",
    "*",
    "\\",
    "%2e%2e",
]


def path_prefixes(arena: Arena) -> list[str]:
    real = os.path.realpath(arena.ws)
    return [
        "",
        "/",
        "//",
        "./",
        "../",
        "/workspace",
        "/workspace/",
        "/workspacefoo/",
        "/workspace/../",
        "/workspace/./",
        "//workspace//",
        "/workspace/..",
        "/./workspace/",
        real + "/",
        real + "foo/",
        real,
        real + "/../",
        os.path.realpath(arena.top) + "/",
        arena.outside + "/",
        "/etc/",
        "/proc/self/root/",
        "/proc/self/cwd/",
        "/dev/fd/",
    ]


def components() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(NAMES),
        st.sampled_from(["d", "e", "f.txt", "a.txt", "L1", "L2", "L3", "..", "new"]),  # often lands inside
        st.text(min_size=1, max_size=12),
        st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=6),
        st.text(alphabet="x", min_size=250, max_size=300),  # at and past NAME_MAX
        st.just("\x00"),
        st.just("a\x00b"),
        st.just("\ud800"),
        st.just("é" * 130),
    )


@st.composite
def tool_paths(draw: st.DrawFn, arena: Arena) -> str:
    prefix = draw(st.sampled_from(path_prefixes(arena)))
    parts = draw(st.lists(components(), min_size=0, max_size=8))
    path = prefix + "/".join(parts)
    if draw(st.integers(0, 40)) == 0:
        path = path + "/x" * 2100  # past PATH_MAX
    return path


@st.composite
def link_targets(draw: st.DrawFn, arena: Arena) -> str:
    fixed = [
        arena.outside,
        arena.outside + "/secret.txt",
        arena.top + "/secret.txt",
        arena.ws + "foo",
        arena.ws + "/../outside",
        arena.ws + "/../secret.txt",
        arena.ws,
        arena.ws + "/d",
        arena.outside + "/nope",
        arena.outside + "/newdir/x",
        "/workspace/d",
        "/workspace/../outside",
        "/workspace/d/e/f.txt",
        "/workspacefoo",
        "../outside",
        "../secret.txt",
        "../../",
        "..",
        ".",
        "d",
        "d/e",
        "d/e/f.txt",
        "L1",
        "L2",
        "L3",
        "loop",
        "nope",
        "new/dir",
        "/",
        "/etc",
        "/proc/self/root",
        "d/../..",
        "./L2/..",
        "d/e/../../../outside/sub",
    ]
    return draw(st.one_of(st.sampled_from(fixed), tool_paths(arena)))


@st.composite
def layouts(draw: st.DrawFn, arena: Arena) -> list[tuple[str, str]]:
    names = st.sampled_from(["L1", "L2", "L3", "loop", "d/L4", "d/e/L5", "new", "outside", "workspace"])
    return draw(st.lists(st.tuples(names, link_targets(arena)), max_size=6, unique_by=lambda pair: pair[0]))


def plant_layout(arena: Arena, links: list[tuple[str, str]]) -> None:
    empty_dir(arena.ws)  # the reset under test too: it must not follow the links of the last example
    plant_base_tree(arena.ws)
    for name, target in links:
        if "\x00" in target:
            continue
        try:
            os.symlink(target, os.path.join(arena.ws, name))
        except (OSError, UnicodeEncodeError):
            FIGURES["layout_links_not_plantable"] += 1


# ---------------------------------------------------------------- oracles


def inside_contents(ws: str) -> set[str]:
    found = set()
    for dirpath, _dirs, files in os.walk(ws):
        for name in files:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                found.add(Path(path).read_bytes().decode(errors="replace"))
    return found


def check_read(arena: Arena, path: str, encoding: str) -> None:
    res = read_(arena.ws, {"path": path, "encoding": encoding}, LIMIT)
    FIGURES["paths_tried"] += 1
    FIGURES["reads_ok" if res["ok"] else "reads_refused"] += 1
    text = str(res.get("output", "")) + str(res.get("error", ""))
    if res["ok"] and encoding == "base64":
        text = base64.b64decode(str(res["output"])).decode(errors="replace")
    assert MARKER not in text, (path, res)
    if res["ok"]:
        assert text in inside_contents(arena.ws), (path, res)
    else:
        assert res["error"], (path, res)


def check_write(arena: Arena, path: str, encoding: str, mode: int | None) -> None:
    content = "WRITTEN-" + secrets.token_hex(6)
    payload = base64.b64encode(content.encode()).decode() if encoding == "base64" else content
    args: dict[str, object] = {"path": path, "content": payload, "encoding": encoding}
    if mode is not None:
        args["mode"] = mode
    res = write_(arena.ws, args, LIMIT)
    FIGURES["paths_tried"] += 1
    FIGURES["writes_ok" if res["ok"] else "writes_refused"] += 1
    if res["ok"]:
        assert content in inside_contents(arena.ws), (path, res)  # it landed inside, not elsewhere
    else:
        assert res["error"], (path, res)


def check_paths(arena: Arena, paths: list[str], encoding: str, mode: int | None) -> None:
    before = snapshot_outside(arena)
    for path in paths:
        check_read(arena, path, encoding)
        check_write(arena, path, encoding, mode)
        if path.startswith(WORKSPACE_ALIAS) and "\x00" not in path:
            check_read(arena, path.replace(WORKSPACE_ALIAS, os.path.realpath(arena.ws), 1), encoding)
    assert snapshot_outside(arena) == before
    FIGURES["examples"] += 1


# ---------------------------------------------------------------- the fuzz tests


@FUZZ_TIMEOUT
def test_fuzz_generated_paths_and_symlink_layouts(
    tmp_path_factory: pytest.TempPathFactory, report: Counter[str]
) -> None:
    arena = make_arena(str(tmp_path_factory.mktemp("arena")))

    @FUZZ
    @given(
        links=layouts(arena),
        paths=st.lists(tool_paths(arena), min_size=1, max_size=6),
        encoding=st.sampled_from(["text", "base64"]),
        mode=st.sampled_from([None, 0o600, 0o755, 0o4777]),
    )
    def run(links: list[tuple[str, str]], paths: list[str], encoding: str, mode: int | None) -> None:
        plant_layout(arena, links)
        check_paths(arena, paths + [name for name, _ in links], encoding, mode)

    run()
    empty_dir(arena.ws)
    assert os.listdir(arena.ws) == []


@FUZZ_TIMEOUT
def test_fuzz_paths_through_every_kind_of_link(tmp_path_factory: pytest.TempPathFactory, report: Counter[str]) -> None:
    """One fixed layout holding each kind of link; generated paths walk through them."""
    arena = make_arena(str(tmp_path_factory.mktemp("arena")))
    links = [
        ("L1", "d/e"),
        ("L2", "L1"),
        ("L3", "/workspace/d/e"),
        ("loop", "loop"),
        ("d/L4", "../../outside"),
        ("d/e/L5", arena.outside),
        ("new", arena.outside + "/newdir"),
        ("outside", "L4/../.."),
        ("workspace", "d/L4/sub"),
    ]

    @FUZZ
    @given(paths=st.lists(tool_paths(arena), min_size=1, max_size=8), encoding=st.sampled_from(["text", "base64"]))
    def run(paths: list[str], encoding: str) -> None:
        plant_layout(arena, links)
        check_paths(arena, paths, encoding, None)

    run()


@settings(max_examples=max(200, EXAMPLES // 4), deadline=None, database=None)
@given(parts=st.lists(st.sampled_from(["d", "e", ".", "..", "L1", "L3"]), max_size=8), alias=st.booleans())
def test_paths_that_stay_inside_still_work(parts: list[str], alias: bool) -> None:
    """The walk is not a blanket refusal: inside paths (through inside links too) read the right file."""
    with tempfile.TemporaryDirectory() as tmp:
        arena = make_arena(tmp)
        plant_base_tree(arena.ws)
        os.symlink("d/e", os.path.join(arena.ws, "L1"))
        os.symlink("/workspace/d/e", os.path.join(arena.ws, "L3"))
        rel = "/".join([*parts, "f.txt"])
        res = read_(arena.ws, {"path": ("/workspace/" if alias else "") + rel}, LIMIT)
        FIGURES["paths_tried"] += 1
        expected = os.path.join(arena.ws, rel.replace("L3", "L1"))
        try:
            want = Path(expected).read_text()
        except OSError:  # the kernel's own walk says there is no such file
            assert res["ok"] is False
            return
        if res["ok"] is False:  # only refusal allowed: a lexical climb above the root
            assert "outside the workspace" in str(res["error"]), res
            return
        assert res["output"] == want


def test_documented_refusals_name_the_reason(arena: Arena) -> None:
    plant_base_tree(arena.ws)
    os.symlink(arena.outside, os.path.join(arena.ws, "out"))
    os.symlink(arena.outside + "/missing", os.path.join(arena.ws, "dangling"))
    os.symlink("hop2", os.path.join(arena.ws, "hop1"))
    os.symlink("out", os.path.join(arena.ws, "hop2"))
    os.symlink("loop", os.path.join(arena.ws, "loop"))
    cases = {
        "out/secret.txt": "outside the workspace",
        "dangling": "outside the workspace",
        "hop1/f.txt": "outside the workspace",
        "../secret.txt": "outside the workspace",
        "/workspacefoo/f.txt": "outside the workspace",
        "a\x00b": "NUL",
        "x" * 256: "too long",
        "y/" * 2100: "too long",
        "loop": "too many levels of symbolic links",
        "d": "is a directory",
    }
    for path, needle in cases.items():
        for res in (
            read_(arena.ws, {"path": path}, LIMIT),
            write_(arena.ws, {"path": path, "content": "x"}, LIMIT),
        ):
            assert res["ok"] is False and needle in str(res["error"]), (path, res)


def test_inside_semantics_are_kept(arena: Arena) -> None:
    plant_base_tree(arena.ws)
    os.symlink("/workspace/d", os.path.join(arena.ws, "abs"))
    os.symlink("d/e/new.txt", os.path.join(arena.ws, "dangling-in"))
    ws = arena.ws
    assert write_(ws, {"path": "/workspace/p/q/r.sh", "content": "#!/bin/sh\n", "mode": 0o755}, LIMIT)["ok"]
    assert stat.S_IMODE(os.stat(os.path.join(ws, "p/q/r.sh")).st_mode) == 0o755
    assert write_(ws, {"path": "dangling-in", "content": "via link"}, LIMIT)["ok"]
    assert Path(ws, "d/e/new.txt").read_text() == "via link"
    assert read_(ws, {"path": "abs/e/f.txt"}, LIMIT)["output"] == "INSIDE f"
    assert read_(ws, {"path": os.path.join(ws, "a.txt")}, LIMIT)["output"] == "INSIDE a"
    raw = base64.b64encode(b"\x00\xff").decode()
    assert write_(ws, {"path": "bin", "content": raw, "encoding": "base64"}, LIMIT)["ok"]
    assert read_(ws, {"path": "bin", "encoding": "base64"}, LIMIT)["output"] == raw
    assert "not UTF-8" in str(read_(ws, {"path": "bin"}, LIMIT)["error"])


def test_fifo_is_refused_without_hanging(arena: Arena) -> None:
    os.mkfifo(os.path.join(arena.ws, "fifo"))
    assert "not a regular file" in str(read_(arena.ws, {"path": "fifo"}, LIMIT)["error"])
    assert write_(arena.ws, {"path": "fifo", "content": "x"}, LIMIT)["ok"] is False


def test_reset_does_not_follow_links_out_even_in_locked_dirs(arena: Arena) -> None:
    """An agent's `chmod 000` dir holding links out: the reset unlocks by fd and chmods nothing outside."""
    os.chmod(arena.outside, 0o755)
    locked = os.path.join(arena.ws, "locked", "inner")
    os.makedirs(locked)
    os.symlink(arena.outside, os.path.join(arena.ws, "locked", "link"))
    os.symlink(arena.outside, os.path.join(locked, "link"))
    os.chmod(locked, 0)
    os.chmod(os.path.dirname(locked), 0o500)
    before = snapshot_outside(arena)
    empty_dir(arena.ws)
    assert os.listdir(arena.ws) == [] and snapshot_outside(arena) == before
    assert stat.S_IMODE(os.stat(arena.outside).st_mode) == 0o755


# ---------------------------------------------------------------- the race

SWAPPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2
pairs = [(a.encode(), b.encode()) for a, b in zip(sys.argv[1::2], sys.argv[2::2])]
swaps = 0
sys.stdout.write("ready\n"); sys.stdout.flush()
while not os.path.exists(pairs[0][0] + b".stop"):
    for a, b in pairs:
        if libc.renameat2(-100, a, -100, b, RENAME_EXCHANGE) != 0:
            sys.exit(f"renameat2: {os.strerror(ctypes.get_errno())}")
        swaps += 1
print(swaps)
"""

RACE_MIN_OUTCOMES = 200
RACE_MAX_ROUNDS = 20_000


def renameat2_available() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return hasattr(libc, "renameat2")


def plant_race(arena: Arena) -> list[str]:
    """Pairs the swapper exchanges: a directory with a link to outside, a file with a link to a secret."""
    ws = arena.ws
    plant_base_tree(ws)
    Path(ws, "d", "f.txt").write_text("INSIDE d/f")
    os.symlink(arena.outside, os.path.join(ws, "dswap"))
    os.symlink(arena.outside + "/a.txt", os.path.join(ws, "aswap"))
    return [os.path.join(ws, "d"), os.path.join(ws, "dswap"), os.path.join(ws, "a.txt"), os.path.join(ws, "aswap")]


def race_round(arena: Arena, outcomes: Counter[str]) -> None:
    for path in ("d/f.txt", "d/e/f.txt", "dswap/e/f.txt", "a.txt", "/workspace/d/e/f.txt"):
        res = read_(arena.ws, {"path": path}, LIMIT)
        assert MARKER not in str(res.get("output", "")), (path, res)
        outcomes["read_ok" if res["ok"] else "read_refused"] += 1
    for path in ("d/new.txt", "d/e/f.txt", "d/made/deeper/x.txt", "a.txt"):
        res = write_(arena.ws, {"path": path, "content": "RACED"}, LIMIT)
        outcomes["write_ok" if res["ok"] else "write_refused"] += 1
    outcomes["rounds"] += 1


def run_race(arena: Arena) -> Counter[str]:
    pairs = plant_race(arena)
    before = snapshot_outside(arena)
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, *pairs], stdout=subprocess.PIPE, text=True)
    assert swapper.stdout is not None and swapper.stdout.readline() == "ready\n"
    outcomes: Counter[str] = Counter()
    try:
        while (
            outcomes["rounds"] < RACE_MAX_ROUNDS
            and min(outcomes["read_ok"], outcomes["read_refused"], outcomes["write_ok"], outcomes["write_refused"])
            < RACE_MIN_OUTCOMES
        ):
            race_round(arena, outcomes)
            assert swapper.poll() is None, "the swapper died"
    finally:
        Path(pairs[0] + ".stop").touch()
        out, _ = swapper.communicate(timeout=30)
    outcomes["swaps"] = int(out.strip() or 0)
    assert snapshot_outside(arena) == before
    return outcomes


@pytest.mark.skipif(not renameat2_available(), reason="libc has no renameat2 (RENAME_EXCHANGE)")
def test_concurrent_symlink_swaps_never_reach_outside(arena: Arena, report: Counter[str]) -> None:
    """A process keeps exchanging a directory (and a file) of the workspace with a link to outside."""
    outcomes = run_race(arena)
    FIGURES.update({f"race_{key}": value for key, value in outcomes.items()})
    FIGURES["paths_tried"] += 9 * outcomes["rounds"]
    # the swapper did race us: both the inside file and a refusal of the link were seen
    assert outcomes["swaps"] > 0 and outcomes["read_ok"] > 0 and outcomes["read_refused"] > 0, outcomes


def test_race_swapper_really_exchanges(arena: Arena) -> None:
    """The swapper's primitive works here (else the race test would prove nothing)."""
    plant_base_tree(arena.ws)
    os.symlink(arena.outside, os.path.join(arena.ws, "dswap"))
    libc = ctypes.CDLL(None, use_errno=True)
    d, swap = (os.path.join(arena.ws, name).encode() for name in ("d", "dswap"))
    if libc.renameat2(-100, d, -100, swap, 2) != 0:
        pytest.skip(f"renameat2: {os.strerror(ctypes.get_errno())}")
    assert os.path.islink(os.path.join(arena.ws, "d")) and os.path.isdir(os.path.join(arena.ws, "dswap"))
