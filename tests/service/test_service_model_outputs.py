"""A real engine run recorded by the service (issue 12): a patch-only job (`output.model:
patch`) whose num_experts auto fell back to full parameters. Its artifacts hold the base
model's reference and no model; its certificate says what ran (scope full, the capped
learning rate, the precision) beside what the spec asked, and that only a patch was
written; `job:<id>` of it resolves to its output folder, which loads as the base with the
patch applied, at the recorded patched SHA-256."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service import certificate, jobs, models
from service.db import session_scope
from service.recording import read_outputs, record_success
from tests.engine._tiny_dir import make_tiny_model_dir
from workers.job import open_model
from workers.patch import state_sha256
from workers.run import run_job
from workers.seuf_plan import FULL_FALLBACK_LR
from workers.spec import RETAIN_ROUTING_WEIGHT_FALLBACK, JobSpec


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[JobSpec, Path, object]:
    d = make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    spec = JobSpec.model_validate({
        "model": str(d / "model"),
        "forget": {"path": str(d / "forget.jsonl")},
        "retain": {"path": str(d / "retain.jsonl")},
        # Nothing can carry all the forget mass at a 1e6 ratio: auto falls back to full.
        "seuf": {"num_experts": "auto", "auto_min_share": 1.0, "auto_min_ratio": 1e6,
                 "fallback": "full"},
        "training": {"max_steps": 2, "batch_size": 8, "lr": 3e-3},
        "evaluation": {"robustness": []},
        "output": {"model": "patch"},
    })
    out = tmp_path_factory.mktemp("out")
    return spec, out, run_job(spec, out)


def test_patch_only_job_after_auto_fallback(db, tmp_path, finished) -> None:
    spec, out, res = finished
    assert res.scope == "full" and res.output_model == "patch"
    assert not (out / "model").exists()
    with session_scope(db.factory) as s:
        job = jobs.submit_job(s, spec, "acme", "key:k_1", requester="k_1",
                              allow_local_paths=True).job
    with session_scope(db.factory) as s:
        jobs.claim_next(s, "w1", 60)
    with session_scope(db.factory) as s:
        outs = read_outputs(res, out, 1 << 30, model=spec.model, job_id=job.id)
        record_success(s, job.id, "w1", outs, None)
    with session_scope(db.factory) as s:
        kinds = {a.kind for a in jobs.list_artifacts(s, job.id)}
        cert = certificate.build_certificate(s, job.id, "acme")
        page = certificate.render_html(cert)
        ref, revision = models.runner_source(s, f"job:{job.id}")
    assert "base_model" in kinds and "expert_patch" in kinds
    assert not kinds & {"model", "model_index"}
    assert cert["model"]["output"] == "patch" and cert["model"]["revision"] is None
    assert cert["model"]["sha256"] == res.base_model_sha256
    # What ran, not what the spec asked: full parameters at the capped lr.
    assert cert["method"]["scope"] == "seuf" and cert["method"]["training"]["lr"] == 3e-3
    ran = cert["ran"]
    assert ran["scope"] == "full" and ran["selection_outcome"] == "full"
    # No forget target: the spec's budget stays (a target widens it: tests/engine).
    assert ran["lr"] == FULL_FALLBACK_LR and ran["max_steps"] == 2
    assert ran["precision"]["dtype"] == "float32" and ran["selection_warning"]
    # the fallback's retain-routing guards (the defaults: every router projected, the loss on)
    assert ran["router_projection"] == "nullspace"
    assert ran["retain_routing_weight"] == RETAIN_ROUTING_WEIGHT_FALLBACK
    assert ran["fallback_projection"] == "routers" and ran["fallback_rmu_layer"] is None
    assert ran["fallback_rmu_climbs"] == []
    assert "Fallback projection" in page
    assert "the spec asked for seuf" in page and "reference only" in page
    assert "Retain routing loss weight" in page
    # job:<id> loads as the base with the patch applied, hash-checked.
    assert Path(ref) == out and revision is None
    model, _, _ = open_model(ref)
    assert state_sha256(model.state_dict()) == res.unlearned_model_sha256
    assert json.loads((out / "result.json").read_text())["training_used"]["lr"] == FULL_FALLBACK_LR


def test_certificate_names_the_layers_rmu_climbed_to() -> None:
    """RMU's fallback climbing when forgetting stalled (workers/rmu_climb.py): the
    certificate's `ran` keeps each climb's step and layer, and its page says them."""
    result = {
        "scope": "full",
        "selection": {
            "fallback_projection": "all",
            "fallback_rmu_layer": 1,
            "fallback_rmu_climbs": [
                {"step": 240, "from_layer": 1, "to_layer": 2, "forget_accuracy": 0.35,
                 "best_forget_accuracy": 0.33},
            ],
        },
    }  # fmt: skip
    ran = certificate._ran(result)
    assert ran["fallback_rmu_layer"] == 1
    assert ran["fallback_rmu_climbs"] == [{"step": 240, "to_layer": 2}]
    page = certificate.render_html({"ran": ran})
    assert "RMU steered layer 1, then layer 2 from step 240" in page


def test_certificate_says_which_attempt_the_model_is() -> None:
    """RMU's first attempt that missed its target and the other kind of plan after it
    (workers/attempt.py): the certificate's `ran` names what each trained, their steps and
    which one the written model is, and its page says it; no second attempt, no line."""
    record = {
        "kind": "top_expert",
        "first": {"scope": "full", "selected": [], "steps": 1000,
                  "forget": {"forget_accuracy": 0.38}},
        "selected": [{"layer": 0, "expert": 3, "score": 0.8}],
        "training": {"lr": 0.01, "max_steps": 150},
        "steps": 72,
        "stopped_by": "forget_accuracy",
        "target_met": True,
        "forget": {"forget_accuracy": 0.30},
        "kept": "second",
    }  # fmt: skip
    ran = certificate._ran({"scope": "seuf", "selection": {"second_attempt": record}})
    assert ran["second_attempt"] == {
        "kind": "top_expert", "first_scope": "full", "first_experts": [], "first_steps": 1000,
        "experts": ["0:3"], "steps": 72, "target_met": True, "kept": "second",
    }  # fmt: skip
    page = certificate.render_html({"ran": ran})
    assert "the projected full fallback) missed the forget target after 1000 steps" in page
    assert "expert 0:3 with the spec" in page
    assert "trained 72 steps and met it: the model is the second attempt" in page
    escalated = {
        **record, "kind": "fallback", "selected": [], "target_met": False, "kept": "first",
        "first": {"scope": "seuf", "selected": [{"layer": 1, "expert": 2}], "steps": 150},
    }  # fmt: skip
    page = certificate.render_html(
        {"ran": certificate._ran({"scope": "seuf", "selection": {"second_attempt": escalated}})}
    )
    assert "the first attempt (expert 1:2) missed the forget target after 150 steps" in page
    assert "the projected full fallback then trained 72 steps and missed it too" in page
    assert "the model is the first attempt" in page
    assert certificate._ran({"selection": {}})["second_attempt"] is None
    page = certificate.render_html({"ran": certificate._ran({"scope": "full"})})
    assert "Fallback projection" not in page and "Second attempt" not in page
