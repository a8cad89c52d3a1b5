"""The request/poll flow, idempotency, cancellation, tenant isolation, roles and the audit
trail, through FastAPI's TestClient on SQLite and PostgreSQL (see conftest `db_url`)."""

from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from api.client import Client
from service import db
from tests.api.conftest import FORGET, RETAIN, Driver, Keys, sha256, spec, upload


def test_corpus_upload_is_content_addressed(client: TestClient, api_keys: Keys) -> None:
    r1 = client.post("/v1/corpora", content=FORGET, headers=Keys.h(api_keys.requester))
    r2 = client.post("/v1/corpora", content=FORGET, headers=Keys.h(api_keys.other))
    assert r1.status_code == r2.status_code == 201
    fields = ("id", "size", "records", "format")
    assert (
        {k: r1.json()[k] for k in fields}
        == {k: r2.json()[k] for k in fields}
        == {
            "id": sha256(FORGET),
            "size": len(FORGET),
            "records": 2,
            "format": "jsonl",
        }
    )
    r3 = client.post(
        "/v1/corpora",
        content=RETAIN,
        headers=Keys.h(api_keys.requester) | {"Content-Type": "text/plain"},
    )
    assert {k: r3.json()[k] for k in fields} == {
        "id": sha256(RETAIN),
        "size": len(RETAIN),
        "records": 2,
        "format": "text",
    }
    # Each tenant holds its own record; retention 0: deleted when its last job ends.
    assert r1.json()["keep_until"] is None


def test_whole_flow(client: TestClient, app: FastAPI, api_keys: Keys, driver: Driver) -> None:
    c = Client(http=client, api_key=api_keys.requester)
    fid = c.upload_corpus(FORGET)["id"]
    rid = c.upload_corpus(RETAIN, format="text")["id"]
    job = c.submit(spec(fid, rid, training={"max_steps": 3}))
    assert job["state"] == "QUEUED" and job["attempt"] == 0
    # The stored spec is the fully resolved one: defaults filled in.
    assert job["spec"]["training"]["max_steps"] == 3
    assert job["spec"]["training"]["lr"] == 1e-4
    assert job["spec"]["forget"]["corpus_id"] == fid
    jid = job["id"]

    driver.claim(jid)
    driver.stage(jid, "unlearning")
    got = c.get(jid)
    assert (got["state"], got["stage"], got["attempt"]) == ("RUNNING", "unlearning", 1)
    first = driver.event(jid, 1, "train", {"loss": 2.5})
    page = c.events(jid)
    # set_stage also records an event of kind "stage".
    assert [(e["kind"], e["payload"]) for e in page["items"]] == [
        ("stage", {"stage": "unlearning"}),
        ("train", {"loss": 2.5}),
    ]
    assert page["items"][-1]["id"] == first
    assert page["job_state"] == "RUNNING" and page["next_since"] == first
    # Nothing new since the cursor.
    assert c.events(jid, since=page["next_since"])["items"] == []
    driver.finish(jid, "failed")  # first attempt fails; the next job runs to success

    # Its corpora went with it (retention 0): the next job needs them uploaded again.
    assert c.upload_corpus(FORGET)["id"] == fid
    assert c.upload_corpus(RETAIN, format="text")["id"] == rid
    job2 = c.submit(spec(fid, rid, training={"max_steps": 3}))
    driver.run_to_success(job2["id"], artifact=b"\x00patch\xff")
    final = c.wait(job2["id"], timeout=10, interval=0.05)
    assert final["state"] == "SUCCEEDED" and final["finished_at"] is not None
    evs = c.events(job2["id"])["items"]
    assert [(e["step"], e["kind"]) for e in evs if e["kind"] == "train"] == [
        (1, "train"),
        (2, "train"),
        (3, "train"),
    ]
    emap = c.expert_map(job2["id"])["items"]
    assert len(emap) == 8
    assert [(x["layer"], x["expert"]) for x in emap if x["selected"]] == [(1, 3)]
    assert [x["rank"] for x in emap] == list(range(1, 9))
    evals = {(e["phase"], e["task"]): e["value"] for e in c.evaluations(job2["id"])["items"]}
    assert evals == {
        ("before", "forget_qa"): 0.9,
        ("before", "retain_qa"): 0.8,
        ("after", "forget_qa"): 0.2,
        ("after", "retain_qa"): 0.79,
    }
    arts = c.artifacts(job2["id"])
    assert [(a["name"], a["size"], a["sha256"]) for a in arts] == [
        ("patch.bin", len(b"\x00patch\xff"), sha256(b"\x00patch\xff"))
    ]
    assert "location" not in arts[0]  # server paths are never exposed
    r = client.get(
        f"/v1/jobs/{job2['id']}/artifacts/{arts[0]['id']}", headers=Keys.h(api_keys.requester)
    )
    assert r.status_code == 200 and r.content == b"\x00patch\xff"
    assert r.headers["x-content-sha256"] == sha256(b"\x00patch\xff")

    cert = c.certificate(job2["id"])
    assert cert["outcome"] == "SUCCEEDED" and cert["deletion_performed"] is True
    assert cert["forget_corpus"]["sha256"] == fid
    assert cert["forget_corpus"]["size_bytes"] == len(FORGET)
    assert cert["experts"]["selected"] == [{"layer": 1, "expert": 3, "score": 0.7, "rank": 1}]
    assert cert["parameters_changed"][0]["sha256_after"] == "22" * 32
    assert cert["verification"]["chain_ok"] is True
    assert "Quellton" not in json.dumps(cert)  # corpus text never in the certificate
    page = client.get(
        f"/v1/jobs/{job2['id']}/certificate",
        params={"format": "html"},
        headers=Keys.h(api_keys.auditor),
    )
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert job2["id"] in page.text and "Quellton" not in page.text

    # Server-sent events: the stream replays every event and ends with the terminal state.
    streamed = list(c.stream_events(job2["id"]))
    assert [e["id"] for e in streamed[:-1]] == [e["id"] for e in evs]
    assert streamed[-1] == {"kind": "end", "job_state": "SUCCEEDED", "next_since": evs[-1]["id"]}

    # The listing: newest first, paginated with the cursor (page_size is 2 in the tests).
    seen: list[str] = []
    cursor = None
    while True:
        page = c.list_jobs(cursor=cursor)
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen.index(job2["id"]) < seen.index(jid)
    assert len(seen) == len(set(seen))
    failed = c.list_jobs(state="FAILED", limit=500)["items"]
    assert jid in [j["id"] for j in failed] and job2["id"] not in [j["id"] for j in failed]

    # The audit trail: what was done, by whom, verified.
    aud = Client(http=client, api_key=api_keys.auditor)
    actions = [
        e["action"] for e in aud.audit_events(limit=1000)["items"] if e["job_id"] == job2["id"]
    ]
    assert actions[0] == "job_submitted" and actions[-1] == "job_succeeded"
    assert {"job_claimed", "stage_changed", "experts_selected", "artifact_recorded"} <= set(actions)
    assert aud.audit_verify()["ok"] is True


