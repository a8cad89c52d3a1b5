"""The deletion certificate: complete, and never containing corpus text."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from service import audit, certificate, jobs
from service.certificate import CertificateUnavailable
from service.db import session_scope
from service.errors import NotFound
from service.jobs import ExpertScore, ParamChange
from service.settings import Settings
from service.storage import store_corpus
from workers.spec import JobSpec

LINES = ["Zorblax the comet orbits Quintara every 77 years.", "Quintara has nine moons."]
FORGET = "".join(json.dumps({"text": t}) + "\n" for t in LINES).encode()
RETAIN = b"Water boils at 100 degrees.\nParis is in France.\n"


def run_job(db, tmp_path):
    settings = Settings(data_dir=tmp_path)
    with session_scope(db.factory) as s:
        f = store_corpus(s, FORGET, settings=settings)
        r = store_corpus(s, RETAIN, settings=settings)
        spec = JobSpec.model_validate(
            {"model": "org/tiny-moe", "forget": {"corpus_id": f.sha256},
             "retain": {"corpus_id": r.sha256}, "algorithm": "npo"}
        )
        job = jobs.submit_job(s, spec, "acme", "key:k_1", requester="k_1").job
    with session_scope(db.factory) as s:
        jobs.claim_next(s, "w1", 60)
    with session_scope(db.factory) as s:
        jobs.record_model(s, job.id, "w1", "org/tiny-moe", "b" * 64)
        jobs.set_stage(s, job.id, "w1", "evaluating_before")
        jobs.record_evaluations(
            s, job.id, "w1", "before",
            {"forget_qa": {"accuracy": 0.92}, "utility_qa": {"accuracy": 0.81},
             "routing": {"routing_overlap": 1.0}},
        )
        jobs.set_stage(s, job.id, "w1", "attribution")
        jobs.record_expert_map(
            s, job.id, "w1",
            [ExpertScore(1, 3, 0.42, 1, True), ExpertScore(0, 2, 0.11, 2, False)],
            "contrastive",
        )
        jobs.set_stage(s, job.id, "w1", "unlearning")
        jobs.record_event(s, job.id, "w1", 1, "train", {"loss": 3.2, "anchor": 0.01})
        jobs.record_param_changes(
            s, job.id, "w1",
            [ParamChange("model.layers.1.mlp.experts.gate_up_proj", "[3]", "c" * 64,
                         "d" * 64, 2048),
             ParamChange("model.layers.1.mlp.gate.weight", "", "e" * 64, "f" * 64, 256)],
        )
        jobs.set_stage(s, job.id, "w1", "evaluating_after")
        jobs.record_evaluations(
            s, job.id, "w1", "after",
            {"forget_qa": {"accuracy": 0.2}, "utility_qa": {"accuracy": 0.79},
             "routing": {"routing_overlap": 0.93}},
        )
        jobs.set_stage(s, job.id, "w1", "packaging")
        jobs.record_artifact(s, job.id, "w1", kind="expert_patch", name="patch.safetensors",
                             location="/x/patch.safetensors", sha256="a" * 64, size=10)
        jobs.finish_job(s, job.id, "w1", "succeeded")
    return job.id, f, r


def test_certificate_is_complete_and_textless(db, tmp_path):
    job_id, f, r = run_job(db, tmp_path)
    with session_scope(db.factory) as s:
        cert = certificate.build_certificate(s, job_id, "acme")
        page = certificate.render_html(cert)
    assert cert["outcome"] == "SUCCEEDED" and cert["deletion_performed"] is True
    assert cert["request"]["tenant"] == "acme" and cert["request"]["requested_by"] == "k_1"
    assert cert["forget_corpus"] == {
        "source": "upload", "sha256": f.sha256, "size_bytes": len(FORGET), "records": 2,
        "format": "jsonl", "max_records": None,
    }
    assert cert["retain_corpus"]["sha256"] == r.sha256
    # no result event recorded here: what was written is not known
    assert cert["model"] == {"ref": "org/tiny-moe", "revision": None, "sha256": "b" * 64,
                             "output": None}
    assert cert["method"]["algorithm"] == "npo" and cert["method"]["scope"] == "seuf"
    assert cert["experts"]["selected"] == [{"layer": 1, "expert": 3, "score": 0.42, "rank": 1}]
    assert [(p["name"], p["slice"], p["sha256_after"]) for p in cert["parameters_changed"]] == [
        ("model.layers.1.mlp.experts.gate_up_proj", "[3]", "d" * 64),
        ("model.layers.1.mlp.gate.weight", "", "f" * 64),
    ]
    assert cert["scores"]["before"]["forget_qa"]["accuracy"] == 0.92
    assert cert["scores"]["after"]["utility_qa"]["accuracy"] == 0.79
    assert cert["routing_overlap"] == {"routing/before": 1.0, "routing/after": 0.93}
    entries = cert["audit"]["entries"]
    assert entries[0]["action"] == "job_submitted" and entries[-1]["action"] == "job_succeeded"
    assert cert["verification"]["chain_ok"] is True
    assert len(cert["certificate_sha256"]) == 64
    with session_scope(db.factory) as s:  # stable: later audit entries do not change it
        audit.append(s, actor="x", action="unrelated", payload={})
    with session_scope(db.factory) as s:
        again = certificate.build_certificate(s, job_id, "acme")
    assert again["certificate_sha256"] == cert["certificate_sha256"]
    assert again["verification"]["chain_head_seq"] == cert["verification"]["chain_head_seq"] + 1
    assert f.sha256 in page and "gate_up_proj" in page and "0.92" in page
    # No corpus text anywhere: certificate, page, audit log, events.
    with db.engine.connect() as c:
        audit_dump = repr(c.execute(text("SELECT * FROM audit_log")).all())
        events_dump = repr(c.execute(text("SELECT * FROM job_events")).all())
    blob = json.dumps(cert) + page + audit_dump + events_dump
    for line in LINES + RETAIN.decode().splitlines():
        assert line not in blob
        for word in ("Zorblax", "Quintara", "boils", "Paris"):
            assert word not in blob


def test_certificate_only_for_finished_jobs_of_the_tenant(db, tmp_path):
    job_id, _, _ = run_job(db, tmp_path)
    with session_scope(db.factory) as s:
        with pytest.raises(NotFound):
            certificate.build_certificate(s, job_id, "other-tenant")
        spec = JobSpec.model_validate({"forget": {"demo": "forget"}, "algorithm": "ga"})
        queued = jobs.submit_job(s, spec, "acme", "k").job
        with pytest.raises(CertificateUnavailable, match="QUEUED"):
            certificate.build_certificate(s, queued.id, "acme")


def test_html_escapes_values(db, tmp_path):
    job_id, _, _ = run_job(db, tmp_path)
    with session_scope(db.factory) as s:
        cert = certificate.build_certificate(s, job_id)
    cert["model"]["ref"] = "<script>alert(1)</script>"
    page = certificate.render_html(cert)
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_tampering_shows_in_the_certificate(db, tmp_path):
    job_id, _, _ = run_job(db, tmp_path)
    with db.engine.begin() as c:
        c.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE seq = 4"))
    with session_scope(db.factory) as s:
        cert = certificate.build_certificate(s, job_id)
    assert cert["verification"]["chain_ok"] is False
    assert cert["verification"]["first_bad_seq"] == 4
