"""Slots in their task's own image (POST /image, `pool.acquire(image=...)`), on a real local pool
with bubblewrap: two task images built by the real Docker engine, given to the server as
`docker save` archives (the server, unprivileged, has no access to the engine)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from atropos.errors import InvalidToolCall, SlotFailed
from atropos.sandbox.server.isolation import choose_bwrap
from atropos.slots import Slot, SlotPool, SlotPoolConfig
from tests.faults import wait_for
from tests.fs_attacks import attack_through_pool, leaked
from tests.images_fixtures import docker_unready, write_sif
from tests.registry_standin import serving

if TYPE_CHECKING:
    from tests.images_fixtures import TaskImages

pytestmark = [
    pytest.mark.skipif(docker_unready() is not None, reason=str(docker_unready())),
    pytest.mark.skipif(choose_bwrap() is None, reason="image slots need bubblewrap"),
]


@pytest.fixture(scope="module")
def archives(task_images: TaskImages, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """`docker-archive:` references of the two task images, readable by any user."""
    where = _readable(tmp_path_factory.mktemp("archives"))
    refs = {}
    for key, tag in (("a", task_images.a), ("b", task_images.b)):
        out = where / f"{key}.tar"
        subprocess.run(["docker", "save", "-o", str(out), tag], check=True)
        os.chmod(out, 0o644)
        refs[key] = f"docker-archive:{out}"
    return refs


def _readable(where: Path) -> Path:
    """`where` readable by the servers' unprivileged user (pytest's base temp is private to its user)."""
    os.chmod(where, 0o755)
    for parent in where.parents:
        if parent == Path("/tmp"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o711)
    return where


def _cfg(**kw: object) -> SlotPoolConfig:
    base: dict[str, object] = {
        "slots_per_container": 3,
        "min_containers": 1,
        "max_containers": 1,
        "health_interval": 0.25,
        "isolation": "bwrap",
    }
    base.update(kw)
    return SlotPoolConfig.model_validate(base)


async def _sh(pool: SlotPool, slot: Slot, command: str) -> str:
    result = await pool.execute(slot, "bash", {"command": command})
    return result.output


async def test_each_slot_sees_its_own_image_and_keeps_its_writes_to_itself(archives: dict[str, str]) -> None:
    said: list[str] = []
    async with SlotPool(_cfg(), progress=said.append) as pool:
        a1 = await pool.acquire("a1", image=archives["a"])
        b = await pool.acquire("b", image=archives["b"])
        a2 = await pool.acquire("a2", image=archives["a"])
        assert a1.server_id == b.server_id == a2.server_id
        assert (await _sh(pool, a1, "cat /opt/task/tool; ls /opt/task; test -e /etc/motd || echo no-motd")) == (
            "echo task a\ntool\nno-motd\n"
        )
        assert (await _sh(pool, b, "ls /opt/task; cat /etc/debian_version")).startswith("tool-b\n12.")
        # the image's own tools: its python3, its /etc; nothing of the node's own root
        assert (await _sh(pool, b, "python3 -c 'import sys; print(sys.prefix)'")) == "/usr\n"
        assert (await _sh(pool, a1, "ls /run/atropos-host 2>&1 | head -1; ls / | tr '\\n' ' '")).count("workspace") == 1
        # a write over an image file, and a new file in /etc: the slot's own layer only
        assert (
            await _sh(pool, a1, "echo changed > /opt/task/tool && echo mine > /etc/added && cat /opt/task/tool")
        ) == ("changed\n")
        assert (
            await _sh(pool, a2, "cat /opt/task/tool; cat /etc/added 2>&1 | grep -c 'No such'")
        ) == "echo task a\n1\n"
        pool.release(a1)
        a3 = await pool.acquire("a3", image=archives["a"])
        assert (await _sh(pool, a3, "cat /opt/task/tool; test -e /etc/added || echo gone")) == "echo task a\ngone\n"
        # an image slot released goes back to the server's own root for the next trajectory
        pool.release(b)
        plain = await pool.acquire("plain")
        assert (await _sh(pool, plain, "test -e /opt/task || echo no-task")) == "no-task\n"
    unpacked = [line for line in said if "unpacked on its node" in line]
    kept = [line for line in said if "already on its node" in line]
    assert len(unpacked) == 2 and len(kept) == 2, said  # a and b once; a2 and a3 found a on the node


async def test_a_missing_or_corrupt_image_fails_the_acquire_in_one_line_and_keeps_the_slot(
    archives: dict[str, str], tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(Path(archives["a"].removeprefix("docker-archive:")).read_bytes()[:300_000])
    os.chmod(tmp_path, 0o755)
    os.chmod(corrupt, 0o644)
    async with SlotPool(_cfg(slots_per_container=1)) as pool:
        for ref, words in (
            (f"docker-archive:{tmp_path / 'none.tar'}", "no such file"),
            (f"docker-archive:{corrupt}", "corrupt.tar"),
            ("/", "a directory is not taken by a pool"),
            ("ubuntu:22.04", "docker-daemon://NAME:TAG"),
        ):
            with pytest.raises(InvalidToolCall) as caught:
                await pool.acquire("bad", image=ref, timeout=30)
            assert words in str(caught.value) and "\n" not in str(caught.value), caught.value
        slot = await pool.acquire("after", timeout=30)  # the one slot came back each time
        assert (await _sh(pool, slot, "echo ok")) == "ok\n"


async def test_the_node_and_other_slots_stay_out_of_reach_of_an_image_slot(archives: dict[str, str]) -> None:
    """The file-system attack suite of the isolation issue, victim and attacker both in one image."""
    async with SlotPool(_cfg(slots_per_container=2)) as pool:
        found, output = await attack_through_pool(pool, ["/tmp", "/var/tmp", os.getcwd()], image=archives["a"])
    assert leaked(output) == [], output
    assert found.marker_text not in output
    print(f"[image slot attack] {len(output)} bytes of attack output, nothing leaked")


async def test_an_image_slot_goes_to_a_server_that_holds_the_image(archives: dict[str, str]) -> None:
    """Two servers, each with its own image cache: once one has unpacked the image, the image's next
    slots go there while it has a free slot, and /health lists what each server holds."""
    said: list[str] = []
    async with SlotPool(_cfg(slots_per_container=2, min_containers=2, max_containers=2), progress=said.append) as pool:
        first = await pool.acquire("first", image=archives["a"])
        holder, url = first.server_id, pool.server_of(first).url
        pool.release(first)
        for i in range(2):  # the free slots alternate between the servers: the preference decides
            # the holder's slots back from their reset first: "while it has a free slot"
            assert await wait_for(lambda: pool.stats().slots_by_status["resetting"] == 0)
            again = await pool.acquire(f"again-{i}", image=archives["a"])
            assert again.server_id == holder
            pool.release(again)
        async with httpx.AsyncClient() as http:
            health = (await http.get(url + "/health", timeout=5)).json()
        assert health["images"] == [archives["a"]]
    assert len([line for line in said if "unpacked on its node" in line]) == 1, said


@pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="needs a bubblewrap without overlays (Debian's 0.8)")
async def test_where_no_overlay_can_be_mounted_an_image_slot_gets_a_copy_and_says_why(
    archives: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATROPOS_BWRAP", "/usr/bin/bwrap")  # 0.8: no --overlay
    said: list[str] = []
    async with SlotPool(_cfg(slots_per_container=2), progress=said.append) as pool:
        one = await pool.acquire("one", image=archives["a"], timeout=30)
        two = await pool.acquire("two", image=archives["a"], timeout=30)
        assert (await _sh(pool, one, "echo changed > /opt/task/tool; cat /opt/task/tool")) == "changed\n"
        tool, uid = (await _sh(pool, two, "cat /opt/task/tool; id -u")).rsplit("\n", 2)[:2]
        assert (tool, uid != "0") == ("echo task a", True)
        with pytest.raises(SlotFailed, match="needs overlays in a slot"):
            await pool.snapshot(one, "s")
        pool.release(one)
        again = await pool.acquire("again", image=archives["a"], timeout=30)
        assert (await _sh(pool, again, "cat /opt/task/tool")) == "echo task a\n"
    copied = [line for line in said if "its root a copy, not an overlay" in line]
    assert len(copied) == 3 and "Unknown option --overlay-src" in copied[0], said


@pytest.fixture(scope="module")
def base_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base image's root file system as a directory (`docker export` of a created container)."""
    from tests.images_fixtures import BASE_IMAGE

    where = tmp_path_factory.mktemp("base-root")
    made = subprocess.run(["docker", "create", BASE_IMAGE, "true"], check=True, capture_output=True, text=True)
    cid = made.stdout.strip()
    try:
        subprocess.run(["docker", "export", "-o", str(where / "base.tar"), cid], check=True)
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
    root = where / "rootfs"
    root.mkdir()
    subprocess.run(["tar", "-C", str(root), "-xf", str(where / "base.tar")], check=True)
    return root