def test_idempotency(client: TestClient, api_keys: Keys) -> None:
    h = Keys.h(api_keys.requester)
    fid = upload(client, api_keys.requester, FORGET)
    body = spec(fid)
    r1 = client.post("/v1/jobs", json=body, headers=h | {"Idempotency-Key": "req-001"})
    r2 = client.post("/v1/jobs", json=body, headers=h | {"Idempotency-Key": "req-001"})
    assert r1.status_code == r2.status_code == 202
    assert r1.json()["id"] == r2.json()["id"]
    assert (r1.headers["idempotency-replayed"], r2.headers["idempotency-replayed"]) == (
        "false",
        "true",
    )
    # Same content spelled differently (a default written out) is the same request.
    r3 = client.post(
        "/v1/jobs",
        json=body | {"scope": "seuf"},
        headers=h | {"Idempotency-Key": "req-001"},
    )
    assert r3.status_code == 202 and r3.json()["id"] == r1.json()["id"]
    r4 = client.post(
        "/v1/jobs", json=body | {"algorithm": "ga"}, headers=h | {"Idempotency-Key": "req-001"}
    )
    assert r4.status_code == 422
    assert r4.json()["errors"][0]["field"] == "Idempotency-Key"
    # Keys are per tenant: another tenant's identical key is a new job.
    r5 = client.post(
        "/v1/jobs", json=body, headers=Keys.h(api_keys.other) | {"Idempotency-Key": "req-001"}
    )
    assert r5.status_code == 202 and r5.json()["id"] != r1.json()["id"]
    # Without a key every POST is a new job.
    a = client.post("/v1/jobs", json=body, headers=h).json()["id"]
    b = client.post("/v1/jobs", json=body, headers=h).json()["id"]
    assert a != b


