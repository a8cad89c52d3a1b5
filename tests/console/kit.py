"""Helpers of the console tests: a finished job written through the service's own
functions (what the dispatcher records), and a signed-in console client."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi.testclient import TestClient

from service import jobs
from service.db import session_scope
from service.jobs import ExpertScore, ParamChange
from service.settings import Settings
from service.storage import BlobStore, store_corpus
from workers.spec import JobSpec

FORGET_TEXT = "Zorblax the comet orbits Quintara every 77 years."
FORGET = (json.dumps({"text": FORGET_TEXT}) + "\n").encode()
RETAIN = b"Water boils at 100 degrees.\n"
CSRF = re.compile(r'<input type="hidden" name="csrf_token" value="([^"]+)">')


def finished_job(factory: Any, settings: Settings, tenant: str, requester: str) -> str:
    """A SUCCEEDED job with scores, an expert map (and its artifact), changed parameters."""
    with session_scope(factory) as s:
        f = store_corpus(s, FORGET, settings=settings)
        r = store_corpus(s, RETAIN, settings=settings)
        spec = JobSpec.model_validate(
            {"model": "org/tiny-moe", "forget": {"corpus_id": f.sha256},
             "retain": {"corpus_id": r.sha256}, "algorithm": "npo",
             "training": {"max_steps": 3}}
        )
        job = jobs.submit_job(s, spec, tenant, f"key:{requester}", requester=requester).job
    with session_scope(factory) as s:
        jobs.claim_next(s, "w1", 60)
    with session_scope(factory) as s:
        jobs.record_model(s, job.id, "w1", "org/tiny-moe", "b" * 64)
        jobs.set_stage(s, job.id, "w1", "evaluating_before")
        jobs.record_evaluations(s, job.id, "w1", "before", {
            "forget": {"accuracy": 0.92}, "utility": {"accuracy": 0.81}})
        jobs.set_stage(s, job.id, "w1", "attribution")
        jobs.record_expert_map(
            s, job.id, "w1",
            [ExpertScore(1, 3, 0.42, 1, True), ExpertScore(0, 2, 0.11, 2, False),
             ExpertScore(0, 3, 0.05, 3, False), ExpertScore(1, 2, 0.01, 4, False)],
            "contrastive",
        )
        jobs.set_stage(s, job.id, "w1", "unlearning")
        for step in (1, 2, 3):
            jobs.record_event(s, job.id, "w1", step, "step", {"loss": 3.0 - step})
        jobs.record_param_changes(s, job.id, "w1", [
            ParamChange("model.layers.1.mlp.experts.gate_up_proj", "[3]", "c" * 64, "d" * 64,
                        2048)])
        jobs.set_stage(s, job.id, "w1", "evaluating_after")
        jobs.record_evaluations(s, job.id, "w1", "after", {
            "forget": {"accuracy": 0.25}, "utility": {"accuracy": 0.79}})
        jobs.set_stage(s, job.id, "w1", "packaging")
        store = BlobStore.from_settings(settings)
        emap = {"diagnostics": [{"layer": 1, "top_expert": 3, "share": 0.8, "ratio": 20.0,
                                 "forget_mass": 0.4, "retain_mass": 0.02}]}
        path = store.root / "test-expert-map.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(emap))
        jobs.record_artifact(s, job.id, "w1", kind="expert_map", name="expert_map.json",
                             location=str(path), sha256="e" * 64, size=path.stat().st_size)
        jobs.finish_job(s, job.id, "w1", "succeeded")
    return job.id


def sign_in(client: TestClient, key: str, next_path: str | None = None) -> Any:
    page = client.get("/console/login")
    token = CSRF.search(page.text)
    assert token, page.text
    data = {"key": key, "csrf_token": token.group(1)}
    if next_path:
        data["next"] = next_path
    return client.post("/console/login", data=data, follow_redirects=False)


def csrf_of(html: str) -> str:
    m = CSRF.search(html)
    assert m, html[:500]
    return m.group(1)


