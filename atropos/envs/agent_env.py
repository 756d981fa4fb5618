"""The Atropos environment: agent trajectories whose tool calls run in sandbox slots, rewarded by the
hidden checks of coding and shell tasks.

    python -m atropos.envs.agent_env process --env.driver=singularity --env.singularity_image=/path/x.sif \\
        --openai.base_url=http://localhost:9001/v1 --openai.model_name=NousResearch/Hermes-3-Llama-3.1-8B \\
        --env.total_steps=4 --env.group_size=4 --env.data_path_to_save_groups=rollouts.jsonl --env.use_wandb=false

`serve` feeds a trainer through the Atropos API; `process` writes scored groups as JSONL; `evaluate`
runs every task once. This is the one module of the package that needs atroposlib (extra `atropos`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Sequence
from typing import Any, Literal, TypeVar

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_cli import run_and_exit
from pydantic_cli.argparse import FailedExecutionException
from pydantic_core import PydanticUndefined

from atropos.backends import BackendKind
from atropos.envs.agent_loop import AgentSettings, Rollout, request_tools
from atropos.envs.batch import run_batch, summarize
from atropos.envs.chat import AssistantReply, ChatModel, Message, ModelError, reply_from_completion
from atropos.envs.openai_client import model_server_silence
from atropos.envs.sampling import ManagedChatModel, server_samples
from atropos.envs.task_set import Task, TaskError, load_tasks, split_ids
from atropos.envs.tokens import tokens_and_masks
from atropos.envs.tool_calls import validation_summary
from atropos.slots import InfrastructureError, PoolConfigError, SlotPool, SlotPoolConfig

logger = logging.getLogger("atropos.envs")

DEFAULT_MODEL = "NousResearch/Hermes-3-Llama-3.1-8B"
_Command = TypeVar("_Command", bound=BaseModel)
# groups in a row lost to sandbox failures before the environment gives up
_MAX_INFRA_GROUPS = 5


class AgentEnvConfig(BaseEnvConfig):  # type: ignore[misc]
    backend: BackendKind = Field(
        default="local",
        description="How sandbox servers come to exist: local (this machine), nomad or slurm (a cluster)",
    )
    driver: Literal["process", "docker", "singularity"] = Field(
        default="process", description="What runs a sandbox server: process, docker or singularity (apptainer)"
    )
    image: str | None = Field(default=None, description="Docker image of the sandbox server (driver docker)")
    singularity_image: str | None = Field(
        default=None, description="SIF path or docker:// / oras:// reference of the sandbox (driver singularity)"
    )
    nomad_address: str | None = Field(default=None, description="Nomad API address (backend nomad); else NOMAD_ADDR")
    backend_options: str | None = Field(
        default=None,
        description='JSON object of the backend\'s settings, e.g. {"partition": "cpu", "time_limit": "4:00:00", '
        '"pool_dir": "/shared/atropos"} for slurm',
    )
    slots_per_container: int = Field(default=8, ge=1, le=1024, description="Slots (workspaces) per sandbox server")
    root: Literal["system", "image", "host"] | None = Field(
        default=None,
        description="What a slot's root holds: system (the node's system dirs), image (the container's root), "
        "host (the node's whole root, read-only); unset: system on a node, image in a container",
    )
    bind_ro: str | None = Field(default=None, description="Comma-separated SRC[:DST] every slot sees read-only")
    min_containers: int = Field(default=1, ge=0, le=1000, description="Sandbox servers kept running")
    max_containers: int = Field(default=4, ge=1, le=1000, description="Sandbox servers at most")
    max_turns: int = Field(default=8, ge=1, le=1000, description="Model turns per trajectory")
    tool_timeout: float = Field(default=60.0, gt=0, description="Seconds one tool call may run")
    run_as: str = Field(
        default="nobody",
        description="Sandbox processes this run starts as root (apptainer, "
        "servers) become this user first; 'none': the server gives root up itself",
    )
    tool_call_format: Literal["hermes", "openai"] = Field(
        default="hermes", description="hermes: <tool_call> JSON in the text; openai: the API's tool_calls"
    )
    task_file: str | None = Field(default=None, description="JSONL file of tasks; the built-in tasks if unset")
    task_ids: str | None = Field(default=None, description="Comma-separated task ids to use; all if unset")
    max_tokens_per_turn: int = Field(default=1024, ge=1, description="max_tokens of each model turn")
    temperature: float = Field(default=1.0, ge=0, description="Sampling temperature of training rollouts")
    max_tool_output: int = Field(default=4000, ge=100, description="Characters of a tool result shown to the model")
    fork_setup: bool = Field(
        default=True,
        description="Run a task's setup once per sandbox server and fork every rollout's slot from it "
        "(copy-on-write); false: each rollout runs the setup in its own slot",
    )
    model_wait: float = Field(
        default=120.0, ge=0, description="Seconds to wait at start for a model server to answer before failing"
    )

    @model_validator(mode="after")
    def _pool_config_fits(self) -> AgentEnvConfig:
        self.pool_config()  # raises PoolConfigError (a ValueError) with the reason
        return self

    def pool_config(self) -> SlotPoolConfig:
        try:
            options = json.loads(self.backend_options) if self.backend_options else {}
        except ValueError as exc:
            raise PoolConfigError(f"backend_options: not JSON ({exc})") from None
        if not isinstance(options, dict):
            raise PoolConfigError('backend_options: a JSON object, e.g. {"partition": "cpu"}')
        return SlotPoolConfig.from_flags(
            backend_options=options,
            backend=self.backend,
            driver=self.driver,
            image=self.image,
            singularity_image=self.singularity_image,
            nomad_address=self.nomad_address,
            slots_per_container=self.slots_per_container,
            min_containers=self.min_containers,
            max_containers=self.max_containers,
            tool_timeout=self.tool_timeout,
            run_as=self.run_as,
            root=self.root,
            bind_ro=[b.strip() for b in (self.bind_ro or "").split(",") if b.strip()],
        )

    def agent_settings(self) -> AgentSettings:
        return AgentSettings(
            max_turns=self.max_turns,
            tool_call_format=self.tool_call_format,
            tool_timeout=self.tool_timeout,
            max_tool_output=self.max_tool_output,
            fork_setup=self.fork_setup,
        )


class ServerChatModel:
    """The policy being trained, behind atroposlib's server manager (load balancing, retries)."""

    def __init__(self, server: Any, *, split: str, max_tokens: int, temperature: float) -> None:
        self.server = server
        self.split = split
        self.max_tokens = max_tokens
        self.temperature = temperature

    async def complete(self, messages: Sequence[Message], tools: Sequence[Message] | None) -> AssistantReply:
        kwargs: dict[str, Any] = {
            "messages": list(messages),
            "n": 1,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "split": self.split,
        }
        if tools:
            kwargs["tools"] = list(tools)
        completion = await self.server.chat_completion(**kwargs)
        return reply_from_completion(completion.model_dump())