@pytest.mark.skipif(shutil.which("mksquashfs") is None, reason="no mksquashfs (Debian: squashfs-tools)")
async def test_a_slot_in_a_sif_image(base_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIF (what HPC users have), made here without Apptainer: its root is the slot's; the wait
    while it is unpacked is reported."""
    monkeypatch.setattr("atropos.progress.HEARTBEAT_SECONDS", 0.5)
    (base_root / "opt/from-the-sif").write_text("sif\n")
    sif = write_sif(base_root, _readable(tmp_path) / "task.sif")
    os.chmod(sif, 0o644)
    said: list[str] = []
    async with SlotPool(_cfg(slots_per_container=1), progress=said.append) as pool:
        slot = await pool.acquire("sif", image=str(sif))
        assert (await _sh(pool, slot, "cat /opt/from-the-sif; cat /etc/debian_version")).startswith("sif\n12.")
    assert any(f"in image {sif} (unpacked on its node" in line for line in said), said
    assert any(f"image {sif} (unpacked first if its node lacks it): still waiting after" in x for x in said), said


async def test_a_task_of_the_environment_runs_in_its_own_image(archives: dict[str, str]) -> None:
    """The environment's agent loop: a task naming an image is set up, worked on and scored in it."""
    from atropos.envs.agent_loop import AgentSettings, run_rollout
    from atropos.envs.chat import AssistantReply
    from atropos.envs.task_set import Task
    from tests.env_fixtures import Scripted

    task = Task.model_validate(
        {
            "id": "in-image",
            "prompt": "run the task's tool and keep its output in out.txt",
            "image": archives["a"],
            "setup_commands": ["test -x /bin/bash && echo set-up > setup.txt"],
            "checks": [{"name": "tool", "command": "grep -qx 'task a' out.txt && test -s setup.txt"}],
        }
    )
    call = '<tool_call>{"name": "bash", "arguments": {"command": "sh /opt/task/tool > out.txt"}}</tool_call>'
    async with SlotPool(_cfg(slots_per_container=1)) as pool:
        rollout = await run_rollout(pool, task, Scripted(AssistantReply(call), AssistantReply("done")), AgentSettings())
    assert (rollout.status, rollout.reward) == ("ok", 1.0), (rollout.error, rollout.checks)


async def test_a_snapshot_of_an_image_slot_keeps_its_writes_over_the_image_and_forks_run_in_it(
    archives: dict[str, str],
) -> None:
    """The snapshot is of the slot's layer over the image (a changed file, a deleted one, a directory
    replaced) and of its workspace; a fork starts in the image with those, and from there each
    fork's writes are its own. A fork's snapshot carries its parent's layer as well."""
    async with SlotPool(_cfg()) as pool:
        src = await pool.acquire("src", image=archives["a"])
        await _sh(
            pool, src,
            "echo changed > /opt/task/tool && rm /etc/debian_version && rm -rf /usr/share/doc && "
            "mkdir /usr/share/doc && echo only > /usr/share/doc/only && echo ws > w.txt",
        )  # fmt: skip
        info = await pool.snapshot(src, "s1")
        assert info.image == archives["a"], info
        await _sh(pool, src, "echo after > /opt/task/tool")
        seen = "cat /opt/task/tool w.txt; test -e /etc/debian_version || echo no-version; ls /usr/share/doc"
        fork = await pool.fork(src, "s1")
        assert (await _sh(pool, fork, seen)) == "changed\nws\nno-version\nonly\n"
        await _sh(pool, fork, "echo fork > /opt/task/tool && echo more > /etc/more")
        assert (await _sh(pool, src, "cat /opt/task/tool; test -e /etc/more || echo src-clean")) == (
            "after\nsrc-clean\n"
        )
        await pool.snapshot(fork, "s2")  # the fork's own writes, over s1's layer
        pool.release(src)
        second = await pool.fork(fork, "s2")
        assert (await _sh(pool, second, seen + "; cat /etc/more")) == "fork\nws\nno-version\nonly\nmore\n"
        # a slot of the image, not forked: nothing of any snapshot
        pool.release(second)
        plain = await pool.acquire("plain", image=archives["a"])
        assert (await _sh(pool, plain, "cat /opt/task/tool; cat /etc/debian_version")).startswith("echo task a\n12.")


async def test_a_task_prepared_in_its_image_forks_every_slot_in_it(archives: dict[str, str]) -> None:
    """`prepare(..., image=)`: the setup runs once in the image (here it edits the image's /etc),
    and each slot acquired for the task starts from that, in the image."""
    said: list[str] = []
    setup = [("bash", {"command": "echo prepared > /etc/prepared && echo ws > ready.txt"})]
    async with SlotPool(_cfg(), progress=said.append) as pool:
        await pool.prepare("task-a", setup, image=archives["a"])
        slots = [await pool.acquire(f"r{i}", from_snapshot="task-a") for i in range(2)]
        for slot in slots:
            assert (await _sh(pool, slot, "cat /etc/prepared ready.txt /opt/task/tool")) == (
                "prepared\nws\necho task a\n"
            )
        await _sh(pool, slots[0], "echo mine > /etc/prepared")
        assert (await _sh(pool, slots[1], "cat /etc/prepared")) == "prepared\n"
        with pytest.raises(ValueError, match="was prepared in image"):
            await pool.acquire("other", from_snapshot="task-a", image=archives["b"])
    assert len([line for line in said if "starting in image" in line]) == 1, said  # the setup's slot only


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="no skopeo (Debian: skopeo), which pulls docker:// images")
async def test_a_registry_image_is_pulled_once_per_node_per_the_pull_policy(
    task_images: TaskImages, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docker://: the real skopeo pulls from a registry (tests/registry_standin.py: CI has none);
    `missing` pulls once per node, `never` takes only what the node has, a missing image is one line."""
    where = _readable(tmp_path)
    layout = where / "layout"
    subprocess.run(["skopeo", "copy", "--quiet", f"docker-daemon:{task_images.b}", f"oci:{layout}:task-b"], check=True)
    conf = where / "registries.conf"
    async with serving(layout, conf) as (registry, host):
        monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
        ref = f"docker://{host}/task-b:task-b"
        async with SlotPool(_cfg(slots_per_container=2)) as pool:
            one = await pool.acquire("one", image=ref)
            assert (await _sh(pool, one, "ls /opt/task")) == "tool-b\n"
            asked = len(registry.pulls)
            two = await pool.acquire("two", image=ref)
            assert (await _sh(pool, two, "ls /opt/task")) == "tool-b\n"
            assert len(registry.pulls) == asked > 0  # the node had it: the registry was not asked again
            pool.release(two)
            with pytest.raises(InvalidToolCall) as caught:
                await pool.acquire("none", image=f"docker://{host}/none:1", timeout=30)
            message = str(caught.value)
            assert f"docker://{host}/none:1" in message and "skopeo copy" in message and "\n" not in message, message
        async with SlotPool(_cfg(slots_per_container=1, image_pull="never")) as pool:
            with pytest.raises(InvalidToolCall, match="not on this node, and the pull policy is never"):
                await pool.acquire("never", image=ref, timeout=30)
        said: list[str] = []
        async with SlotPool(_cfg(slots_per_container=1, image_pull="always"), progress=said.append) as pool:
            for i in range(2):  # the registry is asked each time; the unchanged image is not pulled again
                asked = len(registry.pulls)
                slot = await pool.acquire(f"always-{i}", image=ref)
                assert len(registry.pulls) > asked
                pool.release(slot)
        assert [("unpacked on its node" in x, "already on its node" in x) for x in said if ": in image " in x] == [
            (True, False),
            (False, True),
        ], said


async def test_a_task_that_names_its_workdir_has_its_commands_run_there(archives: dict[str, str]) -> None:
    """`workdir` (e.g. the repository in a SWE task's image): the agent's one-shot commands and its
    session start there, and so do the setup commands and the checks; a workdir that is not there
    is the task's error, said in one line."""
    from atropos.envs.agent_loop import AgentSettings, run_rollout
    from atropos.envs.chat import AssistantReply
    from atropos.envs.task_set import Task, TaskError
    from tests.env_fixtures import Scripted

    def task(workdir: str) -> Task:
        return Task.model_validate(
            {
                "id": "in-workdir",
                "prompt": "note where you are",
                "image": archives["a"],
                "workdir": workdir,
                "setup_commands": ["pwd > /opt/setup-ran-in"],
                "checks": [
                    {"name": "where", "command": 'test "$(pwd)" = /opt/task && test -f tool'},
                    {"name": "setup", "command": "grep -qx /opt/task /opt/setup-ran-in"},
                    {"name": "agent", "command": "grep -qx /opt/task /opt/one-shot && grep -qx /opt/task /opt/session"},
                ],
            }
        )

    calls = [
        '<tool_call>{"name": "bash", "arguments": {"command": "pwd > /opt/one-shot"}}</tool_call>',
        '<tool_call>{"name": "bash_session", "arguments": {"command": "pwd > /opt/session"}}</tool_call>',
    ]
    async with SlotPool(_cfg(slots_per_container=1)) as pool:
        model = Scripted(*(AssistantReply(c) for c in calls), AssistantReply("done"))
        rollout = await run_rollout(pool, task("/opt/task"), model, AgentSettings())
        assert (rollout.status, rollout.reward) == ("ok", 1.0), (rollout.error, rollout.checks)
        with pytest.raises(TaskError, match="workdir /opt/nowhere") as caught:
            nowhere = task("/opt/nowhere").model_copy(update={"setup_commands": []})
            await run_rollout(pool, nowhere, Scripted(AssistantReply("done")), AgentSettings())
        assert "\n" not in str(caught.value)
