"""Running `raw_exec` tasks as real local processes, the way a Nomad client does.

- allocation dir layout: `<alloc>/alloc/{data,logs,tmp}` (`NOMAD_ALLOC_DIR` = `<alloc>/alloc`) and
  `<alloc>/<task>/{local,secrets,tmp}` (`NOMAD_TASK_DIR` = `<alloc>/<task>/local`);
- environment: the agent's own (raw_exec inherits it), the `NOMAD_*` runtime variables, then the
  task's `Env`; `${...}` references in `Config` and `Env` are interpolated, unknown ones left as is;
- `template` blocks rendered into the task dir before the task starts (the one form the builder
  uses: `{{ with nomadVar "PATH" }}{{ .KEY }}{{ end }}`, file mode from `Perms`); while the
  Variable is missing the task waits, as Nomad's does ("Missing: nomad.var.block(...)");
- stdout/stderr go to `alloc/logs/<task>.stdout.0` / `.stderr.0`;
- restart policy (attempts within interval, delay, mode fail), then the allocation fails;
- stop: the kill signal to the task's process, SIGKILL to its whole process group after
  `KillTimeout` or once it has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Callable, Mapping
from typing import Any

from tests.nomad_standin.state import DATACENTER, NODE_IP, REGION, AllocRecord, TaskRecord, now_ns

_REFERENCE = re.compile(r"\$\{([^}]+)\}")
_DEFAULT_KILL_TIMEOUT_NS = 5 * 10**9
_NOMAD_VAR = re.compile(r'\{\{ with nomadVar "([^"]+)" \}\}\{\{ \.(\w+) \}\}\{\{ end \}\}')


def interpolate(value: Any, env: Mapping[str, str], node: Mapping[str, str]) -> Any:
    """Nomad's runtime interpolation of `${NAME}` (env) and `${node.x}`/`${attr.x}` references."""
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name = match.group(1).strip()
            if name in env:
                return env[name]
            return node.get(name, match.group(0))

        return _REFERENCE.sub(replace, value)
    if isinstance(value, list):
        return [interpolate(v, env, node) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env, node) for k, v in value.items()}
    return value


def alloc_layout(alloc: AllocRecord, task: str) -> dict[str, str]:
    base = alloc.alloc_dir
    paths = {
        "alloc": os.path.join(base, "alloc"),
        "task": os.path.join(base, task),
        "local": os.path.join(base, task, "local"),
        "secrets": os.path.join(base, task, "secrets"),
    }
    # modes as Nomad sets them: the shared alloc dir 0755, its data/logs/tmp and the task's dirs 0777
    # (a task may run as another user than the agent)
    os.makedirs(paths["alloc"], exist_ok=True)
    os.chmod(paths["alloc"], 0o755)
    for sub in [os.path.join(paths["alloc"], d) for d in ("data", "logs", "tmp")] + [
        paths["task"],
        *(os.path.join(paths["task"], d) for d in ("local", "secrets", "tmp")),
    ]:
        os.makedirs(sub, exist_ok=True)
        os.chmod(sub, 0o777)
    return paths