class RolloutFacts:
    """What the trainer's metrics and the logs say of a run's rollouts besides their rewards."""

    def __init__(self) -> None:
        self.rollouts = 0
        self.turns = self.tool_calls = self.malformed_calls = 0
        self.answered = self.infra_failures = self.errors = 0
        self.sandbox_time_s = 0.0

    @classmethod
    def of(cls, rollouts: list[Rollout]) -> RolloutFacts:
        facts = cls()
        facts.add(rollouts)
        return facts

    def add(self, rollouts: list[Rollout]) -> None:
        for r in rollouts:
            self.rollouts += 1
            self.turns += r.turns
            self.tool_calls += r.tool_calls
            self.malformed_calls += r.malformed_calls
            self.answered += r.finished == "answer"
            self.infra_failures += r.status == "infra_error"
            self.errors += r.status == "error"
            self.sandbox_time_s += r.sandbox_time_s

    def metrics(self, prefix: str) -> dict[str, float]:
        if not self.rollouts:
            return {}
        n = self.rollouts
        return {
            f"{prefix}turns_mean": self.turns / n,
            f"{prefix}tool_calls_mean": self.tool_calls / n,
            f"{prefix}malformed_calls_mean": self.malformed_calls / n,
            f"{prefix}finished_with_answer": self.answered / n,
            f"{prefix}infra_failure_fraction": self.infra_failures / n,
            f"{prefix}error_fraction": self.errors / n,
            f"{prefix}sandbox_time_s_mean": self.sandbox_time_s / n,
        }

    def describe(self) -> str:
        return (
            f"rollouts={self.rollouts} turns={self.turns} tool_calls={self.tool_calls} "
            f"malformed_calls={self.malformed_calls} answered={self.answered} infra_failures={self.infra_failures} "
            f"errors={self.errors} sandbox_s={self.sandbox_time_s:.2f}"
        )


