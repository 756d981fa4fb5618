"""The job builder: what each driver's job says, and the static port scheme."""

from __future__ import annotations

import json
import shlex

import pytest
from pydantic import ValidationError

from atropos.host import owner_state
from atropos.nomad import OwnerMeta, SandboxJobSpec, create_sandbox_job, group_names, static_port
from atropos.nomad.builder import group_index

TOKEN = "s3cret-token-value"


def build(**values: object) -> dict:  # type: ignore[type-arg]
    return create_sandbox_job(SandboxJobSpec(token=TOKEN, **values)).to_json()  # type: ignore[arg-type]


def only_task(job: dict, group: int = 0) -> dict:  # type: ignore[type-arg]
    (task,) = job["TaskGroups"][group]["Tasks"]
    return task  # type: ignore[no-any-return]


def test_docker_job_maps_a_dynamic_host_port_to_the_container_port() -> None:
    job = build(driver="docker", count=3, image="registry.example/sandbox:1", container_port=9000)
    (group,) = job["TaskGroups"]
    assert group["Name"] == "sandbox" and group["Count"] == 3
    assert group["Networks"] == [{"DynamicPorts": [{"Label": "http", "To": 9000}]}]
    task = only_task(job)
    assert task["Driver"] == "docker"
    config = task["Config"]
    assert config["image"] == "registry.example/sandbox:1" and config["ports"] == ["http"]
    args = config["args"]
    assert args[args.index("--port") + 1] == "9000" and args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--data-dir") + 1] == "${NOMAD_ALLOC_DIR}/data"
    assert "Scaling" not in group  # scaled with POST /v1/job/:id/scale


def test_singularity_job_execs_apptainer_from_a_shell_on_one_static_port_per_container() -> None:
    job = build(
        driver="singularity",
        singularity_image="/shared/sandbox.sif",
        count=3,
        base_port=21000,
        apptainer_args=["--nv"],
        slots_per_container=16,
    )
    assert [g["Name"] for g in job["TaskGroups"]] == ["sandbox-0", "sandbox-1", "sandbox-2"]
    for i, group in enumerate(job["TaskGroups"]):
        assert group["Count"] == 1
        assert group["Networks"] == [{"ReservedPorts": [{"Label": "http", "Value": 21000 + i}]}]  # no To
        assert group["Scaling"] == {"Enabled": False, "Min": 0, "Max": 1}
    task = only_task(job)
    assert task["Driver"] == "raw_exec"
    assert task["Config"]["command"] == "/bin/sh"
    flag, script = task["Config"]["args"]
    # started as root (a root agent), the task becomes nobody first; otherwise it runs as it is
    as_root, _, as_is = script.partition("; fi; ")
    assert flag == "-c" and as_is.startswith("exec apptainer exec ")
    assert as_root.startswith('if [ "$(id -u)" = 0 ]; then ')
    assert 'exec setpriv --reuid nobody --regid "$(id -g nobody)" --clear-groups -- apptainer exec ' in as_root
    assert as_root.endswith(as_is.removeprefix("exec apptainer exec "))  # the same command either way
    words = shlex.split(as_is)
    image = words.index("/shared/sandbox.sif")
    assert "--containall" in words[:image] and "--nv" in words[:image]
    assert not any(w.startswith(("--net", "--network")) for w in words[:image])  # host network, no CNI
    assert words[words.index("--bind") + 1] == "${NOMAD_ALLOC_DIR}/data:/data"
    server = words[image + 1 :]
    assert server[:2] == ["atropos-sandbox", "server"]
    assert server[server.index("--port") + 1] == "${NOMAD_PORT_http}"
    assert server[server.index("--host") + 1] == "${NOMAD_IP_http}"
    assert server[server.index("--data-dir") + 1] == "/data"
    assert server[server.index("--slots") + 1] == "16"
    # the shell expands the Nomad references (they are double-quoted, not single-quoted)
    assert '"${NOMAD_ALLOC_DIR}/data:/data"' in script


def test_the_token_is_in_no_part_of_the_job_and_reaches_the_server_as_a_secret_file() -> None:
    for driver, token_file in (
        ("process", "${NOMAD_SECRETS_DIR}/atropos-token"),
        ("docker", "/secrets/atropos-token"),
        ("singularity", "/secrets/atropos-token"),
    ):
        job = build(driver=driver, singularity_image="/i.sif", job_id="j1")
        assert TOKEN not in json.dumps(job)  # what `nomad job inspect`, the API and the UI show
        task = only_task(job)
        (template,) = task["Templates"]
        assert template == {
            "EmbeddedTmpl": '{{ with nomadVar "nomad/jobs/j1" }}{{ .token }}{{ end }}',
            "DestPath": "secrets/atropos-token",
            "ChangeMode": "noop",
            "Perms": "0400",
        }
        words = shlex.split(" ".join(task["Config"].get("args") or []))
        assert words[words.index("--token-file") + 1] == token_file
    singularity = only_task(
        build(
            driver="singularity",
            singularity_image="/i.sif",
            apptainer_binary="singularity",
            apptainer_cache_dir="/scratch/c",
        )
    )
    assert singularity["Env"] == {"SINGULARITY_CACHEDIR": "/scratch/c"}
    assert '"${NOMAD_SECRETS_DIR}:/secrets"' in singularity["Config"]["args"][1]