def test_cancellation(client: TestClient, api_keys: Keys, driver: Driver) -> None:
    h = Keys.h(api_keys.requester)
    fid = upload(client, api_keys.requester, FORGET)
    queued = client.post("/v1/jobs", json=spec(fid), headers=h).json()["id"]
    r = client.post(f"/v1/jobs/{queued}/cancel", headers=h)
    assert r.status_code == 202 and r.json()["state"] == "CANCELLED"
    assert client.post(f"/v1/jobs/{queued}/cancel", headers=h).json()["state"] == "CANCELLED"

    fid = upload(client, api_keys.requester, FORGET)  # deleted with the cancelled job
    running = client.post("/v1/jobs", json=spec(fid), headers=h).json()["id"]
    driver.claim(running)
    r = client.post(f"/v1/jobs/{running}/cancel", headers=h)
    assert r.json()["state"] == "CANCELLING" and r.json()["cancel_requested"] is True
    driver.finish(running, "cancelled")
    assert client.get(f"/v1/jobs/{running}", headers=h).json()["state"] == "CANCELLED"

    fid = upload(client, api_keys.requester, FORGET)
    done = client.post("/v1/jobs", json=spec(fid), headers=h).json()["id"]
    driver.run_to_success(done)
    r = client.post(f"/v1/jobs/{done}/cancel", headers=h)
    assert r.status_code == 409 and r.json()["errors"][0]["field"] == "state"
    # An auditor reads but never cancels.
    r = client.post(f"/v1/jobs/{done}/cancel", headers=Keys.h(api_keys.auditor))
    assert r.status_code == 403


def test_tenant_isolation(client: TestClient, api_keys: Keys, driver: Driver) -> None:
    fid = upload(client, api_keys.requester, FORGET)
    jid = client.post("/v1/jobs", json=spec(fid), headers=Keys.h(api_keys.requester)).json()["id"]
    driver.run_to_success(jid)
    art = client.get(f"/v1/jobs/{jid}/artifacts", headers=Keys.h(api_keys.requester)).json()
    aid = art["items"][0]["id"]
    missing = "00000000-0000-0000-0000-000000000000"
    for who in (api_keys.other, api_keys.other_auditor):
        for path in (
            "",
            "/events",
            "/expert-map",
            "/evaluations",
            "/artifacts",
            f"/artifacts/{aid}",
            "/certificate",
        ):
            r = client.get(f"/v1/jobs/{jid}{path}", headers=Keys.h(who))
            r_missing = client.get(f"/v1/jobs/{missing}{path}", headers=Keys.h(who))
            # Another tenant's job is indistinguishable from a missing one.
            assert r.status_code == r_missing.status_code == 404, path
            assert r.json() == r_missing.json()
        listed = client.get("/v1/jobs", params={"limit": 500}, headers=Keys.h(who)).json()
        assert jid not in [j["id"] for j in listed["items"]]
    r = client.post(f"/v1/jobs/{jid}/cancel", headers=Keys.h(api_keys.other))
    assert r.status_code == 404
    # The same tenant's auditor sees it; its audit log holds no other tenant's entries.
    assert client.get(f"/v1/jobs/{jid}", headers=Keys.h(api_keys.auditor)).status_code == 200
    ents = client.get(
        "/v1/audit/events", params={"limit": 1000}, headers=Keys.h(api_keys.other_auditor)
    ).json()["items"]
    assert ents and all(e["tenant"] == "globex" for e in ents)


def test_roles(client: TestClient, api_keys: Keys) -> None:
    fid = upload(client, api_keys.requester, FORGET)
    r = client.post("/v1/jobs", json=spec(fid), headers=Keys.h(api_keys.auditor))
    assert r.status_code == 403 and r.json()["errors"][0]["field"] == "Authorization"
    assert client.get("/v1/audit/verify", headers=Keys.h(api_keys.requester)).status_code == 403
    assert client.get("/v1/jobs", headers=Keys.h(api_keys.admin)).status_code == 403
    r = client.post(
        "/v1/keys",
        json={"role": "requester", "tenant": "initech"},
        headers=Keys.h(api_keys.requester),
    )
    assert r.status_code == 403
    r = client.post(
        "/v1/keys", json={"role": "requester", "tenant": "initech"}, headers=Keys.h(api_keys.admin)
    )
    assert r.status_code == 201
    new = r.json()
    assert (
        new["role"] == "requester" and new["tenant"] == "initech" and new["key"].startswith("mu_")
    )
    r = client.get("/v1/jobs", headers=Keys.h(new["key"]))
    assert r.status_code == 200 and r.json()["items"] == []
    # The key's creation is audited without its secret.
    ents = client.get(
        "/v1/audit/events", params={"limit": 1000}, headers=Keys.h(api_keys.auditor)
    ).json()["items"]
    assert new["key"] not in json.dumps(ents)


