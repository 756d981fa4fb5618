"""Hibernation on real servers (bubblewrap, and the hub where the network is `public`): an idle slot's
runner sleeps as a holder process, its link to the hub kept; the next call finds the same shell (cwd,
variables, functions, pid), what background jobs printed, the same routes and the same
confinement. A slot running anything else stays awake; a shell killed while asleep is reported;
reset, forks and transfers work on sleeping slots; a stopped server leaves nothing behind."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from atropos.host import snapshot, tree_members
from atropos.sandbox.runner.session import SESSION_RESTARTED
from atropos.sandbox.settings import ServerSettings
from atropos.slots import SlotPool, SlotPoolConfig
from tests.attacks import can_make_netns, connect_probe, egress_host, egress_probe, leaks, loopback_listener
from tests.faults import until_server_state
from tests.security_fixtures import temporary_server
from tests.server_process import RunningServer, alive, pids_with_arg, server_pastas

AFTER = "0.2"  # seconds of idleness before a slot sleeps, in these tests
HOLDER = "atropos-hold"  # the holder's $0 (atropos.sandbox.runner.hibernate)
REQUIRE_PUBLIC = os.environ.get("ATROPOS_REQUIRE_PUBLIC_NETWORK") == "1"


@pytest.fixture(scope="module", params=["bwrap", "none"])
def srv(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    options = ("--slots", "3", "--hibernate-after", AFTER, "--isolation", request.param)
    with temporary_server(f"atropos-test-hibernate-{request.param}-", *options) as s:
        yield s


def status(s: RunningServer) -> dict[str, object]:
    with s.client() as c:
        return dict(c.get("/status").json())


def asleep(s: RunningServer, slot: int) -> bool:
    activity = status(s)["slot_activity"]
    assert isinstance(activity, list)
    return bool(activity[slot]["asleep"])


def until_asleep(s: RunningServer, slot: int, want: bool = True, rounds: int = 200) -> bool:
    """The slot's state once it is `want` (polled: a state, not a timing assertion)."""
    for _ in range(rounds):
        if asleep(s, slot) == want:
            return want
        time.sleep(0.05)
    return asleep(s, slot)


def session(s: RunningServer, slot: int, command: str, **extra: object) -> dict[str, object]:
    return s.execute(slot, "bash_session", command=command, timeout=30, **extra)


def holders(s: RunningServer) -> list[int]:
    """Holder processes of this server's slots."""
    mine = tree_members(s.proc.pid, snapshot(), include_root=False)
    return [pid for pid in pids_with_arg(HOLDER) if pid in mine]


def test_an_idle_session_sleeps_and_wakes_with_its_shell(srv: RunningServer) -> None:
    first = session(srv, 0, "cd /tmp && export KEEP=42 && greet() { echo hi-$1; } && echo $$")
    assert until_asleep(srv, 0), status(srv)
    assert len(holders(srv)) >= 1  # the runner's process is now the small holder
    after = session(srv, 0, "pwd; echo $KEEP; greet you; echo $$")
    assert after["ok"] and after["stdout"] == f"/tmp\n42\nhi-you\n{first['stdout']}", after
    assert SESSION_RESTARTED not in str(after["output"])
    assert not asleep(srv, 0)  # awake right after its call
    # one snapshot: a slot may fall asleep again between two (AFTER is short)
    st = status(srv)
    activity = st["slot_activity"]
    assert isinstance(activity, list)
    assert st["hibernation"] == {"after_s": float(AFTER), "asleep": sum(bool(a["asleep"]) for a in activity)}, st


