"""Issue 14: each finding of the attack on `moe-unlearn serve` as a test that fails on the
code before it (models, corpora ownership and retention, non-finite and oversized input,
bounds, quotas and rates, keys, metrics, error texts, OpenAPI statuses). SQLite and
PostgreSQL (conftest `db_url`). The upload memory and live streams: test_api_security_live.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from api.app import create_app
from service import db, jobs, keys
from service.settings import Settings
from service.tables import ApiKey, AuditEntry, Corpus, CorpusRecord
from tests.api.conftest import FORGET, RETAIN, Driver, Keys, serve_in_thread, spec, upload

DEMO = {"model": "demo", "forget": {"demo": "forget"}, "algorithm": "npo"}


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def new_key(app: FastAPI, role: str, tenant: str, **kw: Any) -> tuple[str, str]:
    with db.session_scope(app.state.session_factory) as s:
        return keys.create_key(s, role, tenant, actor="test", **kw)


def _audit(app: FastAPI, action: str, tenant: str | None = None) -> list[AuditEntry]:
    with db.session_scope(app.state.session_factory) as s:
        stmt = select(AuditEntry).where(AuditEntry.action == action)
        if tenant is not None:
            stmt = stmt.where(AuditEntry.tenant == tenant)
        return list(s.execute(stmt.order_by(AuditEntry.seq)).scalars())


@pytest.fixture
def tight(settings: Settings, tmp_path: Path) -> Any:
    """Build an app on the shared database with some settings changed (own limiter)."""
    made: list[FastAPI] = []

    def build(**over: Any) -> tuple[FastAPI, TestClient]:
        app = create_app(settings.model_copy(update=over))
        made.append(app)
        return app, TestClient(app, raise_server_exceptions=False)

    yield build
    for app in made:
        app.state.engine.dispose()


# ----------------------------------------------------------------------------- models

BAD_MODELS = [
    "/etc",
    "../../etc/passwd",
    "/root/.ssh",
    "file:///etc/passwd",
    "~/.cache",
    "org/any-hub-model",
    "job:not-a-job",
    "job:00000000-0000-0000-0000-000000000000",
    "unregistered-name",
]


@pytest.mark.parametrize("model", BAD_MODELS)
def test_every_bad_model_form_is_refused_alike(
    client: TestClient, api_keys: Keys, model: str
) -> None:
    fid = upload(client, api_keys.requester, FORGET)
    r = client.post("/v1/jobs", json=spec(fid, model=model), headers=Keys.h(api_keys.requester))
    assert r.status_code == 422, r.text
    err = r.json()["errors"][0]
    assert err["field"] == "model"
    # One message whether or not the path or job exists: no oracle, no path echoed.
    assert err["reason"].startswith("not an allowed model")
    assert model not in err["reason"]


def test_allowed_models_and_job_chaining(
    app: FastAPI, client: TestClient, api_keys: Keys, driver: Driver, tight: Any, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    (root / "tiny").mkdir(parents=True)
    app2, c2 = tight(model_dir=root, model_allowlist=r"trusted-org/[a-z-]+")
    admin = Keys.h(api_keys.admin)
    req = Keys.h(api_keys.requester)
    # Registration: a directory under the root, never outside it.
    r = c2.post("/v1/models", json={"id": "evil", "path": "/etc"}, headers=admin)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "path"
    r = c2.post("/v1/models", json={"id": "evil", "path": "../../"}, headers=admin)
    assert r.status_code == 422
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    r = c2.post("/v1/models", json={"id": name, "path": "tiny"}, headers=admin)
    assert r.status_code == 201 and r.json()["source"] == "directory", r.text
    assert "path" not in r.json()  # no server path is returned
    assert (
        c2.post("/v1/models", json={"id": name, "path": "tiny"}, headers=admin).status_code == 409
    )
    hub = f"hub-{uuid.uuid4().hex[:6]}"
    r = c2.post("/v1/models", json={"id": hub, "hub_id": "org/model"}, headers=admin)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "revision"
    r = c2.post(
        "/v1/models", json={"id": hub, "hub_id": "org/model", "revision": "abc123"}, headers=admin
    )
    assert r.status_code == 201
    listed = c2.get("/v1/models", headers=req).json()
    assert {name, hub} <= {m["id"] for m in listed["items"]} and listed["allowlist"] is True
    assert c2.post("/v1/models", json={"id": "x", "path": "tiny"}, headers=req).status_code == 403

    fid = upload(c2, api_keys.requester, FORGET)
    for model in (name, hub, "trusted-org/small-moe"):
        r = c2.post("/v1/jobs", json=spec(fid, model=model), headers=req)
        assert r.status_code == 202, (model, r.text)
        assert r.json()["spec"]["model"] == model  # the stored spec keeps the client's name
    # The runner gets the registered directory (claimed oldest first for this tenant).
    with db.session_scope(app.state.session_factory) as s:
        claimed = jobs.claim_next(s, "test-claimer", 60)
        assert claimed is not None and claimed.spec["model"] == str(root / "tiny")
        jobs.finish_job(s, claimed.id, "test-claimer", "failed")
    # job:<id>: only a SUCCEEDED job of the caller's own tenant.
    fid = upload(c2, api_keys.requester, FORGET)
    queued = c2.post("/v1/jobs", json=spec(fid), headers=req).json()["id"]
    r = c2.post("/v1/jobs", json=spec(fid, model=f"job:{queued}"), headers=req)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "model"
    c2.post(f"/v1/jobs/{queued}/cancel", headers=req)
    with db.session_scope(app.state.session_factory) as s:  # leave nothing queued
        for j in jobs.list_jobs(s, "acme", state="QUEUED", limit=100).items:
            jobs.request_cancel(s, j.id, None, actor="test")
    fid = upload(c2, api_keys.requester, FORGET)
    done = c2.post("/v1/jobs", json=spec(fid), headers=req).json()["id"]
    driver.run_to_success(done)
    fid = upload(c2, api_keys.requester, FORGET)
    r = c2.post("/v1/jobs", json=spec(fid, model=f"job:{done}"), headers=req)
    assert r.status_code == 202, r.text
    gid = upload(c2, api_keys.other, FORGET)
    r = c2.post("/v1/jobs", json=spec(gid, model=f"job:{done}"), headers=Keys.h(api_keys.other))
    assert r.status_code == 422 and r.json()["errors"][0]["reason"].startswith("not an allowed")
    assert c2.delete(f"/v1/models/{hub}", headers=admin).status_code == 204
    assert c2.delete(f"/v1/models/{hub}", headers=admin).status_code == 404
    assert _audit(app, "model_registered") and _audit(app, "model_removed")


# ----------------------------------------------------------------------------- corpora


def test_cross_tenant_corpus_is_refused_like_an_unknown_one(
    app: FastAPI, client: TestClient, api_keys: Keys
) -> None:
    data = FORGET + f'{{"text": "only acme has this {uuid.uuid4().hex}"}}\n'.encode()
    fid = upload(client, api_keys.requester, data)
    other = Keys.h(api_keys.other)
    theirs = client.post("/v1/jobs", json=spec(fid), headers=other)
    unknown = client.post("/v1/jobs", json=spec("ab" * 32), headers=other)
    assert theirs.status_code == unknown.status_code == 422
    assert theirs.json() == unknown.json()
    # ... and deleting it is a 404 like an unknown id; both attempts are audited for acme.
    assert client.delete(f"/v1/corpora/{fid}", headers=other).status_code == 404
    denied = [e for e in _audit(app, "cross_tenant_denied", "acme") if e.payload["id"] == fid]
    assert len(denied) == 2 and all(e.payload["caller_tenant"] == "globex" for e in denied)
    # globex's audit log shows nothing of acme's corpus.
    ents = client.get(
        "/v1/audit/events", params={"limit": 1000}, headers=Keys.h(api_keys.other_auditor)
    ).json()["items"]
    assert fid not in str(ents)


def test_same_bytes_two_tenants_each_own_a_record(
    app: FastAPI, client: TestClient, api_keys: Keys, driver: Driver
) -> None:
    data = f'{{"text": "shared {uuid.uuid4().hex}"}}\n'.encode()
    fid = upload(client, api_keys.requester, data)
    assert upload(client, api_keys.other, data) == fid
    with db.session_scope(app.state.session_factory) as s:
        rows = s.execute(select(CorpusRecord).where(CorpusRecord.sha256 == fid)).scalars().all()
        assert sorted(r.tenant for r in rows) == ["acme", "globex"]
        blob = Path(s.get(Corpus, fid).location)  # type: ignore[union-attr]
    job = client.post("/v1/jobs", json=spec(fid), headers=Keys.h(api_keys.requester)).json()
    driver.run_to_success(job["id"])
    # acme's record is gone with its job; globex still holds the blob.
    listed = client.get("/v1/corpora", headers=Keys.h(api_keys.requester)).json()["items"]
    assert fid not in [c["id"] for c in listed]
    assert fid in [
        c["id"] for c in client.get("/v1/corpora", headers=Keys.h(api_keys.other)).json()["items"]
    ]
    assert blob.is_file()
    assert client.delete(f"/v1/corpora/{fid}", headers=Keys.h(api_keys.other)).status_code == 204
    assert not blob.is_file()  # no record holds it any more
    with db.session_scope(app.state.session_factory) as s:
        rows = s.execute(select(CorpusRecord).where(CorpusRecord.sha256 == fid)).scalars().all()
        # Deleted records keep hash, size and record count.
        assert all(
            r.deleted_at is not None and r.size == len(data) and r.records == 1 for r in rows
        )
    reasons = sorted(
        e.payload["reason"] for e in _audit(app, "corpus_deleted") if e.payload["corpus_id"] == fid
    )
    assert reasons == ["deleted_by_client", "job_ended"]


def test_corpus_deleted_after_its_last_job_unless_kept(
    app: FastAPI, client: TestClient, api_keys: Keys, driver: Driver
) -> None:
    h = Keys.h(api_keys.requester)
    fid = upload(client, api_keys.requester, f'{{"text": "{uuid.uuid4().hex}"}}\n'.encode())
    rid = upload(client, api_keys.requester, f"retain {uuid.uuid4().hex}\n".encode())
    first = client.post("/v1/jobs", json=spec(fid, rid), headers=h).json()["id"]
    second = client.post("/v1/jobs", json=spec(fid), headers=h).json()["id"]
    # In use: not deletable.
    r = client.delete(f"/v1/corpora/{fid}", headers=h)
    assert r.status_code == 409 and r.json()["errors"][0]["field"] == "corpus_id"
    driver.run_to_success(first)
    ids = {c["id"] for c in client.get("/v1/corpora", headers=h).json()["items"]}
    assert fid in ids and rid not in ids  # the second job still needs the forget corpus
    client.post(f"/v1/jobs/{second}/cancel", headers=h)
    ids = {c["id"] for c in client.get("/v1/corpora", headers=h).json()["items"]}
    assert fid not in ids
    # The deleted corpus cannot be named again until uploaded again.
    r = client.post("/v1/jobs", json=spec(fid), headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "forget.corpus_id"
    # retention_days keeps it past its job.
    kept_data = f'{{"text": "kept {uuid.uuid4().hex}"}}\n'.encode()
    r = client.post("/v1/corpora", params={"retention_days": 3}, content=kept_data, headers=h)
    assert r.status_code == 201 and r.json()["keep_until"] is not None
    kept = r.json()["id"]
    job = client.post("/v1/jobs", json=spec(kept), headers=h).json()["id"]
    driver.run_to_success(job)
    assert kept in {c["id"] for c in client.get("/v1/corpora", headers=h).json()["items"]}
    r = client.post("/v1/corpora", params={"retention_days": 100000}, content=kept_data, headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "retention_days"


def test_storage_quota(tight: Any, api_keys: Keys) -> None:
    _app, c = tight(corpus_quota_bytes=100)
    tenant = _tenant()
    _, key = new_key(_app, "requester", tenant)
    h = Keys.h(key)
    assert c.post("/v1/corpora", content=b"x" * 60 + b"\n", headers=h).status_code == 201
    r = c.post("/v1/corpora", content=b"y" * 60 + b"\n", headers=h)
    assert r.status_code == 413 and "quota" in r.json()["errors"][0]["reason"]
    listed = c.get("/v1/corpora", headers=h).json()
    assert (listed["used_bytes"], listed["quota_bytes"]) == (61, 100)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"text": "a", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", "nested deeper"),
        (b'{"text": "a", "x": ' + b"[" * 40 + b"]" * 40 + b"}\n", "nested deeper"),
        (b'{"text": "a", "x": ' + b"9" * 5000 + b"}\n", "more than 100 digits"),
        (b'{"text": "a", "x": NaN}\n', "NaN is not valid JSON"),
        (b'{"text": "a", "x": -Infinity}\n', "Infinity is not valid JSON"),
        (b'{"text": "' + b"a" * 25_000 + b'"}\n', "longer than the record limit"),
    ],
)
def test_corpus_nesting_huge_numbers_and_long_records(
    tight: Any, api_keys: Keys, body: bytes, needle: str
) -> None:
    _app, c = tight(max_corpus_record_bytes=20_000, max_corpus_bytes=100_000)
    r = c.post("/v1/corpora", content=body, headers=Keys.h(api_keys.requester))
    assert r.status_code == 422, r.text
    assert needle in r.json()["errors"][0]["reason"]


def test_jsonl_split_on_newline_only(client: TestClient, api_keys: Keys) -> None:
    data = '{"text": "a\u2028b"}\n{"text": "c\u0085d\u2029e"}\r\n'.encode()
    r = client.post("/v1/corpora", content=data, headers=Keys.h(api_keys.requester))
    assert r.status_code == 201, r.text
    assert (r.json()["records"], r.json()["format"]) == (2, "jsonl")


# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_422(client: TestClient, api_keys: Keys, token: bytes) -> None:
    body = b'{"model": "demo", "forget": {"demo": "forget"}, "algorithm": "npo", '
    body += b'"objective": {"simnpo_delta": ' + token + b"}}"
    r = client.post(
        "/v1/jobs",
        content=body,
        headers=Keys.h(api_keys.requester) | {"Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "objective.simnpo_delta"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        (b'{"training": {"seed": ' + b"9" * 5000 + b"}}", "number too large"),
    ],
)
def test_deep_or_huge_json_bodies_are_400(
    client: TestClient, api_keys: Keys, body: bytes, needle: str
) -> None:
    r = client.post(
        "/v1/jobs",
        content=body,
        headers=Keys.h(api_keys.requester) | {"Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    assert needle in r.json()["errors"][0]["reason"]


@pytest.mark.parametrize(
    ("part", "field"),
    [
        ({"training": {"max_steps": 10**30}}, "training.max_steps"),
        ({"training": {"batch_size": 10**9}}, "training.batch_size"),
        ({"training": {"max_length": 10**9}}, "training.max_length"),
        ({"seuf": {"anchor_weight": 1e308}}, "seuf.anchor_weight"),
        ({"objective": {"retain_weight": 1e308}}, "objective.retain_weight"),
        ({"evaluation": {"tasks": ["t"] * 1000}}, "evaluation.tasks"),
        ({"distributed": {"num_workers": 256}}, "distributed.num_workers"),
        ({"world": {"seed": 1000}}, "world.seed"),
    ],
)
def test_bounds(client: TestClient, api_keys: Keys, part: dict[str, Any], field: str) -> None:
    r = client.post("/v1/jobs", json=DEMO | part, headers=Keys.h(api_keys.requester))
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == field
    if field == "distributed.num_workers":  # refused at submit with the numbers
        assert r.json()["errors"][0]["reason"] == "256 workers need 256 CPUs; the cluster offers 2"


def test_default_attempt_timeout() -> None:
    assert Settings().attempt_timeout_s == 6 * 3600


# ----------------------------------------------------------------------------- load


def test_queued_job_limit_is_429_with_retry_after(tight: Any) -> None:
    app, c = tight(max_queued_jobs=2)
    _, key = new_key(app, "requester", _tenant())
    h = Keys.h(key)
    assert [c.post("/v1/jobs", json=DEMO, headers=h).status_code for _ in range(2)] == [202, 202]
    r = c.post("/v1/jobs", json=DEMO, headers=h)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    # Another tenant is not affected.
    _, other = new_key(app, "requester", _tenant())
    assert c.post("/v1/jobs", json=DEMO, headers=Keys.h(other)).status_code == 202


def test_per_key_rate_is_429_with_retry_after(tight: Any) -> None:
    app, c = tight(rate_per_key=0.01, rate_burst=5)
    _, key = new_key(app, "requester", _tenant())
    codes = [c.get("/v1/jobs", headers=Keys.h(key)).status_code for _ in range(7)]
    assert codes == [200] * 5 + [429] * 2
    r = c.get("/v1/jobs", headers=Keys.h(key))
    assert int(r.headers["Retry-After"]) == 100  # one token per 100 s
    # Another key has its own bucket.
    _, other = new_key(app, "requester", _tenant())
    assert c.get("/v1/jobs", headers=Keys.h(other)).status_code == 200
    assert 'moe_unlearn_denied_total{reason="throttled"} 3.0' in c.get("/metrics").text


def test_stream_limit_and_lifetime(tight: Any, api_keys: Keys) -> None:
    app, c = tight(max_streams_per_tenant=1, stream_max_s=1.0)
    tenant = _tenant()
    _, key = new_key(app, "requester", tenant)
    h = Keys.h(key) | {"Accept": "text/event-stream"}
    job = c.post("/v1/jobs", json=DEMO, headers=Keys.h(key)).json()["id"]
    # Real HTTP with a read timeout: a stream that never ends fails the test, not hangs it.
    with serve_in_thread(app) as base, httpx.Client(base_url=base, timeout=10) as http:
        r = http.get(f"/v1/jobs/{job}/events", headers=h)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        # A queued job's stream ends at its maximum lifetime with a resumable timeout event.
        assert "event: timeout" in r.text and '"next_since": 0' in r.text
        assert app.state.streams.count(tenant) == 0  # its slot was released
        app.state.streams.acquire(tenant)  # one stream open: the next is refused
        r = http.get(f"/v1/jobs/{job}/events", headers=h)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        app.state.streams.release(tenant)


def test_stream_resumes_with_last_event_id(
    client: TestClient, api_keys: Keys, driver: Driver
) -> None:
    fid = upload(client, api_keys.requester, FORGET)
    job = client.post("/v1/jobs", json=spec(fid), headers=Keys.h(api_keys.requester)).json()["id"]
    driver.run_to_success(job)
    h = Keys.h(api_keys.requester) | {"Accept": "text/event-stream"}
    full = client.get(f"/v1/jobs/{job}/events", headers=h).text
    ids = [int(ln[4:]) for ln in full.splitlines() if ln.startswith("id: ")]
    assert len(ids) > 3 and full.startswith("retry: 2000") and "event: end" in full
    # Wire format as before: id, event (the kind) and data lines per event.
    assert "event: train" in full and "event: stage" in full
    resumed = client.get(f"/v1/jobs/{job}/events", headers=h | {"Last-Event-ID": str(ids[2])})
    again = [int(ln[4:]) for ln in resumed.text.splitlines() if ln.startswith("id: ")]
    assert again == ids[3:]
    bad = client.get(f"/v1/jobs/{job}/events", headers=h | {"Last-Event-ID": "x"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "Last-Event-ID"


# ----------------------------------------------------------------------------- keys


def test_keys_list_revoke_expiry_and_tenant_scope(app: FastAPI, client: TestClient) -> None:
    tenant, other_tenant = _tenant(), _tenant()
    _, admin = new_key(app, "admin", tenant)
    _, other_admin = new_key(app, "admin", other_tenant)
    a = Keys.h(admin)
    # A plain admin acts for its own tenant only.
    r = client.post("/v1/keys", json={"role": "requester", "tenant": other_tenant}, headers=a)
    assert r.status_code == 403 and r.json()["errors"][0]["field"] == "tenant"
    r = client.post("/v1/keys", json={"role": "requester", "expires_in_days": 1}, headers=a)
    assert r.status_code == 201 and r.json()["tenant"] == tenant and r.json()["expires_at"]
    new_id, secret = r.json()["id"], r.json()["key"]
    listed = client.get("/v1/keys", headers=a).json()["items"]
    assert {k["id"] for k in listed} >= {new_id} and {k["tenant"] for k in listed} == {tenant}
    assert "key" not in listed[0] and "key_hash" not in listed[0]
    assert client.get("/v1/keys", params={"tenant": other_tenant}, headers=a).status_code == 403
    assert client.get("/v1/jobs", headers=Keys.h(secret)).status_code == 200
    # Another tenant's admin cannot revoke it: 404 like an unknown key, and audited.
    assert client.delete(f"/v1/keys/{new_id}", headers=Keys.h(other_admin)).status_code == 404
    assert client.delete("/v1/keys/k_0000000000000000", headers=a).status_code == 404
    assert [e.payload["id"] for e in _audit(app, "cross_tenant_denied", tenant)] == [new_id]
    # Revocation takes effect on the next request, and is audited.
    assert client.delete(f"/v1/keys/{new_id}", headers=a).status_code == 204
    r = client.get("/v1/jobs", headers=Keys.h(secret))
    assert r.status_code == 401
    assert [e.payload["key_id"] for e in _audit(app, "key_revoked", tenant)] == [new_id]
    assert client.get("/v1/keys", headers=a).json()["items"][-1]["revoked"] is True
    # Expiry.
    key_id, secret = new_key(app, "requester", tenant)
    assert client.get("/v1/jobs", headers=Keys.h(secret)).status_code == 200
    with db.session_scope(app.state.session_factory) as s:
        s.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id)
            .values(expires_at=ApiKey.created_at)  # already past
        )
    r = client.get("/v1/jobs", headers=Keys.h(secret))
    assert r.status_code == 401 and "expired" in r.json()["errors"][0]["reason"]


def test_platform_admin_acts_for_any_tenant(app: FastAPI, client: TestClient) -> None:
    _, platform = new_key(app, "admin", _tenant(), platform=True)
    other = _tenant()
    r = client.post("/v1/keys", json={"role": "auditor", "tenant": other}, headers=Keys.h(platform))
    assert r.status_code == 201 and r.json()["tenant"] == other
    listed = client.get("/v1/keys", params={"tenant": other}, headers=Keys.h(platform)).json()
    assert [k["tenant"] for k in listed["items"]] == [other]
    with pytest.raises(keys.InvalidKeyRequest):
        new_key(app, "requester", other, platform=True)


# ----------------------------------------------------------------------------- smaller


def test_plain_role_names_and_denials_counted(client: TestClient, api_keys: Keys) -> None:
    r = client.post("/v1/jobs", json=DEMO, headers=Keys.h(api_keys.auditor))
    reason = r.json()["errors"][0]["reason"]
    assert r.status_code == 403 and reason.startswith("role 'auditor' may not")
    assert "Role." not in reason
    client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    text = client.get("/metrics").text
    assert 'moe_unlearn_denied_total{reason="forbidden"}' in text
    assert 'moe_unlearn_denied_total{reason="unauthenticated"}' in text


def test_cross_tenant_job_read_is_audited(app: FastAPI, client: TestClient, api_keys: Keys) -> None:
    job = client.post("/v1/jobs", json=DEMO, headers=Keys.h(api_keys.requester)).json()["id"]
    r = client.get(f"/v1/jobs/{job}", headers=Keys.h(api_keys.other))
    assert r.status_code == 404
    assert job in [e.payload["id"] for e in _audit(app, "cross_tenant_denied", "acme")]
    assert 'moe_unlearn_denied_total{reason="cross_tenant"}' in client.get("/metrics").text


def test_metrics_token_and_no_tenant_labels(tight: Any, api_keys: Keys) -> None:
    _app, c = tight(metrics_token="s3cret-metrics-token")
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    c.get("/v1/jobs", headers=Keys.h(api_keys.requester))
    r = c.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics-token"})
    assert r.status_code == 200
    assert "acme" not in r.text and 'tenant="' not in r.text and "k_" not in r.text


def test_audit_verify_counts_per_tenant(app: FastAPI, client: TestClient) -> None:
    tenant = _tenant()
    _, auditor = new_key(app, "auditor", tenant)
    new_key(app, "requester", tenant)  # one more entry of the tenant
    r = client.get("/v1/audit/verify", headers=Keys.h(auditor)).json()
    assert r["ok"] is True and r["checked"] == 2  # its two key_created entries only
    mine = _audit(app, "key_created", tenant)
    assert (r["head_seq"], r["head_hash"]) == (mine[-1].seq, mine[-1].entry_hash)


def test_every_status_is_documented(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    submit = paths["/v1/jobs"]["post"]["responses"]
    assert {"202", "400", "401", "403", "413", "422", "429", "503"} <= set(submit)
    assert {"401", "403", "404", "409", "429"} <= set(
        paths["/v1/corpora/{corpus_id}"]["delete"]["responses"]
    )
    for path in ("/v1/keys", "/v1/models", "/v1/corpora"):
        assert "401" in paths[path]["get"]["responses"]
    assert "401" in paths["/metrics"]["get"]["responses"]


def test_spec_corpus_summary_names_only_own_record(
    app: FastAPI, client: TestClient, api_keys: Keys
) -> None:
    fid = upload(client, api_keys.requester, RETAIN + uuid.uuid4().hex.encode() + b"\n")
    job = client.post("/v1/jobs", json=spec(fid), headers=Keys.h(api_keys.requester)).json()
    entry = [e for e in _audit(app, "job_submitted", "acme") if e.job_id == job["id"]][0]
    assert entry.payload["forget"] == {"corpus_id": fid, "size": len(RETAIN) + 33, "records": 3}


def test_a_500_logs_its_reference_not_its_text(
    tight: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app, c = tight()

    def boom() -> None:
        raise RuntimeError("the launch code is 0000")

    app.add_api_route("/boom", boom)
    # Real uvicorn: it logs whatever exception escapes the app, with its text.
    with caplog.at_level("DEBUG"), serve_in_thread(app) as base:
        r = httpx.get(f"{base}/boom", timeout=10)
    assert r.status_code == 500
    reason = r.json()["errors"][0]["reason"]
    ref = reason.removeprefix("internal error (ref ").removesuffix(")")
    assert len(ref) == 12
    assert ref in caplog.text and "RuntimeError" in caplog.text
    assert "launch code" not in caplog.text and "Traceback" not in caplog.text
