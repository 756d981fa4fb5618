"""The docker driver against a real Docker engine: a pool on the local backend starts the image the
way users run it, and a slot attacks its neighbour, the server and the node from inside a real
container.

Needs a running engine and the image named by $ATROPOS_TEST_DOCKER_IMAGE (default
atropos-sandbox:latest, built by scripts/build-image.sh). Skipped with the reason when either is
missing, except where $ATROPOS_REQUIRE_DOCKER=1 (CI), where that is a failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator

import pytest

from atropos.slots import Slot, SlotPool, SlotPoolConfig
from tests.attacks import (
    attack_script,
    can_make_netns,
    connect_probe,
    egress_host,
    egress_probe,
    file_probe,
    host_uid,
    leaks,
    token_probe,
)
from tests.faults import until_server_state
from tests.fs_attacks import attack_through_pool, leaked
from tests.server_process import pids_with_arg, wait_for_pids

pytestmark = pytest.mark.docker

IMAGE = os.environ.get("ATROPOS_TEST_DOCKER_IMAGE", "atropos-sandbox:latest")
REQUIRED = os.environ.get("ATROPOS_REQUIRE_DOCKER") == "1"


def _missing() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False).returncode != 0:
        return "no running Docker engine"
    if (
        subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, timeout=30, check=False).returncode
        != 0
    ):
        return f"no image {IMAGE} (scripts/build-image.sh -t {IMAGE})"
    return None


@pytest.fixture(scope="module")
def engine() -> None:
    missing = _missing()
    if missing and REQUIRED:
        pytest.fail(f"ATROPOS_REQUIRE_DOCKER=1 but {missing}")
    if missing:
        pytest.skip(missing)


@pytest.fixture
async def pool(engine: None) -> AsyncIterator[SlotPool]:
    config = SlotPoolConfig(
        driver={"type": "docker", "image": IMAGE},
        slots_per_container=2,
        min_containers=1,
        max_containers=1,
        start_timeout=120,
    )
    async with SlotPool(config) as p:
        yield p


async def two_slots(pool: SlotPool) -> tuple[Slot, Slot]:
    a = await pool.acquire("victim")
    b = await pool.acquire("attacker")
    assert a.server_id == b.server_id and a.index != b.index
    return a, b


async def run(pool: SlotPool, slot: Slot, command: str) -> str:
    return (await pool.execute(slot, "bash", {"command": command}, timeout=60)).output


async def test_health_says_bwrap_public_and_an_unprivileged_uid(pool: SlotPool) -> None:
    a, _ = await two_slots(pool)
    h = await pool.server_health(a)
    assert h["isolation"] == "bwrap", h
    assert h["network"] == ("public" if os.path.exists("/dev/net/tun") else "deny"), h
    assert h["uid"] != 0


async def test_slot_runs_unprivileged_and_cannot_reach_its_neighbour(pool: SlotPool) -> None:
    a, b = await two_slots(pool)
    marker = f"5555.{secrets.randbelow(10**9):09d}"
    needle = secrets.token_hex(12)
    await pool.execute(a, "write_file", {"path": "secret.txt", "content": needle})
    await run(pool, a, f"setsid sleep {marker} >/dev/null 2>&1 &")
    assert wait_for_pids(marker, 1) == 1
    victim = pids_with_arg(marker)[0]
    assert host_uid(victim) != 0  # as the node sees it
    assert (await run(pool, b, "id -u")).strip() != "0"
    paths = [
        f"../{a.index}/secret.txt",
        f"/data/slots/{a.index}/secret.txt",
        "/data/slots/*/secret.txt",
        "/proc/[0-9]*/cwd/secret.txt",
        "/proc/[0-9]*/root/workspace/secret.txt",
    ]
    assert leaks(await run(pool, b, file_probe(paths, needle))) == []
    out = await run(pool, b, attack_script(victim))
    assert "ATTACK-" not in out, out
    assert marker not in await run(pool, b, "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '")
    assert "sleep" in await run(pool, a, f"pgrep -af 'sleep {marker}' || echo gone")
    token = pool.server_of(b).token
    assert leaks(await run(pool, b, token_probe(token))) == []
    await run(pool, a, f"pkill -f 'sleep {marker}'")


async def test_a_slot_finds_nothing_of_its_neighbours_the_server_or_the_node(pool: SlotPool) -> None:
    # the container's root minus what Docker mounted (/data) and the server's package and virtualenv
    found, out = await attack_through_pool(pool, [], seen_as="/data")
    assert leaked(out) == [], out
    a, _ = await two_slots(pool)
    assert (await pool.server_health(a))["root"] == "image"
    # the image's package and virtualenv are where the attack looked, and hidden there
    shown = await run(pool, a, "ls -A /opt/atropos-sandbox")
    assert shown == "" and found.guessed_paths(), shown


async def test_slot_cannot_reach_the_servers_port_or_loopback(pool: SlotPool) -> None:
    _, b = await two_slots(pool)
    # the server listens on 0.0.0.0:8080 inside the container; a listener of the slot's own is
    # started first, so the probe is shown to connect where something listens
    out = await run(
        pool,
        b,
        'python3 -c \'import socket,time; s=socket.socket(); s.bind(("127.0.0.1", 7777)); '
        "s.listen(); time.sleep(30)' & sleep 0.5\n" + connect_probe([("127.0.0.1", 8080), ("127.0.0.1", 7777)]),
    )
    assert leaks(out) == ["127.0.0.1:7777"], out


@pytest.mark.skipif(not can_make_netns(), reason="needs root and `ip netns` to make a test host")
async def test_slot_reaches_a_public_host_and_nothing_private(pool: SlotPool) -> None:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun: the server runs with network deny")
    _, b = await two_slots(pool)
    with egress_host() as host:
        deadline = time.monotonic() + 10
        out = ""
        while time.monotonic() < deadline and "EGRESS-OK" not in out:
            out = await run(pool, b, egress_probe(host))
        assert "EGRESS-OK" in out, out
        # private ranges are prohibited inside the slot's namespace: `ip route get` answers without
        # sending anything (no probe ever goes to a private address outside our namespaces)
        out = await run(pool, b, "ip route get 10.0.0.1 2>&1; ip route get 192.168.1.1 2>&1; true")
        assert out.count("prohibit") == 2 or out.count("ermission denied") == 2, out


@pytest.mark.skipif(not can_make_netns(), reason="needs root and `ip netns` to make a test host")
async def test_a_slot_that_slept_in_the_container_has_its_shell_and_its_confined_network(engine: None) -> None:
    """Hibernation in the image: the runner sleeps as a holder inside the container (its link to the
    hub stays); the next call finds the same shell, the public host again, and the private ranges still refused."""
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun: the server runs with network deny")
    config = SlotPoolConfig.model_validate(
        {
            "driver": {"type": "docker", "image": IMAGE},
            "slots_per_container": 1,
            "min_containers": 1,
            "max_containers": 1,
            "start_timeout": 120,
            "hibernate_after": 0.3,
        }
    )
    async with SlotPool(config) as p, p.slot("sleeper") as slot:
        first = await p.execute(slot, "bash_session", {"command": "cd /tmp && export KEPT=7 && echo $$"})
        want = {"after_s": 0.3, "asleep": 1}
        assert (state := await until_server_state(p, "hibernation", want)) == want, state
        with egress_host() as host:
            woke = await p.execute(
                slot,
                "bash_session",
                {"command": "pwd; echo $KEPT $$; " + egress_probe(host) + "\nip route get 10.0.0.1 2>&1; true"},
            )
        assert woke.stdout.startswith(f"/tmp\n7 {first.stdout}"), woke
        assert "EGRESS-OK" in woke.stdout and ("prohibit" in woke.stdout or "ermission denied" in woke.stdout), woke


async def test_a_slot_in_a_task_image_inside_the_container_keeps_to_itself(engine: None) -> None:
    """Image slots inside the docker driver: the task image's archive reaches the server through a
    declared bind; two slots of the image keep their writes apart, and the attack suite finds nothing."""
    from tests.images_fixtures import BASE_IMAGE

    where = tempfile.mkdtemp(prefix="atropos-task-archive-", dir="/var/tmp")  # not /tmp: every slot has its own
    os.chmod(where, 0o755)
    archive = os.path.join(where, "base.tar")
    subprocess.run(["docker", "save", "-o", archive, BASE_IMAGE], check=True)
    os.chmod(archive, 0o644)
    config = SlotPoolConfig(
        driver={"type": "docker", "image": IMAGE},
        slots_per_container=2,
        min_containers=1,
        max_containers=1,
        start_timeout=120,
        bind_ro=[where],
    )
    image = f"docker-archive:{archive}"
    try:
        _, out = await _attack_image_slots(config, image)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    assert leaked(out) == [], out


async def _attack_image_slots(config: SlotPoolConfig, image: str) -> tuple[object, str]:
    async with SlotPool(config) as pool:
        probe = await pool.acquire("probe")
        health = await pool.server_health(probe)
        pool.release(probe)
        if health["fork"] != "overlay":
            pytest.skip(f"no overlay in a slot in this container: {health['fork_reason']}")
        a1 = await pool.acquire("a1", image=image)
        a2 = await pool.acquire("a2", image=image)
        assert await run(pool, a1, "echo changed > /etc/debian_version; cat /etc/debian_version") == "changed\n"
        assert (await run(pool, a2, "cat /etc/debian_version")).startswith("12.")
        pool.release(a1)
        pool.release(a2)
        return await attack_through_pool(pool, [], seen_as="/data", image=image)
