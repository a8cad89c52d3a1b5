"""Proof of deletion over HTTP (issue 15): the published signing key, signed checkpoints
of the audit chain and `verify?against=`, deletion requests with due dates and the jobs
that serve them, and the rule that a failed robustness check blocks closing a request
unless an override is recorded in the audit trail."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from service import db, proof, signing
from tests.api.conftest import FORGET, Keys, spec, upload

H = Keys.h


def _reference() -> str:
    return f"case-{uuid.uuid4().hex[:8]}"


def _new_request(client: Any, key: str, **extra: Any) -> dict[str, Any]:
    r = client.post("/v1/requests", json={"reference": _reference(), **extra}, headers=H(key))
    assert r.status_code == 201, r.text
    return r.json()


def _audit_actions(client: Any, key: str) -> list[dict[str, Any]]:
    r = client.get("/v1/audit/events", params={"limit": 1000}, headers=H(key))
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_certificate_key_is_published_and_signs_the_certificate(client, api_keys, driver):
    r = client.get("/v1/certificate-key")
    assert r.status_code == 200
    keys = r.json()["keys"]
    current = [k for k in keys if k["current"]]
    assert len(current) == 1 and current[0]["fingerprint"].startswith("SHA256:")
    fid = upload(client, api_keys.requester, FORGET)
    job = client.post("/v1/jobs", json=spec(fid), headers=H(api_keys.requester)).json()
    driver.run_to_success(job["id"])
    cert = client.get(f"/v1/jobs/{job['id']}/certificate", headers=H(api_keys.auditor)).json()
    assert cert["signature"]["key_id"] == current[0]["key_id"]
    pub = signing.load_public_key(current[0]["public_key"])
    assert signing.verify_document(cert, pub).valid
    cert["scores"]["after"]["forget_qa"]["acc"] = 0.0  # a "better" deletion, forged
    assert not signing.verify_document(cert, pub).valid
    page = client.get(f"/v1/jobs/{job['id']}/certificate", params={"format": "html"},
                      headers=H(api_keys.auditor)).text
    assert current[0]["fingerprint"] in page and "not_run" in page


def test_checkpoint_then_rewrite_fails_verify_against(app, client, api_keys):
    _new_request(client, api_keys.requester)  # at least one entry in the chain
    r = client.get("/v1/audit/checkpoints", headers=H(api_keys.auditor))
    assert r.status_code == 200, r.text
    ckpt = r.json()["current"]
    assert signing.verify_document(ckpt).valid and ckpt["seq"] >= 1
    assert client.get("/v1/audit/checkpoints", headers=H(api_keys.requester)).status_code == 403
    ok = client.get("/v1/audit/verify", params={"against": json.dumps(ckpt)},
                    headers=H(api_keys.auditor)).json()
    assert ok["ok"] is True
    bad = client.get("/v1/audit/verify", params={"against": "{not json"},
                     headers=H(api_keys.auditor))
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "against"
    # Edit the checkpoint's own entry in the database: the chain breaks, and it no longer
    # matches the checkpoint.
    with db.session_scope(app.state.session_factory) as s:
        actor = s.execute(text("SELECT actor FROM audit_log WHERE seq = :s"),
                          {"s": ckpt["seq"]}).scalar_one()
        s.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE seq = :s"),
                  {"s": ckpt["seq"]})
    try:
        r = client.get("/v1/audit/verify", params={"against": json.dumps(ckpt)},
                       headers=H(api_keys.auditor)).json()
        assert r["ok"] is False and r["first_bad_seq"] == ckpt["seq"]
        assert client.get("/v1/audit/checkpoints",
                          headers=H(api_keys.auditor)).status_code == 409
    finally:
        with db.session_scope(app.state.session_factory) as s:
            s.execute(text("UPDATE audit_log SET actor = :a WHERE seq = :s"),
                      {"a": actor, "s": ckpt["seq"]})  # the shared chain stays intact


def test_requests_have_due_dates_and_group_jobs(client, api_keys, driver):
    received = datetime.now(UTC) - timedelta(days=3)
    req = _new_request(client, api_keys.requester, received_at=received.isoformat(),
                       subject="subj-7f3a")
    assert datetime.fromisoformat(req["due_at"]) - received == timedelta(days=30)
    assert (req["status"], req["overdue"], req["jobs"]) == ("open", False, [])
    fid = upload(client, api_keys.requester, FORGET)
    r = client.post("/v1/jobs", params={"request_id": req["id"]}, json=spec(fid),
                    headers=H(api_keys.requester))
    assert r.status_code == 202, r.text
    job = r.json()
    got = client.get(f"/v1/requests/{req['id']}", headers=H(api_keys.auditor)).json()
    assert [j["job_id"] for j in got["jobs"]] == [job["id"]]
    # Closing before the job finished is refused.
    r = client.post(f"/v1/requests/{req['id']}/close", json={}, headers=H(api_keys.requester))
    assert r.status_code == 409
    driver.run_to_success(job["id"])
    cert = client.get(f"/v1/jobs/{job['id']}/certificate", headers=H(api_keys.auditor)).json()
    assert cert["deletion_request"] == {"id": req["id"], "received_at": req["received_at"],
                                        "due_at": req["due_at"]}
    r = client.post(f"/v1/requests/{req['id']}/close", json={}, headers=H(api_keys.requester))
    assert r.status_code == 200 and r.json()["status"] == "done"
    # A closed request takes no more jobs, and the refused job is not queued.
    before = client.get("/v1/jobs", headers=H(api_keys.requester)).json()["items"]
    r = client.post("/v1/jobs", params={"request_id": req["id"]},
                    json=spec(upload(client, api_keys.requester, FORGET)),
                    headers=H(api_keys.requester))
    assert r.status_code == 409 and r.json()["errors"][0]["field"] == "request_id", r.text
    assert client.get("/v1/jobs", headers=H(api_keys.requester)).json()["items"] == before
    actions = [(e["action"], e["payload"].get("request_id")) for e in
               _audit_actions(client, api_keys.auditor)]
    for a in ("request_received", "request_job_added", "request_closed"):
        assert (a, req["id"]) in actions
    # Another tenant sees nothing; an unknown request refuses the job.
    assert client.get(f"/v1/requests/{req['id']}", headers=H(api_keys.other)).status_code == 404
    other_fid = upload(client, api_keys.other, FORGET)  # corpora belong to a tenant
    r = client.post("/v1/jobs", params={"request_id": req["id"]}, json=spec(other_fid),
                    headers=H(api_keys.other))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "request_id"


def test_overdue_requests_are_listed_and_audited(client, api_keys):
    old = datetime.now(UTC) - timedelta(days=40)
    req = _new_request(client, api_keys.requester, received_at=old.isoformat())
    fresh = _new_request(client, api_keys.requester)
    r = client.get("/v1/requests", params={"overdue": "true"}, headers=H(api_keys.auditor))
    ids = [x["id"] for x in r.json()["items"]]
    assert req["id"] in ids and fresh["id"] not in ids
    events = [e for e in _audit_actions(client, api_keys.auditor)
              if e["action"] == "request_overdue" and e["payload"]["request_id"] == req["id"]]
    assert len(events) == 1
    client.get("/v1/requests", headers=H(api_keys.auditor))  # reported once only
    assert len([e for e in _audit_actions(client, api_keys.auditor)
                if e["action"] == "request_overdue"
                and e["payload"]["request_id"] == req["id"]]) == 1
    r = client.post(f"/v1/requests/{req['id']}/extend", json={"days": 61, "reason": "complex"},
                    headers=H(api_keys.requester))
    assert r.status_code == 200 and r.json()["overdue"] is False
    r = client.post(f"/v1/requests/{req['id']}/extend", json={"days": 5, "reason": "again"},
                    headers=H(api_keys.requester))
    assert r.status_code == 409


def test_bad_request_input_is_refused_with_the_field(client, api_keys):
    for body, field in [
        ({}, "reference"),
        ({"reference": "x" * 129}, "reference"),
        ({"reference": "a\x00b"}, "reference"),
        ({"reference": _reference(), "received_at": "2999-01-01T00:00:00Z"}, "received_at"),
        ({"reference": _reference(), "received_at": "2026-01-01T00:00:00"}, "received_at"),
        ({"reference": _reference(), "extra": 1}, "extra"),
    ]:
        r = client.post("/v1/requests", json=body, headers=H(api_keys.requester))
        assert r.status_code == 422, (body, r.text)
        assert field in r.json()["errors"][0]["field"], (body, r.json())
    ref = _reference()
    assert client.post("/v1/requests", json={"reference": ref},
                       headers=H(api_keys.requester)).status_code == 201
    dup = client.post("/v1/requests", json={"reference": ref}, headers=H(api_keys.requester))
    assert dup.status_code == 422
    assert client.post("/v1/requests", json={"reference": _reference()},
                       headers=H(api_keys.auditor)).status_code == 403


def test_a_failed_robustness_check_blocks_closing_without_an_override(app, client, api_keys,
                                                                        driver):
    req = _new_request(client, api_keys.requester)
    fid = upload(client, api_keys.requester, FORGET)
    job = client.post("/v1/jobs", params={"request_id": req["id"]}, json=spec(fid),
                      headers=H(api_keys.requester)).json()
    driver.claim(job["id"])
    with db.session_scope(app.state.session_factory) as s:
        proof.record_robustness(s, job["id"], driver.owner, [
            {"check": "router_restored", "verdict": "fail", "threshold": "recovery <= 0.5",
             "metrics": {"forget_acc": 0.8, "recovery": 0.9}, "reason": None},
            {"check": "relearning", "verdict": "pass", "threshold": "recovery <= 0.5",
             "metrics": {"recovery": 0.1}},
        ])
    driver.finish(job["id"], "succeeded")
    got = client.get(f"/v1/requests/{req['id']}", headers=H(api_keys.auditor)).json()
    assert got["jobs"][0]["failed_checks"] == ["router_restored"]
    evals = client.get(f"/v1/jobs/{job['id']}/evaluations", headers=H(api_keys.auditor)).json()
    rob = {(e["task"], e["metric"]): e["value"] for e in evals["items"]
           if e["phase"] == "robustness"}
    assert rob[("router_restored", "verdict")] == 0.0 and rob[("relearning", "verdict")] == 1.0
    cert = client.get(f"/v1/jobs/{job['id']}/certificate", headers=H(api_keys.auditor)).json()
    verdicts = {c["check"]: c["verdict"] for c in cert["robustness"]}
    assert verdicts == {"router_restored": "fail", "relearning": "pass",
                        "quantization": "not_run", "membership_inference": "not_run"}
    rob = client.get(f"/v1/jobs/{job['id']}/robustness", headers=H(api_keys.requester)).json()
    assert rob["failed"] == ["router_restored"]
    assert [c["check"] for c in rob["checks"]] == list(verdicts)
    assert rob["checks"][0]["metrics"] == {"forget_acc": 0.8, "recovery": 0.9}
    assert rob["checks"][2]["reason"] == "not requested by the job's spec (evaluation.robustness)"
    assert client.get(f"/v1/jobs/{job['id']}/robustness",
                      headers=H(api_keys.other)).status_code == 404  # another tenant's job
    r = client.post(f"/v1/requests/{req['id']}/close", json={}, headers=H(api_keys.requester))
    assert r.status_code == 409 and "override" in r.json()["message"]
    r = client.post(f"/v1/requests/{req['id']}/close",
                    json={"override_reason": "DPO accepted: probe on a retired router"},
                    headers=H(api_keys.requester))
    assert r.status_code == 200 and r.json()["status"] == "done"
    overrides = [e for e in _audit_actions(client, api_keys.auditor)
                 if e["action"] == "robustness_override"
                 and e["payload"]["request_id"] == req["id"]]
    assert len(overrides) == 1
    assert overrides[0]["payload"]["failed"] == {job["id"]: ["router_restored"]}


def test_a_membership_holdout_must_be_a_corpus_of_the_tenant(client, api_keys):
    fid = upload(client, api_keys.requester, FORGET)
    missing = "f" * 64
    theirs = upload(client, api_keys.other, b'{"prompt": "T?", "answer": "C."}\n')
    for holdout, field in [
        ({"corpus_id": missing}, "evaluation.robustness[0].holdout.corpus_id"),
        ({"corpus_id": theirs}, "evaluation.robustness[0].holdout.corpus_id"),  # not ours
        ({"path": "/etc/passwd"}, "evaluation.robustness[0].holdout.path"),
    ]:
        body = spec(fid, evaluation={"robustness": [
            {"check": "membership_inference", "holdout": holdout}]})
        r = client.post("/v1/jobs", json=body, headers=H(api_keys.requester))
        assert r.status_code == 422, (holdout, r.text)
        assert r.json()["errors"][0]["field"].startswith(field), (holdout, r.json())
    body = spec(fid, model="org/some-moe", evaluation={"robustness": [
        {"check": "membership_inference", "holdout": {"demo": "untrained"}}]})
    r = client.post("/v1/jobs", json=body, headers=H(api_keys.requester))
    assert r.status_code == 422 and "demo" in r.text  # demo splits only with model demo
    hid = upload(client, api_keys.requester, b'{"prompt": "P?", "answer": "B."}\n')
    body = spec(fid, evaluation={"robustness": [
        {"check": "membership_inference", "holdout": {"corpus_id": hid}}]})
    r = client.post("/v1/jobs", json=body, headers=H(api_keys.requester))
    assert r.status_code == 202, r.text
    events = client.get("/v1/audit/events", params={"limit": 1000},
                        headers=H(api_keys.auditor)).json()["items"]
    submitted = [e for e in events if e["action"] == "job_submitted"
                 and e["job_id"] == r.json()["id"]]
    assert submitted[0]["payload"]["holdout"]["corpus_id"] == hid


def test_lineage_links_jobs_started_from_earlier_outputs(app, client, api_keys, driver,
                                                         monkeypatch):
    from service import audit, jobs

    req = _new_request(client, api_keys.requester)
    ids: list[str] = []
    # A (root) -> B from A's output -> C from B's, but C's recorded base is another model.
    for model, before, after in [("demo", "ab", "cd"), (None, "cd", "ef"), (None, "00", "11")]:
        fid = upload(client, api_keys.requester, FORGET)  # deleted when a job ends
        body = spec(fid, model=model or f"job:{ids[-1]}")
        r = client.post("/v1/jobs", json=body, headers=H(api_keys.requester),
                        params={"request_id": req["id"]} if not ids else None)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        driver.claim(job_id)
        with db.session_scope(app.state.session_factory) as s:
            jobs.record_model(s, job_id, driver.owner, "/srv/models/x", before * 32)
        driver.event(job_id, 1, "result", {"unlearned_model_sha256": after * 32})
        driver.finish(job_id, "succeeded")
        ids.append(job_id)
    verified: list[int] = []  # the whole audit chain is verified once per request
    real_verify = audit.verify
    monkeypatch.setattr(audit, "verify", lambda *a, **k: verified.append(1) or real_verify(*a, **k))
    r = client.get(f"/v1/jobs/{ids[2]}/lineage", headers=H(api_keys.auditor))
    assert r.status_code == 200, r.text
    assert len(verified) == 1
    got = r.json()
    links = got["links"]
    assert [x["job_id"] for x in links] == ids
    assert links[0]["deletion_request"]["id"] == req["id"] and links[1]["deletion_request"] is None
    assert [x["model"] for x in links] == ["demo", f"job:{ids[0]}", f"job:{ids[1]}"]
    assert links[1]["continuous"] is True and links[2]["continuous"] is False
    assert got["continuous"] is False and got["cut"] is False
    assert "/srv/models" not in r.text  # the runner's path never reaches a client
    assert [c["job_id"] for c in got["certificates"]] == ids
    assert all(signing.verify_document(c).valid for c in got["certificates"])
    assert got["certificates"][2]["lineage"]["links"] == links
    assert client.get(f"/v1/jobs/{ids[0]}/lineage",
                      headers=H(api_keys.auditor)).json()["continuous"] is True
    assert client.get(f"/v1/jobs/{ids[2]}/lineage",
                      headers=H(api_keys.other)).status_code == 404
