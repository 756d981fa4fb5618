"""The local backend's command lines for each driver, and the singularity driver end to end
through the apptainer stand-in (tests/bin/apptainer runs the image's command under bubblewrap)."""

from __future__ import annotations

import os

import pytest

from atropos.backends.launchers import ApptainerLauncher
from atropos.backends.local import LocalBackend
from atropos.slots import SlotPool, SlotPoolConfig
from tests.nomad_fixtures import TESTS_BIN, agent_env, task_user, write_standin_image


def test_process_command_keeps_token_out_of_argv(tmpdir_path: str) -> None:
    backend = LocalBackend(SlotPoolConfig(slots_per_container=3).server_spec(), workdir=tmpdir_path)
    argv, env = backend.command("n", "/d", "secret-token")
    assert "secret-token" not in " ".join(argv)
    assert env["ATROPOS_SANDBOX_TOKEN"] == "secret-token"
    assert argv[argv.index("--slots") + 1] == "3" and argv[argv.index("--port") + 1] == "0"


def test_docker_command(tmpdir_path: str) -> None:
    cfg = SlotPoolConfig(driver={"type": "docker", "image": "atropos-sandbox:latest", "container_port": 8080})
    argv, env = LocalBackend(cfg.server_spec(), workdir=tmpdir_path).command("box", "/srv/d", "tok")
    assert argv[:2] == ["docker", "run"]
    assert "127.0.0.1::8080" in argv and "/srv/d:/data" in argv
    assert argv[argv.index("-e") + 1] == "ATROPOS_SANDBOX_TOKEN" and env["ATROPOS_SANDBOX_TOKEN"] == "tok"
    assert "tok" not in argv
    # root in the container until the server gives it up: then our uid (or the image's user for root)
    assert argv[argv.index("--user") + 1] == "0:0" and "SYS_ADMIN" in argv
    assert argv.count("--run-as") == (0 if os.getuid() == 0 else 1)
    if os.getuid() != 0:
        assert argv[argv.index("--run-as") + 1] == f"{os.getuid()}:{os.getgid()}"


def test_singularity_command(tmpdir_path: str) -> None:
    sif = write_standin_image(os.path.join(tmpdir_path, "x.sif"))
    config = SlotPoolConfig(driver={"type": "singularity", "image": sif})
    backend = LocalBackend(config.server_spec(), workdir=tmpdir_path)
    assert isinstance(backend.launcher, ApptainerLauncher)
    backend.launcher.sif, backend.launcher.binary = sif, "apptainer"  # what prepare() finds
    argv, env = backend.command("n", "/host/data", "tok")
    # started as root, apptainer runs as the unprivileged run_as user (setpriv) and never as root
    launcher, argv = argv[: argv.index("apptainer")], argv[argv.index("apptainer") :]
    assert launcher == (
        []
        if os.geteuid()
        else ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--pdeathsig", "KILL", "--"]
    )
    assert argv[:3] == ["apptainer", "exec", "--containall"]
    assert "/host/data:/data" in argv and "--net" not in argv
    assert argv[argv.index(sif) + 1 :][:2] == ["atropos-sandbox", "server"]
    assert env["APPTAINERENV_ATROPOS_SANDBOX_TOKEN"] == "tok" and "tok" not in argv


async def test_singularity_driver_end_to_end(tmpdir_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in agent_env().items():  # the stand-in apptainer and this interpreter on PATH
        monkeypatch.setenv(key, value)
    sif = write_standin_image(os.path.join(tmpdir_path, "sandbox.sif"))
    driver = {"type": "singularity", "image": sif, "apptainer_binary": os.path.join(TESTS_BIN, "apptainer")}
    cfg = SlotPoolConfig(driver=driver, slots_per_container=2, run_as=task_user())
    async with SlotPool(cfg) as pool:
        backend = pool.backend
        assert isinstance(backend, LocalBackend) and isinstance(backend.launcher, ApptainerLauncher)
        assert backend.launcher.binary == os.path.join(TESTS_BIN, "apptainer")
        server = next(iter(backend._servers.values()))
        with open(f"/proc/{server.proc.pid}/cmdline", "rb") as fh:
            assert b"exec\0--containall" in fh.read()  # the server runs under (stand-in) apptainer exec
        async with pool.slot("s") as slot:
            res = await pool.execute(slot, "bash", {"command": "pwd; echo hi > f; cat f"})
            assert res.ok and res.stdout == "/workspace\nhi\n", res
        a, b = await pool.acquire("a"), await pool.acquire("b")
        await pool.execute(a, "write_file", {"path": "mine", "content": "a"})
        assert (await pool.execute(b, "bash", {"command": "ls"})).stdout == ""
        pool.release(a)
        pool.release(b)


@pytest.mark.apptainer
async def test_real_apptainer_local_driver() -> None:
    """The single-machine Apptainer deployment with a real apptainer and a real SIF
    (ATROPOS_TEST_SIF, e.g. built by `scripts/build-sif.sh`)."""
    from tests.images_fixtures import real_apptainer

    runtime = real_apptainer()
    sif = os.environ.get("ATROPOS_TEST_SIF")
    if runtime is None or not sif or not os.path.exists(sif):
        pytest.skip("needs a real apptainer on PATH and ATROPOS_TEST_SIF naming a built atropos-sandbox SIF")
    cfg = SlotPoolConfig(
        driver="singularity",
        singularity_image=sif,
        apptainer_binary=runtime.binary,
        slots_per_container=2,
        min_containers=2,
        max_containers=2,
    )
    async with SlotPool(cfg) as pool:
        slots = [await pool.acquire(f"t{i}") for i in range(4)]
        assert len({s.server_id for s in slots}) == 2
        for i, s in enumerate(slots):
            await pool.execute(s, "write_file", {"path": "id", "content": str(i)})
        outs = [
            (await pool.execute(s, "bash", {"command": "cat id; echo; grep -c . /etc/os-release"})).stdout
            for s in slots
        ]
        assert [o.split()[0] for o in outs] == ["0", "1", "2", "3"]
        health = await pool.server_health(slots[0])
        assert health["slots"] == 2 and health["isolation"] in ("bwrap", "none")
        for s in slots:
            pool.release(s)
