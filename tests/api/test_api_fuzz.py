"""Schemathesis against the app's own OpenAPI schema: generated requests to every
operation (valid and invalid), with the right key for each; no response may be a 5xx."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.api.conftest import FORGET, Driver, Keys, spec, upload

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 50
VALID_SPEC = {"model": "demo", "forget": {"demo": "forget"}, "algorithm": "npo"}


def _key_for(path: str, api_keys: Keys) -> str:
    if path.startswith("/v1/audit"):
        return api_keys.auditor
    if path.startswith("/v1/keys"):
        return api_keys.admin
    return api_keys.requester


def _strategy(op: Any, job_id: str) -> Any:
    """Valid and invalid requests for one operation, plus valid ones aimed at a real,
    finished job and (for POST /v1/jobs) a valid spec, so the handlers' success paths run
    too, not only their refusals."""
    options = [op.as_strategy(GenerationMode.POSITIVE)]
    try:
        options.append(op.as_strategy(GenerationMode.NEGATIVE))
    except Exception:  # noqa: BLE001 - schemathesis refuses to negate some operations
        pass
    if "{job_id}" in op.path:
        options.append(op.as_strategy(path_parameters={"job_id": job_id}))
    if op.path == "/v1/jobs" and op.method.lower() == "post":
        options.append(op.as_strategy(body=VALID_SPEC))
    return st.one_of(*options)


def _fuzz_operation(op: Any, job_id: str, key: str) -> None:
    @given(case=_strategy(op, job_id))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,  # the same examples every run: a failure is reproducible
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case: Any) -> None:
        # Generated bearer tokens would only exercise the 401 path (covered by the
        # malformed-input tests): send a key whose role may call the operation.
        case.call_and_validate(headers=Keys.h(key), checks=[not_a_server_error])

    check()


def test_no_server_errors(app: FastAPI, client: TestClient, api_keys: Keys, driver: Driver) -> None:
    # The Python API (not schemathesis' pytest plugin, whose lazy schemas do not work
    # with this pytest version): one hypothesis run per operation.
    fid = upload(client, api_keys.requester, FORGET)
    job_id = client.post("/v1/jobs", json=spec(fid), headers=Keys.h(api_keys.requester)).json()[
        "id"
    ]
    driver.run_to_success(job_id)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        op = result.ok()
        operations += 1
        try:
            _fuzz_operation(op, job_id, _key_for(op.path, api_keys))
        except Exception as e:  # noqa: BLE001 - collect every failing operation
            failures.append(f"{op.method.upper()} {op.path}: {str(e)[:2000]}")
    assert not failures, "\n\n".join(failures)
    counts = app.state.metrics.snapshot()
    # The success paths ran: a job was submitted and the real job's results were read.
    assert counts.get(("POST", "/v1/jobs", 202), 0) > 0
    assert counts.get(("GET", "/v1/jobs/{job_id}/certificate", 200), 0) > 0
    assert counts.get(("GET", "/v1/jobs/{job_id}/events", 200), 0) > 0
    assert operations >= 17