class AgentEnv(BaseEnv):  # type: ignore[misc]
    name = "atropos_sandbox_agent"
    env_config_cls = AgentEnvConfig

    def __init__(self, config: AgentEnvConfig, server_configs: Any, slurm: bool = False, testing: bool = False) -> None:
        super().__init__(config, server_configs, slurm=slurm, testing=testing)
        self.config: AgentEnvConfig = config
        self.pool: SlotPool | None = None
        self.tasks: list[Task] = []
        self._cursor = 0
        self._rewards: list[float] = []
        self._facts = RolloutFacts()
        self._infra_failures = 0
        self._infra_groups_in_a_row = 0
        self._eval_metrics: dict[str, float] = {}
        # the sandbox backend is gone (too many groups in a row lost): serve stops on it, as process does
        self._sandbox_down: InfrastructureError | None = None
        self._sandbox_down_event: asyncio.Event | None = None
        self._shutting_down = False
        self._samples = False  # the model servers say what they sampled (set in setup)
        self._token_source: str | None = None

    @classmethod
    def config_init(cls) -> tuple[AgentEnvConfig, list[APIServerConfig]]:
        env_config = AgentEnvConfig(
            tokenizer_name=DEFAULT_MODEL,
            group_size=4,
            max_token_length=8192,
            total_steps=1000,
            steps_per_eval=100,
            wandb_name=cls.name,
        )
        server = APIServerConfig(
            model_name=DEFAULT_MODEL, base_url="http://localhost:9001/v1", api_key="x", num_requests_for_eval=64
        )
        return env_config, [server]

    # -- lifecycle -----------------------------------------------------------------------------

    async def setup(self) -> None:
        self.tasks = load_tasks(self.config.task_file, split_ids(self.config.task_ids))
        self._samples = server_samples(self.server)
        await self._wait_for_model_servers()
        pool = SlotPool(self.config.pool_config(), progress=_progress)
        await pool.start()
        self.pool = pool
        logger.info("event=env_ready tasks=%d", len(self.tasks))

    async def _wait_for_model_servers(self) -> None:
        """Before any slot is leased: some model server answers, or the run stops with one line
        naming them (after `model_wait` seconds, saying every few seconds that it waits)."""
        urls = sorted({str(s.config.base_url) for s in getattr(self.server, "servers", [])
                       if getattr(getattr(s, "config", None), "base_url", None)})  # fmt: skip
        if not urls:
            return  # atroposlib's test harness: no server to ask
        deadline = time.monotonic() + self.config.model_wait
        while True:
            silent = {url: why for url in urls if (why := await model_server_silence(url)) is not None}
            if len(silent) < len(urls):
                for url, why in silent.items():
                    logger.warning("event=model_server_silent url=%s reason=%s", url, why)
                return
            if time.monotonic() >= deadline:
                raise ModelError(
                    f"no model server answers ({'; '.join(f'{u}: {w}' for u, w in silent.items())}) after "
                    f"{self.config.model_wait:.0f} s; start it, or check the server's base_url (--openai.base_url)"
                )
            _progress(f"waiting for a model server ({', '.join(urls)}) before leasing any slot")
            await asyncio.sleep(min(5.0, max(deadline - time.monotonic(), 0.1)))

    async def close_pool(self) -> None:
        self._shutting_down = True
        if self.pool is not None:
            pool, self.pool = self.pool, None
            await pool.close()

    async def _closing_pool(self, run: Awaitable[None]) -> None:
        try:
            await run
        finally:
            await self.close_pool()

    # each way atroposlib runs an environment (process, serve, evaluate) ends with the pool closed
    async def process_manager(self) -> None:
        await self._closing_pool(super().process_manager())

    async def env_manager(self) -> None:
        """`serve`: atroposlib's loop catches every error of a group, so a dead sandbox backend would
        fail group after group forever; the loop is stopped here once the guard trips, with the same
        one line and exit status as `process`."""
        self._sandbox_down_event = asyncio.Event()
        manager = asyncio.ensure_future(super().env_manager())
        tripped = asyncio.ensure_future(self._sandbox_down_event.wait())
        try:
            await asyncio.wait({manager, tripped}, return_when=asyncio.FIRST_COMPLETED)
            if manager.done():
                manager.result()
                return
            manager.cancel()
            await asyncio.gather(manager, return_exceptions=True)
            assert self._sandbox_down is not None
            raise self._sandbox_down
        finally:
            tripped.cancel()
            await self.close_pool()

    async def _run_evaluate(self) -> None:
        await self._closing_pool(super()._run_evaluate())

    # -- rollouts ------------------------------------------------------------------------------

    async def get_next_item(self) -> Task:
        task = self.tasks[self._cursor % len(self.tasks)]
        self._cursor += 1
        return task

    async def rollouts(self, tasks: list[Task], split: str, temperature: float, concurrency: int) -> list[Rollout]:
        """One trajectory per task; a failing model or task makes a rollout of status "error"."""
        if self.pool is None:
            raise RuntimeError("AgentEnv.setup() has not run: no slot pool")
        if split == "train" and self._samples:
            # one tracked model per trajectory: the ids the server sampled become the training tokens
            def model_for(_task: Task) -> ChatModel:
                return ManagedChatModel(
                    self.server, self.tokenizer, max_tokens=self.config.max_tokens_per_turn, temperature=temperature
                )
        else:
            shared = ServerChatModel(
                self.server, split=split, max_tokens=self.config.max_tokens_per_turn, temperature=temperature
            )

            def model_for(_task: Task) -> ChatModel:
                return shared

        return await run_batch(self.pool, tasks, model_for, self.config.agent_settings(), concurrency)

    async def collect_trajectories(self, item: Task) -> tuple[ScoredDataGroup | None, list[Task]]:
        if self._shutting_down:  # atroposlib's workers outlive the pool on the way out: requeue, quietly
            return None, [item]
        if self._sandbox_down is not None:  # stopping: no more groups on a dead backend
            self.backlog.append(item)
            raise self._sandbox_down
        size = self.config.group_size
        rollouts = await self.rollouts([item] * size, "train", self.config.temperature, size)
        if self._shutting_down:  # the pool closed under this group (PoolClosed): requeue, quietly
            return None, [item]
        self._facts.add(rollouts)
        logger.info("event=group task=%s %s", item.id, RolloutFacts.of(rollouts).describe())
        failed = [r for r in rollouts if r.status == "error"]
        if failed:
            raise RuntimeError(f"{len(failed)} of {size} rollouts of task {item.id} failed; first: {failed[0].error}")
        lost = [r for r in rollouts if r.status == "infra_error"]
        if lost:
            # a group with sandbox failures is not trained on: its scores say nothing about the model
            self._infra_failures += len(lost)
            self._infra_groups_in_a_row += 1
            logger.warning(
                "event=group_dropped task=%s infra_failures=%d first_error=%s", item.id, len(lost), lost[0].error
            )
            if self._infra_groups_in_a_row >= _MAX_INFRA_GROUPS:
                self.backlog.append(item)  # requeued: whoever runs again gets it
                self._sandbox_down = InfrastructureError(
                    f"{_MAX_INFRA_GROUPS} groups in a row lost to sandbox failures; last: {lost[0].error}"
                )
                if self._sandbox_down_event is not None:
                    self._sandbox_down_event.set()
                raise self._sandbox_down
            return None, [item]
        self._infra_groups_in_a_row = 0
        self._rewards.extend(r.reward for r in rollouts if r.reward is not None)
        return self.scored_group(rollouts), []

    def scored_group(self, rollouts: list[Rollout]) -> ScoredDataGroup:
        tools = request_tools(self.config.tool_call_format)
        group = ScoredDataGroup(tokens=[], masks=[], scores=[], messages=[])
        sampled = [r.sampled for r in rollouts]
        on_policy = all(s is not None for s in sampled)
        source = "server" if on_policy else "retokenized"
        if source != self._token_source:  # said when it changes, not per group
            why = "the ids and logprobs the model server sampled" if on_policy else "the chat template on the text"
            logger.info("event=tokens source=%s (%s)", source, why)
            self._token_source = source
        for rollout, sample in zip(rollouts, sampled, strict=True):
            if on_policy and sample is not None:
                tokens, masks = sample.tokens, sample.masks
            else:
                tokens, masks = tokens_and_masks(self.tokenizer, rollout.messages, tools)
            group["tokens"].append(tokens)
            group["masks"].append(masks)
            group["scores"].append(float(rollout.reward or 0.0))
            group["messages"].append(rollout.messages)
        if on_policy:
            group["inference_logprobs"] = [s.logprobs for s in sampled if s is not None]
        if not self.config.include_messages:
            group["messages"] = None
        return group

    async def evaluate(self, *args: Any, **kwargs: Any) -> None:
        started = time.time()
        rollouts = await self.rollouts(self.tasks, "eval", 0.0, self.config.max_eval_workers)
        summary = summarize(rollouts, time.time() - started)
        scored = max(summary.ok, 1)
        metrics = {
            "eval/reward_mean": summary.reward_mean or 0.0,
            "eval/solved_fraction": summary.solved / scored,
            "eval/infra_failures": float(summary.infra_failures),
            "eval/errors": float(summary.errors),
        }
        self._eval_metrics = metrics
        samples = [r.model_dump(mode="json") for r in rollouts]
        await self.evaluate_log(metrics=metrics, samples=samples, start_time=started, end_time=time.time())

    async def wandb_log(self, wandb_metrics: dict[str, Any] | None = None) -> None:
        metrics = dict(wandb_metrics or {})
        if self._rewards:
            metrics["train/reward_mean"] = sum(self._rewards) / len(self._rewards)
            self._rewards = []
        metrics["train/infra_failures_total"] = self._infra_failures
        metrics.update(self._facts.metrics("train/"))
        self._facts = RolloutFacts()
        metrics.update(self._eval_metrics)
        self._eval_metrics = {}
        await super().wandb_log(metrics)

    # -- command line --------------------------------------------------------------------------

    @classmethod
    def _showing_defaults(cls, command: type[_Command]) -> type[_Command]:
        """`command` (atroposlib's CLI model, whose fields are atroposlib's classes') with the defaults
        this environment runs with (`config_init`) as its fields' defaults, so that `--help` shows
        them. Only the help reads them: atroposlib merges config_init with the flags given."""
        env, servers = cls.config_init()
        ours = {f"env.{k}": v for k, v in env.model_dump().items()}
        ours.update({f"openai.{k}": v for k, v in servers[0].model_dump().items()})
        ours["env.wandb_name"] = ours.get("env.wandb_name") or cls.name  # what `serve` fills in
        for name, value in ours.items():
            field = command.model_fields.get(name)
            if field is not None and field.default is not PydanticUndefined:
                field.default = value
        command.model_rebuild(force=True)
        return command

    @classmethod
    def cli(cls) -> None:
        """`serve | process | evaluate` from atroposlib, with configuration errors reported in one line."""
        subcommands = {
            "serve": cls._showing_defaults(cls.get_cli_serve_config_cls()),
            "process": cls._showing_defaults(cls.get_cli_process_config_cls()),
            "evaluate": cls._showing_defaults(cls.get_cli_evaluate_config_cls()),
        }
        try:
            run_and_exit(
                subcommands,
                description=f"CLI for {cls.__name__}: agent rollouts in sandbox slots",
                exception_handler=cli_error,
            )
        except KeyboardInterrupt:  # Ctrl-C: the pool closed on the way out (see env_manager); no traceback
            print("interrupted: the sandbox pool is closed", file=sys.stderr)
            sys.exit(130)


def _progress(message: str) -> None:
    print(f"[atropos-sandbox] {message}", file=sys.stderr, flush=True)


def cli_error(exc: BaseException) -> int:
    """Exit status for an error of the command line; unexpected errors keep their traceback."""
    if isinstance(exc, FailedExecutionException):
        message = str(exc.message).split("error: ")[-1]
        code = exc.exit_code
    elif isinstance(exc, ValidationError):
        prefix = "env." if exc.title == AgentEnvConfig.__name__ else ""
        message, code = f"invalid configuration: {validation_summary(exc, prefix)}", 2
    elif isinstance(exc, (PoolConfigError, TaskError)):
        message, code = str(exc), 2
    elif isinstance(exc, InfrastructureError):
        message, code = f"the sandbox pool failed: {exc}", 1
    elif isinstance(exc, ModelError):
        message, code = str(exc), 1
    else:
        raise exc
    print(f"error: {message}", file=sys.stderr)
    return int(code)


if __name__ == "__main__":
    AgentEnv.cli()
