"""Async Nomad API client.

python-nomad makes the calls it covers (jobs, allocations, evaluations, nodes), each in a worker
thread (`asyncio.to_thread`) so the event loop never blocks; a thin httpx call makes the ones it
does not (scale, agent health, blocking queries, task logs). Every call is retried with exponential
backoff on connection errors and 5xx answers, never on 4xx, and every error is a `NomadError` that
names the endpoint and carries Nomad's message.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Literal, TypeVar, cast

import httpx
import nomad as python_nomad  # python-nomad (untyped)
import nomad.api.exceptions as python_nomad_errors
import requests
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential

from atropos.nomad.allocations import allocation_endpoint
from atropos.nomad.errors import (
    NomadConnectionError,
    NomadError,
    NomadNotFound,
    NomadRequestError,
    NomadServerError,
)
from atropos.nomad.models import Job
from atropos.nomad.responses import (
    AgentHealth,
    Allocation,
    AllocationEndpoint,
    AllocationStub,
    Evaluation,
    JobStub,
    NodeInfo,
    RegisterResponse,
)
from atropos.nomad.settings import NomadSettings

__all__ = ["NomadClient"]

log = logging.getLogger("atropos.nomad")

T = TypeVar("T")


_MAX_MESSAGE = 600


class NomadClient:
    """One Nomad cluster (settings from `NOMAD_*` by default). Use as `async with NomadClient() as c`."""

    def __init__(self, settings: NomadSettings | None = None) -> None:
        self.settings = settings or NomadSettings.from_env()
        s = self.settings
        self._http = httpx.AsyncClient(
            base_url=s.base_url, headers=s.headers(), verify=_ssl_context(s), timeout=s.timeout
        )
        self._sdk_client = python_nomad.Nomad(
            address=s.base_url,
            token=s.token.get_secret_value() if s.token else None,
            namespace=s.namespace,
            region=s.region,
            timeout=s.timeout,
            verify=s.verify,
            cert=s.cert or (),
        )

    async def __aenter__(self) -> NomadClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------------------------- jobs

    async def register_job(self, job: Job | Mapping[str, Any]) -> RegisterResponse:
        """Submit (or update) a job: `POST /v1/job/:id`."""
        body = job.to_json() if isinstance(job, Job) else dict(job)
        job_id = str(body["ID"])
        data = await self._sdk(f"POST /v1/job/{job_id}", lambda n: n.job.register_job(job_id, {"Job": body}))
        response = RegisterResponse.model_validate(data)
        if response.warnings:
            log.warning("nomad accepted job %s with warnings: %s", job_id, response.warnings.strip())
        return response

    async def put_variable(self, path: str, items: Mapping[str, str]) -> None:
        """Create or replace a Nomad Variable: `PUT /v1/var/:path` (python-nomad has no call for it)."""
        body = {"Path": path, "Items": dict(items)}
        if self.settings.namespace:
            body["Namespace"] = self.settings.namespace
        await self._request("PUT", f"/v1/var/{path}", json=body)

    async def delete_variable(self, path: str) -> bool:
        """Delete a Nomad Variable (`DELETE /v1/var/:path`); False if there was none."""
        try:
            await self._request("DELETE", f"/v1/var/{path}", as_text=True)  # Nomad answers with no body
        except NomadNotFound:
            return False
        return True

    async def read_job(self, job_id: str) -> dict[str, Any]:
        """The job as Nomad stores it (`GET /v1/job/:id`); `NomadNotFound` if there is none."""
        data = await self._sdk(f"GET /v1/job/{job_id}", lambda n: n.job.get_job(job_id))
        return cast(dict[str, Any], data)

    async def scale_job(self, job_id: str, group: str, count: int, *, message: str = "") -> RegisterResponse:
        """Set one task group's count: `POST /v1/job/:id/scale`."""
        body = {"Count": count, "Target": {"Group": group}, "Message": message or f"scale {group} to {count}"}
        data, _ = await self._request("POST", f"/v1/job/{job_id}/scale", json=body)
        return RegisterResponse.model_validate(data)

    async def stop_job(self, job_id: str, *, purge: bool = False) -> str:
        """Stop a job (and with `purge`, forget it at once): `DELETE /v1/job/:id`. Returns the eval id."""
        data = await self._sdk(f"DELETE /v1/job/{job_id}", lambda n: n.job.deregister_job(job_id, purge=purge or None))
        return str(cast(dict[str, Any], data).get("EvalID", ""))

    async def list_jobs(self, prefix: str | None = None) -> list[JobStub]:
        """Jobs whose id starts with `prefix`, with their Meta where Nomad includes it (`meta=true`)."""
        data = await self._sdk("GET /v1/jobs", lambda n: n.jobs.get_jobs(prefix=prefix, meta=True))
        return [JobStub.model_validate(item) for item in data or []]

    async def job_allocations(self, job_id: str) -> list[AllocationStub]:
        data = await self._sdk(f"GET /v1/job/{job_id}/allocations", lambda n: n.job.get_allocations(job_id))
        return [AllocationStub.model_validate(item) for item in data or []]

    async def watch_job_allocations(self, job_id: str, *, index: int, wait: float) -> tuple[int, list[AllocationStub]]:
        """Blocking query: returns once the job's allocations change after `index`, or after `wait`
        seconds; with the new index."""
        data, new_index = await self._request("GET", f"/v1/job/{job_id}/allocations", index=index, wait=wait)
        return new_index, [AllocationStub.model_validate(item) for item in data or []]

    async def watch_job_evaluations(self, job_id: str, *, index: int, wait: float) -> tuple[int, list[Evaluation]]:
        """Blocking query on the job's evaluations (see `watch_job_allocations`)."""
        data, new_index = await self._request("GET", f"/v1/job/{job_id}/evaluations", index=index, wait=wait)
        return new_index, [Evaluation.model_validate(item) for item in data or []]

    # ------------------------------------------------------------------------------ allocations

    async def read_allocation(self, alloc_id: str) -> Allocation:
        data = await self._sdk(f"GET /v1/allocation/{alloc_id}", lambda n: n.allocation.get_allocation(alloc_id))
        return Allocation.model_validate(data)

    async def stop_allocation(self, alloc_id: str) -> str:
        """Stop one allocation; Nomad places a replacement (`POST /v1/allocation/:id/stop`).
        Returns the eval id. For a server that hangs while Nomad still counts it as running."""
        data = await self._sdk(f"POST /v1/allocation/{alloc_id}/stop", lambda n: n.allocation.stop_allocation(alloc_id))
        return str(cast(dict[str, Any], data).get("EvalID", ""))

    async def allocation_endpoint(self, alloc_id: str) -> AllocationEndpoint:
        return allocation_endpoint(await self.read_allocation(alloc_id))

    async def task_log_tail(
        self, alloc_id: str, task: str, *, stream: Literal["stdout", "stderr"] = "stderr", max_bytes: int = 2048
    ) -> str:
        """The last `max_bytes` a task wrote to `stream` (`GET /v1/client/fs/logs/:alloc_id`)."""
        params = {"task": task, "type": stream, "origin": "end", "offset": str(max_bytes), "plain": "true"}
        text, _ = await self._request("GET", f"/v1/client/fs/logs/{alloc_id}", params=params, as_text=True)
        return cast(str, text)

    # ------------------------------------------------------------------------------ agent, nodes

    async def read_node(self, node_id: str) -> NodeInfo:
        """One client node as the servers see it (`GET /v1/node/:id`): its status and when it last changed."""
        data = await self._sdk(f"GET /v1/node/{node_id}", lambda n: n.node.get_node(node_id))
        return NodeInfo.model_validate(data)

    async def agent_health(self) -> AgentHealth:
        """`GET /v1/agent/health` (Nomad answers 500 with the same body when unhealthy)."""
        data, _ = await self._request("GET", "/v1/agent/health", unhealthy_ok=True)
        return AgentHealth.model_validate(data)

    # --------------------------------------------------------------------------------- plumbing

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        s = self.settings
        retrying = AsyncRetrying(
            stop=stop_after_attempt(s.attempts),
            wait=wait_exponential(multiplier=s.backoff, max=s.max_backoff),
            retry=retry_if_exception(lambda e: isinstance(e, NomadError) and e.transient),
            before_sleep=_log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await call()
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _sdk(self, endpoint: str, fn: Callable[[Any], Any]) -> Any:
        """Run a python-nomad call in a thread, with retries and errors translated."""

        async def call() -> Any:
            try:
                return await asyncio.to_thread(fn, self._sdk_client)
            except python_nomad_errors.BaseNomadException as exc:
                response = exc.nomad_resp
                if isinstance(response, requests.Response):
                    raise _status_error(endpoint, response.status_code, response.text) from None
                raise self._unreachable(endpoint, response) from None
            except requests.RequestException as exc:
                raise self._unreachable(endpoint, exc) from None
            except ValueError as exc:
                raise NomadError(endpoint, f"Nomad's answer is not valid JSON: {exc}") from None

        return await self._retrying(call)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        index: int | None = None,
        wait: float | None = None,
        as_text: bool = False,
        unhealthy_ok: bool = False,
    ) -> tuple[Any, int]:
        """One httpx call (with retries): (decoded body, X-Nomad-Index). `index`/`wait` make it a
        blocking query."""
        endpoint = f"{method} {path}"
        query = {**self.settings.scope(), **(params or {})}
        timeout = self.settings.timeout
        if index is not None and wait is not None:
            query.update(index=str(index), wait=f"{max(int(wait * 1000), 1)}ms")
            timeout += wait * 17 / 16  # Nomad adds up to wait/16 of jitter

        async def call() -> tuple[Any, int]:
            try:
                response = await self._http.request(method, path, params=query, json=json, timeout=timeout)
            except httpx.TransportError as exc:
                raise self._unreachable(endpoint, exc) from None
            if response.is_error and not (unhealthy_ok and response.status_code == 500):
                raise _status_error(endpoint, response.status_code, response.text)
            new_index = int(response.headers.get("X-Nomad-Index", "0") or 0)
            if as_text:
                return response.text, new_index
            try:
                return response.json(), new_index
            except ValueError:
                raise NomadError(endpoint, f"Nomad's answer is not JSON: {response.text[:200]!r}") from None

        return await self._retrying(call)

    def _unreachable(self, endpoint: str, cause: object) -> NomadConnectionError:
        if isinstance(cause, (httpx.TimeoutException, requests.Timeout)):
            return NomadConnectionError(endpoint, f"Nomad at {self.settings.base_url} did not answer in time")
        detail = str(cause) or type(cause).__name__
        return NomadConnectionError(endpoint, f"cannot reach Nomad at {self.settings.base_url}: {detail}")


_VALIDATION = re.compile(r"\d+ errors? occurred: \* ")


def _status_error(endpoint: str, status: int, body: str) -> NomadError:
    message = " ".join(body.split())[:_MAX_MESSAGE] or "(empty answer)"
    if status == 404:
        return NomadNotFound(endpoint, message, status=status)
    # a job that fails validation is a 500 too, in the list format of Go's multierror: final, said once
    if 400 <= status < 500 or (status == 500 and _VALIDATION.match(message)):
        return NomadRequestError(endpoint, message, status=status)
    return NomadServerError(endpoint, message, status=status)


def _ssl_context(settings: NomadSettings) -> ssl.SSLContext | bool:
    if not settings.base_url.startswith("https://"):
        return True
    context = ssl.create_default_context(cafile=settings.ca_cert)
    if settings.skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.cert is not None:
        context.load_cert_chain(*settings.cert)
    return context


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning("%s; retrying in %.1fs (attempt %d)", error, delay, state.attempt_number)