def runtime_env(alloc: AllocRecord, task: Mapping[str, Any], paths: Mapping[str, str]) -> dict[str, str]:
    env = {
        "NOMAD_ALLOC_DIR": paths["alloc"],
        "NOMAD_TASK_DIR": paths["local"],
        "NOMAD_SECRETS_DIR": paths["secrets"],
        "NOMAD_ALLOC_ID": alloc.id,
        "NOMAD_SHORT_ALLOC_ID": alloc.id[:8],
        "NOMAD_ALLOC_NAME": alloc.name,
        "NOMAD_ALLOC_INDEX": str(alloc.index),
        "NOMAD_GROUP_NAME": alloc.group_name,
        "NOMAD_TASK_NAME": str(task["Name"]),
        "NOMAD_JOB_ID": alloc.job_id,
        "NOMAD_JOB_NAME": str(alloc.job.get("Name") or alloc.job_id),
        "NOMAD_NAMESPACE": alloc.namespace,
        "NOMAD_REGION": REGION,
        "NOMAD_DC": DATACENTER,
        "NOMAD_CPU_LIMIT": str((task.get("Resources") or {}).get("CPU", 100)),
        "NOMAD_MEMORY_LIMIT": str((task.get("Resources") or {}).get("MemoryMB", 300)),
    }
    for port in alloc.ports:
        inside = port.to if port.to > 0 else port.value
        env[f"NOMAD_IP_{port.label}"] = NODE_IP
        env[f"NOMAD_PORT_{port.label}"] = str(inside)
        env[f"NOMAD_ADDR_{port.label}"] = f"{NODE_IP}:{inside}"
        env[f"NOMAD_HOST_IP_{port.label}"] = NODE_IP
        env[f"NOMAD_HOST_PORT_{port.label}"] = str(port.value)
        env[f"NOMAD_HOST_ADDR_{port.label}"] = f"{NODE_IP}:{port.value}"
        env[f"NOMAD_ALLOC_PORT_{port.label}"] = str(inside)
    for meta in (alloc.job.get("Meta"), alloc.group.get("Meta"), task.get("Meta")):
        for key, value in (meta or {}).items():
            name = re.sub(r"[^A-Za-z0-9_]", "_", key)
            env[f"NOMAD_META_{name}"] = str(value)
            env[f"NOMAD_META_{name.upper()}"] = str(value)
    return env


