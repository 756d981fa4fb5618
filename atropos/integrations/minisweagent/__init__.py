"""mini-swe-agent (2.x) in the pool's slots: an environment loaded by class path,

    environment:
      environment_class: atropos.integrations.minisweagent.SlotEnvironment
      image: docker-archive:/tasks/django-1234.tar     # optional: the task's own image
      pool: {slots_per_container: 8, max_containers: 4} # a SlotPoolConfig, shared by every environment
                                                         # of this process that names the same one

with mini-swe-agent's `execute(action, cwd="", *, timeout=None)` contract (also the 1.x
`execute(command, cwd)`): the command runs in a fresh `bash -c` in the environment's own slot,
the answer is `{"output", "returncode", "exception_info"}`, and an output whose first line is
`COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT` (exit status 0) raises mini-swe-agent's `Submitted` with the
rest as the submission. `cleanup()` gives the slot back; the shared pools close at exit.
"""

from __future__ import annotations

import json
import platform
from typing import Any

from pydantic import BaseModel, Field

from atropos.integrations import missing_framework
from atropos.integrations.pools import shared_pool
from atropos.slots import SyncSandbox

try:
    from minisweagent.exceptions import Submitted
except ImportError as exc:  # pragma: no cover - the extra is installed where this is used
    raise missing_framework("mini-swe-agent", "mini-swe-agent", exc) from None

__all__ = ["SlotEnvironment", "SlotEnvironmentConfig"]

SUBMIT_MARKER = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"


class SlotEnvironmentConfig(BaseModel):
    pool: dict[str, Any] = Field(default_factory=dict, description="SlotPoolConfig fields of the shared pool")
    image: str | None = Field(default=None, description="the task's image (see SlotPool.acquire)")
    cwd: str = Field(default="", description="where commands run: relative to the workspace, or absolute")
    env: dict[str, str] = Field(default_factory=dict)
    timeout: int = Field(default=30, description="seconds per command")
    acquire_timeout: float | None = Field(default=None, description="seconds to wait for a free slot")


class SlotEnvironment:
    def __init__(self, *, config_class: type[SlotEnvironmentConfig] = SlotEnvironmentConfig, **kwargs: Any) -> None:
        self.config = config_class(**kwargs)
        pool = shared_pool(self.config.pool)
        self.sandbox: SyncSandbox | None = pool.open_sandbox(
            timeout=self.config.acquire_timeout, image=self.config.image
        )

    def execute(self, action: dict[str, Any] | str, cwd: str = "", *, timeout: int | None = None) -> dict[str, Any]:
        command = action if isinstance(action, str) else str(action.get("command", ""))
        if self.sandbox is None:
            raise RuntimeError("this environment was cleaned up; make a new one")
        limit = timeout or self.config.timeout
        result = self.sandbox.run(
            command, cwd=cwd or self.config.cwd or None, env=self.config.env or None, timeout=limit
        )
        output: dict[str, Any] = {
            "output": result.output,
            "returncode": result.exit_code if result.exit_code is not None else -1,
            "exception_info": f"the command timed out after {limit}s" if result.timed_out else "",
        }
        lines = result.output.lstrip().splitlines(keepends=True)
        if lines and lines[0].strip() == SUBMIT_MARKER and output["returncode"] == 0:
            submission = "".join(lines[1:])
            raise Submitted(
                {"role": "exit", "content": submission, "extra": {"exit_status": "Submitted", "submission": submission}}
            )
        return output

    def get_template_vars(self, **kwargs: Any) -> dict[str, Any]:
        return {**self.config.model_dump(), **platform.uname()._asdict(), **kwargs}

    def serialize(self) -> dict[str, Any]:
        environment = json.loads(self.config.model_dump_json())
        kind = f"{type(self).__module__}.{type(self).__name__}"
        return {"info": {"config": {"environment": environment, "environment_type": kind}}}

    def cleanup(self) -> None:
        """Give the slot back (it is reset before anyone else gets it)."""
        sandbox, self.sandbox = self.sandbox, None
        if sandbox is not None:
            sandbox.close()

    def __del__(self) -> None:
        try:
            self.cleanup()
        except Exception:  # the interpreter may be shutting down, the pool closed already
            pass
