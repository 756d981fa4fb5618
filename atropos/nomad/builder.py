"""Build the Nomad job that runs a pool's sandbox servers, for the docker, singularity and process
drivers.

Port scheme
-----------
`docker`: one task group `sandbox` with `Count = count`. The group network has a `DynamicPorts`
entry `http` mapped (`To`) to the server's port inside the container; Nomad picks a free host port
per allocation. Scaling is `POST /v1/job/:id/scale` on that group.

`singularity` and `process` (`raw_exec`, host network): Apptainer shares the host network, so the
server binds a host port directly and two servers on one node must not share one. Each container is
its own task group `sandbox-<i>` (`Count = 1`) with a static `ReservedPorts` entry `http` whose value
is `base_port + i` (no `To`). Several containers of one job can therefore land on one node without
colliding, and Nomad never places a group on a node where its port is taken (by anything): that group
goes to another node or waits, reported as a port collision. Two pools on one cluster should use
base ports at least `count` apart. Each group carries a scaling policy `Min = 0, Max = 1`, so
`POST /v1/job/:id/scale` (or `nomad job scale JOB sandbox-3 0`) can stop or restart one container but
never puts two on one port. Changing the number of containers re-registers the job with groups
`sandbox-0 .. sandbox-<count-1>` (see `scale_sandbox_job`): groups whose definition is unchanged keep
their allocations, new groups start, removed groups stop. With `count = 0` the job keeps group
`sandbox-0` at `Count = 0` (Nomad refuses a job without groups). A container whose node was lost
moves to a group of a new name, `sandbox-<i>-r<n>` (`SandboxJobSpec.moved`): its allocation then
replaces nothing, so it starts at once, where an allocation replacing another waits until Nomad has
given the lost one up (the node's heartbeat TTL, 20 s and more).

`static_ports=False` gives `singularity`/`process` the docker layout instead: one group, a dynamic
host port (no `To`), scaled with `POST /v1/job/:id/scale`.

Every server binds `${NOMAD_IP_http}` (raw_exec) or `0.0.0.0` inside its container (docker), takes its
port from the `http` label and keeps its slots in the allocation's `data` dir.

Isolation and secrets
---------------------
- The bearer token is in no part of the job (`nomad job inspect`, the API and the UI show jobs to
  anyone with read-job): the pool writes it to the Nomad Variable `nomad/jobs/<job>` before it
  submits the job (and deletes it after), and a `template` renders it into the task's secrets dir
  (`secrets/atropos-token`, mode 0400); the server takes it with `--token-file`.
- raw_exec tasks (singularity, process) that start as root (a root agent, as on real clusters)
  become `task_user` (default `nobody`) first: `/bin/sh -c` hands it the token file and `exec`s
  `setpriv --reuid ... --` apptainer or the server, so apptainer runs unprivileged, in a user
  namespace, with the slots' bubblewrap sandboxes inside. (Nomad's own task `user` would make a
  non-root agent fail every task; the shell works under either.) The allocation's `data` dir is
  world-writable (Nomad makes it 0777), so that user can use it.
- docker tasks start as root with the capabilities and seccomp profile the server needs to give
  its slots bubblewrap sandboxes, and the server gives root up before any slot starts
  (atropos.images.docker_security).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from atropos import __version__
from atropos.drivers import DockerDriver, SingularityDriver
from atropos.images.apptainer import (
    CONTAINER_DATA_DIR,
    apptainer_secret_env,
    build_apptainer_exec_argv,
    runtime_env_prefix,
    shell_quote_argv,
)
from atropos.images.docker_security import nomad_docker_config, volume
from atropos.nomad.models import (
    EphemeralDisk,
    Job,
    NetworkResource,
    Port,
    Resources,
    ScalingPolicy,
    Service,
    ServiceCheck,
    Task,
    TaskGroup,
    Template,
)
from atropos.nomad.spec import SandboxJobSpec

__all__ = [
    "GROUP_NAME",
    "PORT_LABEL",
    "TASK_NAME",
    "TOKEN_KEY",
    "create_sandbox_job",
    "group_index",
    "group_names",
    "static_port",
]

GROUP_NAME = "sandbox"
TASK_NAME = "server"
PORT_LABEL = "http"

_ALLOC_DATA = "${NOMAD_ALLOC_DIR}/data"
_SECRETS = "${NOMAD_SECRETS_DIR}"
_DOCKER_SECRETS = "/secrets"  # where the docker driver mounts the task's secrets dir
CONTAINER_SECRETS_DIR = "/secrets"  # where the singularity job binds it inside the image
TOKEN_FILE = "atropos-token"
TOKEN_KEY = "token"  # the item of the token Variable
_HOST_IP = "${NOMAD_IP_http}"
_HOST_PORT = "${NOMAD_PORT_http}"
_SERVICE_SHUTDOWN_DELAY = timedelta(seconds=2)


def create_sandbox_job(spec: SandboxJobSpec) -> Job:
    """The Nomad job for `spec` (see the module docstring for the port scheme)."""
    if spec.uses_static_ports:
        groups = [
            _group(spec, group_name(spec, i), 1 if i < spec.count else 0, static_port(spec, i))
            for i in range(max(spec.count, 1))
        ]
    else:
        groups = [_group(spec, GROUP_NAME, spec.count, None)]
    return Job(
        id=spec.job_id,
        name=spec.job_id,
        priority=spec.priority,
        region=spec.region,
        namespace=spec.namespace,
        node_pool=spec.node_pool,
        datacenters=spec.datacenters or None,
        constraints=spec.constraints or None,
        update=spec.update,
        meta=_job_meta(spec),
        task_groups=groups,
    )


def group_name(spec: SandboxJobSpec, index: int) -> str:
    if not spec.uses_static_ports:
        return GROUP_NAME
    moved = spec.moved.get(index, 0)
    return f"{GROUP_NAME}-{index}" + (f"-r{moved}" if moved else "")


def group_names(spec: SandboxJobSpec) -> list[str]:
    """The task groups a job built from `spec` has."""
    if spec.uses_static_ports:
        return [group_name(spec, i) for i in range(max(spec.count, 1))]
    return [GROUP_NAME]


def group_index(group: str) -> int | None:
    """The container index of a static-port group name (`sandbox-3`, `sandbox-3-r1` -> 3), else None."""
    prefix = GROUP_NAME + "-"
    index = group[len(prefix) :].split("-r", 1)[0] if group.startswith(prefix) else ""
    return int(index) if index.isdigit() else None


def static_port(spec: SandboxJobSpec, index: int) -> int:
    """The host port of container `index` under the static scheme."""
    return spec.base_port + index


def _job_meta(spec: SandboxJobSpec) -> dict[str, str]:
    meta = {
        "atropos_kind": "sandbox",
        "atropos_driver": spec.driver.type,
        "atropos_slots": str(spec.server.slots),
        "atropos_version": __version__,
    }
    if spec.owner is not None:
        meta.update(spec.owner.to_meta())
    meta.update(spec.meta)
    return meta


def _group(spec: SandboxJobSpec, name: str, count: int, port: int | None) -> TaskGroup:
    return TaskGroup(
        name=name,
        count=count,
        networks=[_network(spec, port)],
        services=[_service(spec)] if spec.service else None,
        restart_policy=spec.restart,
        reschedule_policy=spec.reschedule,
        scaling=ScalingPolicy(min=0, max=1) if port is not None else None,
        ephemeral_disk=EphemeralDisk(size_mb=spec.disk_mb) if spec.disk_mb else None,
        # with a service, give Nomad's catalog time to drop the instance before the server stops
        shutdown_delay=_SERVICE_SHUTDOWN_DELAY if spec.service else None,
        tasks=[_task(spec)],
    )


def _network(spec: SandboxJobSpec, static: int | None) -> NetworkResource:
    if static is not None:
        return NetworkResource(reserved_ports=[Port(label=PORT_LABEL, value=static)])
    to = spec.driver.container_port if isinstance(spec.driver, DockerDriver) else None
    return NetworkResource(dynamic_ports=[Port(label=PORT_LABEL, to=to)])


def _service(spec: SandboxJobSpec) -> Service:
    check = ServiceCheck(name="health", type="http", path="/health")
    return Service(name=spec.job_id.replace("_", "-").replace(".", "-"), port_label=PORT_LABEL, checks=[check])


def _task(spec: SandboxJobSpec) -> Task:
    nomad_driver, config, env = _task_config(spec)
    token_file = Template(
        embedded_tmpl=f'{{{{ with nomadVar "{spec.token_variable}" }}}}{{{{ .{TOKEN_KEY} }}}}{{{{ end }}}}',
        dest_path=f"secrets/{TOKEN_FILE}",
        change_mode="noop",
        perms="0400",
    )
    return Task(
        name=TASK_NAME,
        driver=nomad_driver,
        config=config,
        env=env or None,
        templates=[token_file],
        resources=Resources(cpu=spec.cpu, memory_mb=spec.memory, memory_max_mb=spec.memory_max),
        kill_signal="SIGTERM",
        kill_timeout=spec.kill_timeout,
    )


def _task_config(spec: SandboxJobSpec) -> tuple[Literal["docker", "raw_exec"], dict[str, object], dict[str, str]]:
    """The task's Nomad driver, its config and its environment, for the spec's driver."""
    driver, env = spec.driver, dict(spec.server_env)
    if isinstance(driver, SingularityDriver):
        return "raw_exec", _singularity_config(spec, driver), _singularity_env(spec, driver, env)
    if isinstance(driver, DockerDriver):
        return "docker", _docker_config(spec, driver), env
    return "raw_exec", _process_config(spec), env


def _server_args(spec: SandboxJobSpec, *, host: str, port: int | str, data_dir: str, secrets_dir: str) -> list[str]:
    return spec.server.placed(
        host=host, port=port, data_dir=data_dir, token_file=f"{secrets_dir}/{TOKEN_FILE}"
    ).to_args()


def _docker_config(spec: SandboxJobSpec, driver: DockerDriver) -> dict[str, object]:
    # The docker driver mounts the allocation dir at /alloc (= NOMAD_ALLOC_DIR in the container).
    args = _server_args(
        spec, host="0.0.0.0", port=driver.container_port, data_dir=_ALLOC_DATA, secrets_dir=_DOCKER_SECRETS
    )
    # the slots' declared binds, at the same path (the client's docker plugin needs volumes enabled)
    volumes = [volume(path, rw) for path, rw in spec.server.mounts]
    return {
        **nomad_docker_config(spec.docker_seccomp_profile),
        **({"volumes": volumes} if volumes else {}),
        **spec.docker_config,
        "image": driver.image,
        "ports": [PORT_LABEL],
        "entrypoint": spec.server_command[:1],
        "args": [*spec.server_command[1:], *args],
    }


def _process_config(spec: SandboxJobSpec) -> dict[str, object]:
    args = _server_args(spec, host=_HOST_IP, port=_HOST_PORT, data_dir=_ALLOC_DATA, secrets_dir=_SECRETS)
    return {"command": "/bin/sh", "args": ["-c", _as_task_user(spec, [*spec.server_command, *args])]}


def _singularity_config(spec: SandboxJobSpec, driver: SingularityDriver) -> dict[str, object]:
    argv = build_apptainer_exec_argv(
        _apptainer(driver),
        driver.image,
        binds=[(_ALLOC_DATA, CONTAINER_DATA_DIR), (_SECRETS, CONTAINER_SECRETS_DIR)],
        extra_args=spec.apptainer_args,
        server_args=_server_args(
            spec, host=_HOST_IP, port=_HOST_PORT, data_dir=CONTAINER_DATA_DIR, secrets_dir=CONTAINER_SECRETS_DIR
        ),
        workdir=spec.apptainer_workdir,
        containall=spec.apptainer_containall,
        tun=spec.apptainer_tun,
        command=spec.server_command,
        mounts=spec.server.mounts,
    )
    # The shell expands the ${NOMAD_*} references and is then replaced by apptainer (`exec`), so
    # Nomad's kill signal reaches apptainer, which forwards it to the server.
    return {"command": "/bin/sh", "args": ["-c", _as_task_user(spec, argv)]}


def _as_task_user(spec: SandboxJobSpec, argv: list[str]) -> str:
    """`exec argv`, as `spec.task_user` when the task started as root (see the module docstring)."""
    command = shell_quote_argv(argv)
    if spec.task_user is None:
        return f"exec {command}"
    user = spec.task_user
    token = f'"${{NOMAD_SECRETS_DIR}}/{TOKEN_FILE}"'
    missing = f"echo 'atropos-sandbox: the task runs as root and has no setpriv (util-linux) to become {user}' >&2"
    return (
        f'if [ "$(id -u)" = 0 ]; then command -v setpriv >/dev/null || {{ {missing}; exit 1; }}; '
        f'chown {user} {token} && exec setpriv --reuid {user} --regid "$(id -g {user})" --clear-groups -- '
        f"{command}; fi; exec {command}"
    )


def _apptainer(driver: SingularityDriver) -> str:
    return driver.apptainer_binary or "apptainer"  # found on each node's PATH


def _singularity_env(spec: SandboxJobSpec, driver: SingularityDriver, server_env: dict[str, str]) -> dict[str, str]:
    env = apptainer_secret_env(_apptainer(driver), server_env)
    if spec.apptainer_cache_dir:
        runtime = runtime_env_prefix(_apptainer(driver)).removesuffix("ENV_")
        env[f"{runtime}_CACHEDIR"] = spec.apptainer_cache_dir
    return env