class TaskRunner:
    """One task of one allocation: start, watch, restart per policy, kill."""

    def __init__(
        self,
        alloc: AllocRecord,
        task: dict[str, Any],
        *,
        agent_env: Mapping[str, str],
        node_attributes: Mapping[str, str],
        changed: Callable[[], None],
        start_failure: Callable[[AllocRecord], tuple[str, str] | None],
        variables: Mapping[str, Mapping[str, str]],
    ) -> None:
        self.alloc = alloc
        self.task = task
        self.name = str(task["Name"])
        self.state: TaskRecord = alloc.tasks.setdefault(self.name, TaskRecord())
        self._agent_env = agent_env
        self._node = node_attributes
        self._changed = changed
        self._start_failure = start_failure
        self._variables = variables
        self._process: asyncio.subprocess.Process | None = None
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        policy = self.alloc.group.get("RestartPolicy") or {}
        attempts = int(policy.get("Attempts", 2))
        interval_ns = int(policy.get("Interval", 30 * 60 * 10**9))
        delay_s = int(policy.get("Delay", 15 * 10**9)) / 1e9
        restarts: list[int] = []
        self.state.event("Received", "Task received by client")
        self._changed()
        try:
            while not self._stopping.is_set():
                failure = await self._run_once()
                if self._stopping.is_set():
                    break
                now = now_ns()
                restarts = [t for t in restarts if now - t < interval_ns]
                if len(restarts) >= attempts:
                    self.state.event(
                        "Not Restarting",
                        f'Exceeded allowed attempts {attempts} in interval {interval_ns // 10**9}s and mode is "fail"',
                        FailsTask=True,
                    )
                    self._finish(failed=True)
                    return
                restarts.append(now)
                reason = "Error was unrecoverable" if failure else "Restart within policy"
                self.state.event(
                    "Restarting",
                    f"Task restarting in {delay_s:g}s",
                    RestartReason=reason,
                    StartDelay=int(delay_s * 1e9),
                )
                self._changed()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay_s)
                if not self._stopping.is_set():
                    self.state.restarts += 1
                    self.state.last_restart = now_ns()
            self._finish(failed=False)
        finally:
            self._done.set()

    async def _run_once(self) -> bool:
        """Start the task once and wait for it to end; True if it could not even start."""
        paths = alloc_layout(self.alloc, self.name)
        nomad_env = runtime_env(self.alloc, self.task, paths)
        lookup = {**self._agent_env, **nomad_env}
        task_env = {k: str(interpolate(v, lookup, self._node)) for k, v in (self.task.get("Env") or {}).items()}
        env = {**self._agent_env, **nomad_env, **task_env}
        config = interpolate(self.task.get("Config") or {}, {**lookup, **task_env}, self._node)
        self.state.event("Task Setup", "Building Task Directory")
        injected = self._start_failure(self.alloc)
        if injected is not None:
            kind, message = injected
            self.state.event(
                kind,
                message,
                DriverError=message if kind == "Driver Failure" else "",
                SetupError=message if kind == "Setup Failure" else "",
                FailsTask=True,
            )
            self._changed()
            return True
        if not await self._render_templates(paths["task"]):
            return True
        logs = os.path.join(paths["alloc"], "logs")
        argv = [str(config.get("command", "")), *[str(a) for a in config.get("args") or []]]
        with (
            open(os.path.join(logs, f"{self.name}.stdout.0"), "ab") as out,
            open(os.path.join(logs, f"{self.name}.stderr.0"), "ab") as err,
        ):
            try:
                self._process = await asyncio.create_subprocess_exec(
                    *argv,
                    env=env,
                    cwd=paths["task"],
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
            except OSError as exc:
                why = "executable file not found in $PATH" if isinstance(exc, FileNotFoundError) else exc.strerror
                message = (
                    f"failed to launch command with executor: rpc error: code = Unknown desc = exec: {argv[0]!r}: {why}"
                )
                self.state.event("Driver Failure", message, DriverError=message)
                self._changed()
                return True
        self.state.state = "running"
        self.state.started_at = now_ns()
        self.alloc.client_status = "running"
        self.alloc.client_description = "Tasks are running"
        self.state.event("Started", "Task started by client")
        self._changed()
        code = await self._process.wait()
        self._kill_group(signal.SIGKILL)  # nothing the task started outlives it
        signal_no = -code if code < 0 else 0
        exit_code = code if code >= 0 else 0
        self.state.event(
            "Terminated",
            f"Exit Code: {exit_code}" + (f", Signal: {signal_no}" if signal_no else ""),
            ExitCode=exit_code,
            Signal=signal_no,
            details={"exit_code": exit_code, "signal": signal_no, "oom_killed": "false"},
        )
        self._changed()
        return False

    async def _render_templates(self, task_dir: str) -> bool:
        """Write each template's file; wait while a Variable it reads is missing. False if stopped."""
        for template in self.task.get("Templates") or []:
            source = str(template.get("EmbeddedTmpl", ""))
            match = _NOMAD_VAR.fullmatch(source.strip())
            if match is None:
                raise AssertionError(f"stand-in renders only nomadVar templates, not {source!r}")
            path, key = match.group(1), match.group(2)
            announced = False
            while path not in self._variables:
                if not announced:
                    self.state.event("Template", f"Missing: nomad.var.block({path}@default.global)")
                    self._changed()
                    announced = True
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 0.2)
                if self._stopping.is_set():
                    return False
            dest = os.path.join(task_dir, str(template["DestPath"]))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, int(str(template.get("Perms") or "0644"), 8))
            with os.fdopen(fd, "w") as fh:
                fh.write(self._variables[path].get(key, "<no value>"))
        return True

    def _finish(self, *, failed: bool) -> None:
        self.state.state = "dead"
        self.state.failed = failed
        self.state.finished_at = now_ns()
        if failed:
            self.alloc.client_status = "failed"
            self.alloc.client_description = "Failed tasks"
        else:
            self.alloc.client_status = "complete"
            self.alloc.client_description = "All tasks have completed"
        self._changed()

    async def stop(self) -> None:
        """Kill the task: its kill signal, then SIGKILL after its kill timeout."""
        if self._stopping.is_set():
            await self._done.wait()
            return
        self._stopping.set()
        process = self._process
        if process is not None and process.returncode is None:
            sig = getattr(signal, str(self.task.get("KillSignal") or "SIGINT"), signal.SIGINT)
            timeout = int(self.task.get("KillTimeout") or _DEFAULT_KILL_TIMEOUT_NS) / 1e9
            self.state.event(
                "Killing", f"Sent interrupt. Waiting {timeout:g}s before force killing", KillTimeout=int(timeout * 1e9)
            )
            self._changed()
            # like Nomad: the kill signal to the task's process, then (after the kill timeout, or
            # once it has exited) SIGKILL to everything it left behind
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except asyncio.TimeoutError:
                self._kill_group(signal.SIGKILL)
            self.state.event("Killed", "Task successfully killed")
        if self._runner is not None:
            await self._done.wait()
        self._kill_group(signal.SIGKILL)

    def _kill_group(self, sig: int) -> None:
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, sig)
