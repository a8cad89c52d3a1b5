"""A job whose forget target is never met (issue 13): the dispatcher records its outputs
(result, patch, model: the guard's best state) as artifacts, ends it FAILED with class
target_not_met (not retried), and its certificate says the deletion is incomplete. Real
Ray, real SQLite, the real engine on the tiny MoE of tests/dispatch/conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service import jobs
from service.certificate import build_certificate, render_html
from service.db import session_scope
from service.dispatcher import run_dispatcher
from tests.dispatch.conftest import FORGET_SUBJECTS, RETAIN_SUBJECTS, corpus_bytes
from tests.dispatch.kit import job_row, make_settings, result_event, upload
from workers.results import JobResult
from workers.spec import JobSpec

pytestmark = pytest.mark.slow


def test_a_job_that_never_meets_its_target_fails_and_keeps_its_outputs(
    db, tmp_path, ray_cluster, tiny_model_dir
):
    if db.backend != "sqlite":
        pytest.skip("the outcome does not depend on the database; SQLite covers it")
    settings = make_settings(db, tmp_path)
    spec = JobSpec.model_validate(
        {
            "model": str(tiny_model_dir),
            "forget": {"corpus_id": upload(db, settings, corpus_bytes(FORGET_SUBJECTS, 12))},
            "retain": {"corpus_id": upload(db, settings, corpus_bytes(RETAIN_SUBJECTS, 12))},
            "algorithm": "gdiff",
            "seuf": {"num_experts": 1},  # a random model: auto would fall back to full
            "training": {
                "max_steps": 4, "batch_size": 4, "max_length": 16, "lr": 0.01,
                # a forget NLL no 4 steps reach; the guard keeps the best state on the way
                "stop": {"forget_loss_target": 900.0, "eval_every": 2,
                         "utility_drop_tolerance": 1.0},
            },
            "evaluation": {"batch_size": 8},
        }
    )  # fmt: skip
    with session_scope(db.factory) as s:
        job_id = jobs.submit_job(s, spec, "t1", "tester", max_attempts=3).job.id

    stats = run_dispatcher(settings, once=True)

    assert stats.finished == {"FAILED": 1}
    job = job_row(db, job_id)
    assert (job.state, job.attempt, job.failure_class) == ("FAILED", 1, "target_not_met")
    assert "forget target was not met" in job.failure_message
    assert result_event(db, job_id).payload["target_met"] is False
    with session_scope(db.factory) as s:
        arts = {a.kind: a for a in jobs.list_artifacts(s, job_id)}
        evals = jobs.get_evaluations(s, job_id)
        cert = build_certificate(s, job_id)
    # the outputs are kept: result, patch and model (the best state the guard put back)
    assert {"result", "expert_patch", "model", "model_index"} <= set(arts)
    res = JobResult.from_json(json.loads(Path(arts["result"].location).read_text()))
    assert res.target_met is False and res.guard is not None
    assert res.guard["outcome"] == "target_not_met" and res.guard["restored_step"] is not None
    assert {e.phase for e in evals} >= {"before", "after"}
    # the certificate: FAILED, the deletion incomplete, with the class and the artifacts
    assert (cert["outcome"], cert["deletion"], cert["deletion_performed"]) == (
        "FAILED", "incomplete", False
    )  # fmt: skip
    assert cert["failure"]["class"] == "target_not_met"
    assert {a["kind"] for a in cert["artifacts"]} >= {"result", "expert_patch", "model"}
    assert "the deletion is incomplete" in render_html(cert)