def test_process_job_runs_the_server_command_directly() -> None:
    job = build(
        driver="process",
        server_command=["/opt/venv/bin/atropos-sandbox", "server"],
        isolation="bwrap",
        network="deny",
        command_timeout=30,
        max_output=4096,
    )
    config = only_task(job)["Config"]
    assert config["command"] == "/bin/sh" and config["args"][0] == "-c"
    as_is = config["args"][1].partition("; fi; ")[2]
    args = shlex.split(as_is)
    assert args[:3] == ["exec", "/opt/venv/bin/atropos-sandbox", "server"]
    for flag, value in (
        ("--isolation", "bwrap"),
        ("--network", "deny"),
        ("--timeout", "30.0"),
        ("--max-output", "4096"),
        ("--data-dir", "${NOMAD_ALLOC_DIR}/data"),
    ):
        assert args[args.index(flag) + 1] == value


def test_every_job_has_policies_that_do_not_wait_on_consul() -> None:
    job = build(driver="process", service=True)
    assert job["Update"]["HealthCheck"] == "task_states"
    group = job["TaskGroups"][0]
    assert group["RestartPolicy"]["Mode"] == "fail"
    assert group["ReschedulePolicy"]["Attempts"] == 3
    (service,) = group["Services"]
    assert service["Provider"] == "nomad" and service["PortLabel"] == "http"
    assert service["Checks"][0]["Path"] == "/health"
    task = only_task(job)
    assert task["KillSignal"] == "SIGTERM"
    assert task["Resources"] == {"CPU": 1000, "MemoryMB": 2048}


def test_placement_settings_are_passed_through() -> None:
    job = build(
        datacenters=["hpc-*"],
        namespace="rl",
        region="eu",
        node_pool="gpu",
        priority=80,
        constraints=[{"l_target": "${attr.driver.raw_exec}", "r_target": "1"}],
    )
    assert (job["Datacenters"], job["Namespace"], job["Region"], job["NodePool"], job["Priority"]) == (
        ["hpc-*"],
        "rl",
        "eu",
        "gpu",
        80,
    )
    assert job["Constraints"] == [{"LTarget": "${attr.driver.raw_exec}", "Operand": "=", "RTarget": "1"}]
    bare = build()
    assert not {"Datacenters", "Namespace", "Region", "NodePool", "Constraints"} & set(bare)


def test_meta_names_the_owner_for_cleanup() -> None:
    job = build(meta={"team": "rl"})
    meta = job["Meta"]
    me = OwnerMeta.current()
    assert meta["atropos_owner_host"] == me.host and meta["atropos_owner_pid"] == str(me.pid)
    assert meta["atropos_kind"] == "sandbox" and meta["team"] == "rl"
    assert owner_state(meta) == "alive"
    assert "atropos_owner_pid" not in build(owner=None)["Meta"]


def test_count_zero_keeps_one_empty_static_group() -> None:
    spec = SandboxJobSpec(token=TOKEN, count=0)
    (group,) = create_sandbox_job(spec).task_groups
    assert (group.name, group.count) == ("sandbox-0", 0)
    assert group_names(spec) == ["sandbox-0"]


def test_scaling_changes_only_the_groups_that_come_or_go() -> None:
    small = SandboxJobSpec(token=TOKEN, count=2, owner=None)
    large = small.with_count(4)
    before = create_sandbox_job(small).to_json()["TaskGroups"]
    after = create_sandbox_job(large).to_json()["TaskGroups"]
    assert after[:2] == before  # unchanged groups: Nomad keeps their allocations
    assert [static_port(large, i) for i in range(4)] == [19000, 19001, 19002, 19003]
    assert [group_index(g["Name"]) for g in after] == [0, 1, 2, 3]


def test_a_container_moved_off_a_lost_node_is_a_new_group_on_the_same_port() -> None:
    spec = SandboxJobSpec(token=TOKEN, count=3, owner=None, moved={1: 2})
    groups = create_sandbox_job(spec).to_json()["TaskGroups"]
    assert [g["Name"] for g in groups] == ["sandbox-0", "sandbox-1-r2", "sandbox-2"]
    assert [group_index(g["Name"]) for g in groups] == [0, 1, 2]
    assert groups[1]["Networks"] == [{"ReservedPorts": [{"Label": "http", "Value": 19001}]}]
    assert create_sandbox_job(spec.with_count(4)).to_json()["TaskGroups"][:3] == groups
    assert group_index("sandbox") is None and group_index("sandbox-x-r1") is None


def test_dynamic_ports_for_raw_exec_use_one_group_without_to() -> None:
    job = build(driver="process", static_ports=False, count=5)
    (group,) = job["TaskGroups"]
    assert group["Count"] == 5 and group["Networks"] == [{"DynamicPorts": [{"Label": "http"}]}]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"driver": "singularity"}, "needs singularity_image"),
        ({"count": 100, "base_port": 65500}, "exceeds port 65535"),
        ({"job_id": "has space"}, "job_id"),
        ({"token": ""}, "token must not be empty"),
        ({"server_command": []}, "server_command"),
    ],
)
def test_invalid_specs_are_refused_with_a_reason(values: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValidationError, match=message):
        SandboxJobSpec(**{"token": TOKEN, **values})