def test_status_shows_sleeping_slots(srv: RunningServer) -> None:
    session(srv, 2, "true")
    assert until_asleep(srv, 2)
    out = subprocess.run(
        [sys.executable, "-m", "atropos.cli", "status", srv.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ATROPOS_SANDBOX_TOKEN": srv.token},
    )
    assert out.returncode == 0, out.stderr
    assert f"hibernation after {AFTER}s idle" in out.stdout, out.stdout
    (line,) = [ln for ln in out.stdout.splitlines() if ln.split()[:1] == ["2"]]
    assert line.split()[1] == "asleep", out.stdout


def test_a_slot_running_anything_else_stays_awake(srv: RunningServer) -> None:
    session(srv, 1, "sleep 120 &")
    # many hibernation rounds pass (every 0.05 s here); a background job keeps the slot awake
    assert until_asleep(srv, 1, rounds=40) is False
    session(srv, 1, "kill %1; wait")
    assert until_asleep(srv, 1)


def test_what_background_jobs_printed_is_kept_while_asleep(srv: RunningServer) -> None:
    session(srv, 2, "{ sleep 0.3; echo printed-later; } &")
    assert until_asleep(srv, 2)  # after the job ended
    res = session(srv, 2, "echo now", read_background=True)
    assert res["stdout"] == "now\n" and "printed-later" in str(res["background"]), res


def test_a_shell_killed_while_asleep_is_reported(srv: RunningServer) -> None:
    session(srv, 0, "export GONE=1")
    assert until_asleep(srv, 0)
    procs = snapshot()
    shells = [p for h in holders(srv) for p in tree_members(h, procs, include_root=False)]
    assert shells, "a sleeping slot keeps its shell"
    for pid in shells:
        os.kill(pid, signal.SIGKILL)
    res = session(srv, 0, "echo ${GONE:-unset}")
    assert res["stdout"] == "unset\n" and SESSION_RESTARTED in str(res["output"]), res


def test_a_shell_killed_before_the_slot_fell_asleep_is_reported(srv: RunningServer) -> None:
    """The runner saw its shell die, then hibernated: the loss must outlive the sleep (seen in CI
    as a missing note when a pause between two calls let the slot fall asleep)."""
    session(srv, 1, "export GONE=1")
    assert srv.execute(1, "bash", command="pkill -KILL -f '__atropos_[m]ark'")["ok"]
    assert until_asleep(srv, 1)
    res = session(srv, 1, "echo ${GONE:-unset}")
    assert res["stdout"] == "unset\n" and SESSION_RESTARTED in str(res["output"]), res


def test_reset_of_a_sleeping_slot_empties_it(srv: RunningServer) -> None:
    session(srv, 1, "echo data > kept.txt; export V=1")
    assert until_asleep(srv, 1)
    with srv.client() as c:
        r = c.post("/reset", json={"slot": 1})
    assert r.status_code == 200, r.text
    res = session(srv, 1, "ls -A; echo ${V:-unset}")
    assert res["stdout"] == "unset\n", res


def test_a_sleeping_fork_is_downloaded_and_snapshotted_through_its_view(srv: RunningServer) -> None:
    session(srv, 2, "echo base > base.txt")
    with srv.client() as c:
        assert c.post("/snapshot", json={"slot": 2, "name": "hb-base"}).status_code == 200
        assert c.post("/fork", json={"snapshot": "hb-base", "slots": [1]}).status_code == 200
        session(srv, 1, "echo mine > mine.txt")
        assert until_asleep(srv, 1)
        r = c.get("/download", params={"slot": 1, "path": ".", "compression": "none"})
        assert r.status_code == 200, r.text
        names = {m.name.removeprefix("./") for m in tarfile.open(fileobj=io.BytesIO(r.content)).getmembers()}
        assert {"base.txt", "mine.txt"} <= names, names
        assert until_asleep(srv, 1)
        assert c.post("/snapshot", json={"slot": 1, "name": "hb-fork"}).status_code == 200
        c.post("/reset", json={"slot": 1})
        for name in ("hb-fork", "hb-base"):
            c.delete(f"/snapshots/{name}")


def test_network_after_waking_is_the_network_before_sleeping() -> None:
    """Routes identical, the test host reached again, the node's loopback and subnets still not."""
    if not REQUIRE_PUBLIC and os.system("command -v pasta >/dev/null") != 0:
        pytest.skip("no pasta here (Debian package passt)")
    if not can_make_netns():
        pytest.skip("needs root and `ip netns` to make a test host")
    with (
        egress_host() as host,
        temporary_server("atropos-test-hibernate-net-", "--slots", "1", "--hibernate-after", AFTER) as s,
        loopback_listener() as port,
    ):
        assert httpx.get(s.url + "/health", timeout=10).json()["network"] == "public"
        probe = egress_probe(host) + "\n" + connect_probe([("127.0.0.1", port)])
        before = session(s, 0, "ip -4 route; ip -4 -o addr show eth0 | tr -s ' ' | cut -d' ' -f4")
        assert "EGRESS-OK" in str(session(s, 0, probe)["output"])
        pastas = server_pastas(s.proc.pid)
        assert until_asleep(s, 0)
        assert server_pastas(s.proc.pid) == pastas  # the server's hub's pasta: a sleeping slot has none to stop
        after = session(s, 0, "ip -4 route; ip -4 -o addr show eth0 | tr -s ' ' | cut -d' ' -f4")
        assert after["stdout"] == before["stdout"] and "prohibit 10.0.0.0/8" in str(after["stdout"]), after
        assert until_asleep(s, 0)
        out = str(session(s, 0, probe)["output"])
        assert "EGRESS-OK" in out and leaks(out) == [], out


def test_calls_that_arrive_as_a_slot_falls_asleep_are_never_lost() -> None:
    """Two clients call one slot with gaps around the hibernation delay: every call is answered,
    by the same shell, whether it met the slot awake, falling asleep or asleep."""
    rng = random.Random(7)
    gaps = [[rng.uniform(0.0, 0.12) for _ in range(40)] for _ in range(2)]
    with temporary_server("atropos-test-hibernate-race-", "--slots", "1", "--hibernate-after", "0.05") as s:
        shell = session(s, 0, "echo $$")["stdout"]
        answers: list[list[dict[str, object]]] = [[], []]

        def client(n: int) -> None:
            for i, gap in enumerate(gaps[n]):
                time.sleep(gap)
                answers[n].append(session(s, 0, f"echo {n}-{i} $$"))

        threads = [threading.Thread(target=client, args=(n,)) for n in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for n in (0, 1):
            assert [a["stdout"] for a in answers[n]] == [f"{n}-{i} {shell}" for i in range(40)], answers[n]
        slept = [line for line in _log_lines(s) if "event=hibernated" in line]
        assert len(slept) > 5, "the gaps let the slot fall asleep many times"


def _log_lines(s: RunningServer) -> list[str]:
    s.proc.send_signal(signal.SIGTERM)
    _, err = s.proc.communicate(timeout=30)
    return err.splitlines()


def test_a_stopped_server_leaves_no_sleeping_slot_behind() -> None:
    with temporary_server("atropos-test-hibernate-stop-", "--slots", "2", "--hibernate-after", AFTER) as s:
        for slot in (0, 1):
            session(s, slot, "true")
        for slot in (0, 1):
            assert until_asleep(s, slot)
        held = holders(s)
        assert len(held) == 2
        members = tree_members(s.proc.pid, snapshot(), include_root=False)
    left = [pid for pid in members if os.path.exists(f"/proc/{pid}") and alive(pid)]
    assert left == [] and all(not alive(pid) for pid in held), left


async def test_a_pool_sets_hibernation_and_its_calls_wake_slots() -> None:
    config = SlotPoolConfig(slots_per_container=2, min_containers=1, max_containers=1, hibernate_after=float(AFTER))
    async with SlotPool(config) as pool, pool.slot("hb") as slot:
        first = await pool.execute(slot, "bash_session", {"command": "cd /tmp; echo $$"})
        want = {"after_s": float(AFTER), "asleep": 1}
        assert (state := await until_server_state(pool, "hibernation", want)) == want, state
        again = await pool.execute(slot, "bash_session", {"command": "pwd; echo $$"})
        assert again.stdout == "/tmp\n" + first.stdout, again


def test_a_negative_hibernation_delay_is_refused() -> None:
    with pytest.raises(ValueError, match="hibernate_after"):
        SlotPoolConfig(hibernate_after=-1)
    with pytest.raises(ValueError, match="hibernate_after"):
        ServerSettings.from_args(["--hibernate-after", "-1"])
    assert "--hibernate-after" not in SlotPoolConfig().server_spec().settings.to_args()  # the server's default
    args = SlotPoolConfig(hibernate_after=0).server_spec().settings.to_args()
    assert args[args.index("--hibernate-after") + 1] == "0.0"
