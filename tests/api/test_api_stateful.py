"""A stateful schemathesis run over every operation (issue 14): chains of calls that
follow the OpenAPI links (submit -> read, cancel, events...; upload -> delete; create key
-> revoke; register model -> remove), at least 2,000 requests, with the right key for
each operation. No response may be a 5xx, and every status must be documented for its
operation."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Flaky
from sqlalchemy import select

from service.tables import ApiKey
from tests.api.conftest import FORGET, Keys

pytestmark = pytest.mark.slow

MIN_REQUESTS = 2000
VALID_SPEC = {"model": "demo", "forget": {"demo": "forget"}, "algorithm": "npo"}


def _key_for(path: str, method: str, api_keys: Keys) -> str:
    if path.startswith("/v1/audit"):
        return api_keys.auditor
    if path.startswith("/v1/keys") or (path.startswith("/v1/models") and method != "GET"):
        return api_keys.admin
    return api_keys.requester


def _valid_chain(client: Any, api_keys: Keys) -> list[tuple[str, str, int]]:
    """Upload a corpus, submit a job on it, read the job: each must succeed. Which chains
    hypothesis draws is random (a CI run once drew 2,100 calls with no accepted submission),
    so the success paths are shown here for certain; the random chains look for 5xx and
    undocumented statuses."""
    h = Keys.h(api_keys.requester)
    up = client.post("/v1/corpora", content=FORGET, headers=h)
    assert up.status_code == 201, up.text
    body = {**VALID_SPEC, "forget": {"corpus_id": up.json()["id"]}, "model": "demo"}
    job = client.post("/v1/jobs", json=body, headers=h)
    assert job.status_code == 202, job.text
    got = client.get(f"/v1/jobs/{job.json()['id']}", headers=h)
    assert got.status_code == 200, got.text
    return [("POST", "/v1/corpora", 201), ("POST", "/v1/jobs", 202),
            ("GET", "/v1/jobs/{job_id}", 200)]  # fmt: skip


def test_stateful_run_over_every_operation(
    app: FastAPI, client: Any, api_keys: Keys
) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    documented: dict[tuple[str, str], set[str]] = {}
    raw = app.openapi()
    for path, item in raw["paths"].items():
        for method, op in item.items():
            documented[(method.upper(), path)] = set(op["responses"])
    seen: list[tuple[str, str, int]] = _valid_chain(client, api_keys)
    problems: list[str] = []

    submits = [0]
    # The keys the run calls with (and any other test's): a revocation drawn for one of
    # them revokes a key minted for it instead, so the run keeps its keys (a revoked one
    # turned a third of some operations' calls into 401s) and revocation still runs.
    with app.state.session_factory() as s:
        kept_keys = set(s.execute(select(ApiKey.id)).scalars())

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case: Any) -> None:
            op = (case.method.upper(), case.operation.path)
            # Every other submission is a valid spec, so the chains behind a 202 (read,
            # cancel, events, results of a real job) run too, not only refusals.
            if op == ("POST", "/v1/jobs"):
                submits[0] += 1
                if submits[0] % 2 == 0:
                    case.body = dict(VALID_SPEC)
            if op == ("DELETE", "/v1/keys/{key_id}") and (
                (case.path_parameters or {}).get("key_id") in kept_keys
            ):
                minted = client.post("/v1/keys", json={"role": "requester", "tenant": "acme"},
                                     headers=Keys.h(api_keys.admin))  # fmt: skip
                assert minted.status_code == 201, minted.text
                case.path_parameters = {**case.path_parameters, "key_id": minted.json()["id"]}

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            key = _key_for(case.operation.path, case.method.upper(), api_keys)
            return {"headers": Keys.h(key)}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            op = (case.method.upper(), case.operation.path)
            status = response.status_code
            seen.append((*op, status))
            if status >= 500:
                problems.append(f"{op}: {status} {response.text[:300]}")
            elif str(status) not in documented[op] and "default" not in documented[op]:
                problems.append(f"{op}: undocumented {status} {response.text[:200]}")

    # The server's state changes under the machine (a corpus deleted with its job, a key
    # revoked), so a replayed prefix can draw differently: hypothesis calls that Flaky.
    # Like schemathesis' own runner, end that suite and start another until enough ran.
    suites = 0
    while len(seen) < MIN_REQUESTS and suites < 30:
        suites += 1
        try:
            Machine.run(
                settings=settings(
                    max_examples=100,
                    stateful_step_count=12,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
            )
        except Flaky:
            pass
    # Operations no link leads to or from (probes, metrics, audit verify) are not rules
    # of the machine: they get their own generated calls, checked the same way.
    machine_ops = {(m, p) for m, p, _ in seen}
    for result in schema.get_all_operations():
        op = result.ok()
        if (op.method.upper(), op.path) in machine_ops:
            continue

        @given(case=op.as_strategy())
        @settings(
            max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def lone(case: Any) -> None:
            m = Machine.__new__(Machine)  # only its two methods are used
            kwargs = m.get_call_kwargs(case)
            m.validate_response(case.call(**kwargs), case)

        lone()
    assert not problems, "\n".join(problems[:20])
    for key in (api_keys.requester, api_keys.auditor, api_keys.admin):  # none revoked
        assert client.get("/v1/jobs", headers=Keys.h(key)).status_code in (200, 403)
    called = {(m, p) for m, p, _ in seen}
    print(f"stateful run: {len(seen)} requests in {suites} suites, {len(called)} operations")
    assert len(seen) >= MIN_REQUESTS
    assert called == set(documented), set(documented) - called
    # Success paths were reached, not only refusals (the valid chain above, and the
    # random chains that hypothesis drew).
    ok = {(m, p) for m, p, s in seen if s < 300}
    assert {("POST", "/v1/jobs"), ("POST", "/v1/corpora"), ("GET", "/v1/jobs/{job_id}")} <= ok