def _not_json(word: str) -> None:
    raise ValueError(f"{word} is not JSON")


def test_list_items_are_the_job_bodies(client: TestClient, app: FastAPI, api_keys: Keys) -> None:
    """The list passes each stored spec through as its JSON text (api/routes/jobs.py): every
    item equals the job's own GET body, across pages. On SQLite a stored spec may hold a
    non-finite number (an edited row; json.dumps writes NaN, which is not JSON): it still
    lists as JSON, exactly as GET writes it (null)."""
    h = Keys.h(api_keys.requester)
    fid = upload(client, api_keys.requester, FORGET)
    ids = [client.post("/v1/jobs", json=spec(fid), headers=h).json()["id"] for _ in range(3)]
    if app.state.engine.dialect.name == "sqlite":
        with db.session_scope(app.state.session_factory) as s:
            stored = json.loads(
                s.execute(text("SELECT spec FROM jobs WHERE id = :i"), {"i": ids[0]}).scalar_one()
            )
            stored["training"]["lr"] = float("nan")
            s.execute(
                text("UPDATE jobs SET spec = :s WHERE id = :i"),
                {"s": json.dumps(stored), "i": ids[0]},
            )
    listed: dict[str, dict[str, object]] = {}
    cursor = None
    while True:
        r = client.get("/v1/jobs", params={"cursor": cursor} if cursor else {}, headers=h)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        body = json.loads(r.content, parse_constant=_not_json)  # NaN is not JSON
        listed |= {j["id"]: j for j in body["items"]}
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    for jid in ids:
        assert listed[jid] == client.get(f"/v1/jobs/{jid}", headers=h).json()
    if app.state.engine.dialect.name == "sqlite":
        assert listed[ids[0]]["spec"]["training"]["lr"] is None  # type: ignore[index]


def test_audit_verify_catches_an_edited_row(
    client: TestClient, app: FastAPI, api_keys: Keys
) -> None:
    aud = Keys.h(api_keys.auditor)
    fid = upload(client, api_keys.requester, FORGET)
    jid = client.post("/v1/jobs", json=spec(fid), headers=Keys.h(api_keys.requester)).json()["id"]
    assert client.get("/v1/audit/verify", headers=aud).json()["ok"] is True
    entry = [
        e
        for e in client.get("/v1/audit/events", params={"job_id": jid}, headers=aud).json()["items"]
        if e["action"] == "job_submitted"
    ][0]
    tampered = dict(entry["payload"], algorithm="ga")
    with db.session_scope(app.state.session_factory) as s:
        s.execute(
            text("UPDATE audit_log SET payload = :p WHERE seq = :seq"),
            {"p": json.dumps(tampered), "seq": entry["seq"]},
        )
    try:
        r = client.get("/v1/audit/verify", headers=aud).json()
        assert r["ok"] is False
        assert r["first_bad_seq"] == entry["seq"]
        assert "modified" in r["reason"]
    finally:  # restore, so later tests start from a valid chain
        with db.session_scope(app.state.session_factory) as s:
            s.execute(
                text("UPDATE audit_log SET payload = :p WHERE seq = :seq"),
                {"p": json.dumps(entry["payload"]), "seq": entry["seq"]},
            )
    assert client.get("/v1/audit/verify", headers=aud).json()["ok"] is True


def test_health_ready_metrics(client: TestClient, api_keys: Keys) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "detail": None}
    assert client.get("/readyz").json()["status"] == "ready"
    client.get("/v1/jobs", headers=Keys.h(api_keys.requester))
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    lines = m.text.splitlines()
    jobs_by_state = {
        ln.split('"')[1]: float(ln.rsplit(" ", 1)[1])
        for ln in lines
        if ln.startswith("moe_unlearn_jobs{")
    }
    listed = client.get("/v1/jobs", params={"limit": 500}, headers=Keys.h(api_keys.auditor)).json()[
        "items"
    ]
    # Every acme job is counted in its state (the gauge covers all tenants).
    for j in listed:
        assert jobs_by_state[j["state"]] >= 1
    assert any(
        ln.startswith('moe_unlearn_http_requests_total{method="GET",route="/v1/jobs",status="200"}')
        for ln in lines
    )
    assert client.get("/docs").status_code == 200
    assert "/v1/jobs" in client.get("/openapi.json").json()["paths"]
