"""Schemathesis fuzzes a real server (bubblewrap, loopback) from its own /openapi.json.

Every generated request, with the token and without it, must get a response that its document
describes (status code, content type, body schema) and never a 5xx. The number of cases sent is
printed at the end (`pytest -s`) and written to `security-openapi-report.json` in pytest's basetemp.
ATROPOS_FUZZ_EXAMPLES raises the examples per operation (CI default below).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from atropos.sandbox.server.openapi import openapi_document
from tests.security_fixtures import temporary_server
from tests.server_process import RunningServer

EXAMPLES = int(os.environ.get("ATROPOS_FUZZ_EXAMPLES", "150"))
CASES: Counter[str] = Counter()


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    try:
        with temporary_server(
            "atropos-test-openapi-",
            "--slots",
            "2",
            "--isolation",
            "bwrap",
            "--network",
            "deny",
            "--timeout",
            "3",
            "--max-body",
            "1048576",
            "--max-file-bytes",
            "65536",
        ) as srv:
            yield srv
    finally:
        out = tmp_path_factory.getbasetemp() / "security-openapi-report.json"
        out.write_text(json.dumps({"examples_per_operation": EXAMPLES, **CASES}, indent=1))
        print(f"\nschemathesis cases: {dict(CASES)} (report {out})")


# the document the server serves (a test below checks it is this one), loaded before any server runs
schema = schemathesis.openapi.from_dict(openapi_document())

FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))


MAX_TIMEOUT = 3.0
MAX_CALLS = 16


def bound_cost(body: Any) -> None:
    """Keep valid cases valid but cheap: timeouts down to MAX_TIMEOUT (a fuzzed `(` in a session would
    wait a day), batches down to MAX_CALLS (4096 commands in one slot run one after the other)."""
    calls = body.get("calls") if isinstance(body, dict) else None
    if isinstance(calls, list):
        del calls[MAX_CALLS:]
    for call in calls if isinstance(calls, list) else [body]:
        timeout = call.get("timeout") if isinstance(call, dict) else None
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and MAX_TIMEOUT < timeout <= 86400:
            call["timeout"] = MAX_TIMEOUT


@schema.parametrize()
@FUZZ
def test_every_response_conforms_to_the_document(case: Any, api_server: RunningServer) -> None:
    CASES["authenticated"] += 1
    bound_cost(case.body)
    # any bytes fit an upload's schema (binary), but only a tar archive is accepted: a 400 there is right
    excluded = [positive_data_acceptance] if case.path == "/upload" else []
    response = case.call_and_validate(
        base_url=api_server.url, headers=api_server.headers, timeout=60, excluded_checks=excluded
    )
    CASES[f"status_{response.status_code}"] += 1


@schema.parametrize()
@FUZZ
def test_without_the_token_every_request_is_refused(case: Any, api_server: RunningServer) -> None:
    CASES["unauthenticated"] += 1
    headers = dict(case.headers or {})
    headers.pop("Authorization", None)
    response = case.call(base_url=api_server.url, headers=headers, timeout=60)
    CASES[f"unauthenticated_status_{response.status_code}"] += 1
    if case.path == "/health":  # the one endpoint without auth; other methods: 405
        assert response.status_code == (200 if case.method.upper() == "GET" else 405)
        return
    assert response.status_code == 401, (case.path, response.status_code, response.text)
    assert response.json() == {"error": "missing or wrong bearer token", "detail": None, "stopping": False}


def test_document_itself_needs_the_token_and_is_valid(api_server: RunningServer) -> None:
    assert httpx.get(api_server.url + "/openapi.json").status_code == 401
    doc = httpx.get(api_server.url + "/openapi.json", headers=api_server.headers).json()
    assert doc["openapi"].startswith("3.") and set(doc["paths"]) >= {"/health", "/execute", "/batch", "/reset"}
    assert doc == json.loads(json.dumps(openapi_document()))
