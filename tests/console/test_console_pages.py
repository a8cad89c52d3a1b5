"""The console's server side on both databases, over the real app: sessions (cookie, CSRF,
revocation), roles and tenancy exactly as the API's, filters, and what the pages show."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from api.app import create_app
from service import keys
from service.db import session_scope
from service.settings import Settings
from service.tables import ConsoleSession
from tests.console.kit import FORGET_TEXT, csrf_of, finished_job, sign_in

# The service tests' database fixtures: SQLite and PostgreSQL.
from tests.service.conftest import (  # noqa: F401
    db,
    pg_factory,
    pg_migrated_url,
    sqlite_template,
)


def has_verifier() -> bool:
    """Whether the service can check signatures (issue 15's service.signing)."""
    try:
        from service import signing
    except ImportError:
        return False
    return hasattr(signing, "verify_document")


@dataclass
class World:
    app: object
    settings: Settings
    factory: object
    requester: str
    requester_id: str
    auditor: str
    auditor_id: str
    other: str  # a requester key of another tenant
    admin: str
    job: str


@pytest.fixture
def world(db, tmp_path: Path) -> Iterator[World]:  # noqa: F811
    settings = Settings(database_url=db.url, data_dir=tmp_path / "data")
    app = create_app(settings)
    made = {}
    with session_scope(db.factory) as s:
        for name, role, tenant in (("requester", "requester", "acme"),
                                   ("auditor", "auditor", "acme"),
                                   ("other", "requester", "globex"),
                                   ("admin", "admin", "acme")):
            made[name] = keys.create_key(s, role, tenant)
    job = finished_job(db.factory, settings, "acme", made["requester"][0])
    yield World(app, settings, db.factory, made["requester"][1], made["requester"][0],
                made["auditor"][1], made["auditor"][0], made["other"][1], made["admin"][1], job)
    app.state.engine.dispose()


def client(w: World) -> TestClient:
    return TestClient(w.app, base_url="http://testserver")


def test_sign_in_opens_a_session_whose_cookie_is_not_the_key(world: World) -> None:
    c = client(world)
    assert c.get("/console/", follow_redirects=False).headers["location"] == "/console/login"
    login = c.get("/console/login")
    assert 'name="key"' in login.text and '<label for="key">' in login.text
    r = sign_in(c, world.auditor)
    assert r.status_code == 303 and r.headers["location"] == "/console/jobs"
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("mu_console="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert world.auditor not in cookie
    token = cookie.split(";")[0].split("=", 1)[1]
    with session_scope(world.factory) as s:
        rows = s.execute(select(ConsoleSession)).scalars().all()
        # Only the token's hash is stored; the key appears nowhere.
        assert len(rows) == 1 and rows[0].token_hash != token and len(rows[0].token_hash) == 64
    pages = [c.get(p) for p in ("/console/jobs", f"/console/jobs/{world.job}",
                                 "/console/audit", "/console/requests")]
    for p in pages:
        assert p.status_code == 200 and world.auditor not in p.text
        assert "default-src 'none'" in p.headers["content-security-policy"]
    assert world.job in pages[0].text
    assert c.get("/console/", follow_redirects=False).headers["location"] == "/console/jobs"


def test_login_refusals_name_the_reason_and_never_echo_the_key(world: World) -> None:
    c = client(world)
    page = c.get("/console/login")
    token = csrf_of(page.text)
    bad = c.post("/console/login", data={"key": "mu_wrong-key", "csrf_token": token})
    assert bad.status_code == 401 and "Invalid or revoked key" in bad.text
    assert "mu_wrong-key" not in bad.text
    token = csrf_of(bad.text)
    admin = c.post("/console/login", data={"key": world.admin, "csrf_token": token})
    assert admin.status_code == 403 and "admin key has no console pages" in admin.text
    # No CSRF token (a cross-site form), or another one: refused before the key is checked.
    fresh = TestClient(world.app)
    r = fresh.post("/console/login", data={"key": world.auditor, "csrf_token": "x" * 43})
    assert r.status_code == 403 and "expired" in r.text
    r = c.post("/console/login", data={"key": world.auditor, "csrf_token": csrf_of(c.get(
        "/console/login").text)}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    r = c.post("/console/login", content=b"key=" + b"a" * 5000,
               headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "form over 4096 bytes" in r.text
    r = c.post("/console/login", json={"key": world.auditor})
    assert r.status_code == 400 and "x-www-form-urlencoded" in r.text


def test_next_goes_back_to_the_page_but_never_off_site(world: World) -> None:
    c = client(world)
    r = c.get(f"/console/jobs/{world.job}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/console/login?next=")
    assert sign_in(c, world.auditor, f"/console/jobs/{world.job}").headers["location"] == (
        f"/console/jobs/{world.job}")
    c2 = client(world)
    for evil in ("https://evil.example/", "//evil.example/x", "/console/..//evil", "/v1/jobs"):
        assert sign_in(c2, world.requester, evil).headers["location"] == "/console/jobs"
        c2.cookies.clear()


def test_revoking_the_key_ends_its_sessions(world: World) -> None:
    c = client(world)
    sign_in(c, world.requester)
    assert c.get("/console/jobs").status_code == 200
    with session_scope(world.factory) as s:
        keys.revoke_key(s, world.requester_id)
    r = c.get("/console/jobs", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/console/login")
    with session_scope(world.factory) as s:
        assert s.execute(select(func.count()).select_from(ConsoleSession)).scalar_one() == 0


def test_ending_a_keys_sessions_at_once(world: World) -> None:
    from api.console import sessions

    first, second = client(world), client(world)
    sign_in(first, world.auditor)
    sign_in(second, world.auditor)
    with session_scope(world.factory) as s:
        assert sessions.end_sessions_of_key(s, world.auditor_id) == 2
    for c in (first, second):
        assert c.get("/console/jobs", follow_redirects=False).status_code == 303


def test_sign_out_needs_the_form_token_and_ends_the_session(world: World) -> None:
    c = client(world)
    sign_in(c, world.auditor)
    page = c.get("/console/jobs")
    assert c.post("/console/logout", data={"csrf_token": "nope"}).status_code == 403
    assert c.get("/console/jobs").status_code == 200  # still signed in
    r = c.post("/console/logout", data={"csrf_token": csrf_of(page.text)},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    assert c.get("/console/jobs", follow_redirects=False).status_code == 303
    with session_scope(world.factory) as s:
        assert s.execute(select(func.count()).select_from(ConsoleSession)).scalar_one() == 0


def test_roles_and_tenants_follow_the_api(world: World) -> None:
    auditor, requester, other = client(world), client(world), client(world)
    sign_in(auditor, world.auditor)
    sign_in(requester, world.requester)
    sign_in(other, world.other)
    # An auditor reads the audit pages; a requester may not (as GET /v1/audit/events).
    assert auditor.get("/console/audit").status_code == 200
    refused = requester.get("/console/audit")
    assert refused.status_code == 403 and "needs auditor" in refused.text
    assert 'href="/console/audit"' not in requester.get("/console/jobs").text
    # Another tenant's job is "not found", like a missing one.
    for path in (f"/console/jobs/{world.job}", f"/console/jobs/{world.job}/certificate"):
        r = other.get(path)
        assert r.status_code == 404 and "not found" in r.text.lower()
    assert world.job not in other.get("/console/jobs").text
    assert other.get(f"/console/jobs/{world.job}/progress").status_code == 404
    # Cancelling: requesters only, with the form token; an auditor gets no button and a 403.
    job_page = requester.get(f"/console/jobs/{world.job}")
    assert "Cancel this job" not in job_page.text  # finished
    token = csrf_of(auditor.get("/console/jobs").text)
    r = auditor.post(f"/console/jobs/{world.job}/cancel", data={"csrf_token": token})
    assert r.status_code == 403 and "needs requester" in r.text
    token = csrf_of(job_page.text)
    r = requester.post(f"/console/jobs/{world.job}/cancel", data={"csrf_token": token})
    assert r.status_code == 409 and "already finished" in r.text
    r = requester.post(f"/console/jobs/{world.job}/cancel", data={"csrf_token": "forged"})
    assert r.status_code == 403


def test_a_queued_job_is_cancelled_from_its_page(world: World) -> None:
    from service import jobs
    from workers.spec import JobSpec

    with session_scope(world.factory) as s:
        spec = JobSpec.model_validate({"forget": {"demo": "forget"}, "algorithm": "ga"})
        queued = jobs.submit_job(s, spec, "acme", "k", requester=world.requester_id).job.id
    c = client(world)
    sign_in(c, world.requester)
    page = c.get(f"/console/jobs/{queued}")
    assert "Cancel this job" in page.text and 'data-stream="/console/jobs/' in page.text
    r = c.post(f"/console/jobs/{queued}/cancel", data={"csrf_token": csrf_of(page.text)},
               follow_redirects=False)
    assert r.status_code == 303
    assert 'id="job-state">cancelled' in c.get(f"/console/jobs/{queued}").text
    stream = c.get(f"/console/jobs/{queued}/progress")
    assert "event: end" in stream.text and '"state": "CANCELLED"' in stream.text


def test_job_page_shows_the_results(world: World) -> None:
    c = client(world)
    sign_in(c, world.auditor)
    page = c.get(f"/console/jobs/{world.job}").text
    scores = re.search(r'<table id="scores">.*?</table>', page, re.S).group(0)
    assert re.search(r"<td>forget</td><td>accuracy</td><td class=\"n\">0.920</td>"
                     r"<td class=\"n\">0.250</td><td class=\"n\">-0.670</td>", scores)
    assert "<svg" in page and 'class="selected"' in page
    assert page.count('class="selected"') == 1  # one selected expert outlined
    assert "layer 1, expert 3: 0.42 (selected)" in page
    assert '<table id="diagnostics">' in page and "0.80" in page
    assert "d" * 64 in page and "c" * 64 in page  # changed parameter, full hashes
    assert "intact" in page
    # Signatures and robustness checks come from issue 15's part of the service: shown when
    # the certificate carries them, "not available" otherwise.
    from service import certificate

    with session_scope(world.factory) as s:
        cert = certificate.build_certificate(s, world.job, "acme")
    if cert.get("robustness"):
        assert '<table id="robustness">' in page and "router restored" in page
    else:
        assert "Not available: this service runs no robustness checks" in page
    if cert.get("signature"):
        assert "signed, verified" in page
    else:
        assert "not signed" in page
    assert FORGET_TEXT not in page
    cert = c.get(f"/console/jobs/{world.job}/certificate?format=json")
    assert cert.headers["content-disposition"].startswith("attachment")
    body = cert.json()
    assert body["job_id"] == world.job and len(body["certificate_sha256"]) == 64
    html = c.get(f"/console/jobs/{world.job}/certificate")
    assert "script-src" not in html.headers["content-security-policy"]
    # The same page as the API's certificate.
    api = c.get(f"/v1/jobs/{world.job}/certificate", params={"format": "html"},
                headers={"Authorization": f"Bearer {world.auditor}"})
    strip = re.compile(r"Chain verified when.*?</p>", re.S)  # head moves with every read
    assert strip.sub("", api.text) == strip.sub("", html.text)


def test_filters_and_pages(world: World) -> None:
    from service import jobs
    from service.storage import store_corpus
    from tests.console.kit import FORGET
    from workers.spec import JobSpec

    with session_scope(world.factory) as s:
        corpus = store_corpus(s, FORGET, settings=world.settings).sha256
        for i in range(27):
            spec = JobSpec.model_validate({"forget": {"corpus_id": corpus}, "algorithm": "ga",
                                           "model": f"org/model-{i}"})
            jobs.submit_job(s, spec, "acme", "k")
    c = client(world)
    sign_in(c, world.auditor)
    first = c.get("/console/jobs")
    assert first.text.count('<td data-label="Job">') == 25 and 'rel="next"' in first.text
    second = c.get("/console/jobs?page=2")
    assert second.text.count('<td data-label="Job">') == 3 and 'rel="next"' not in second.text
    assert c.get("/console/jobs?state=SUCCEEDED").text.count('<td data-label="Job">') == 1
    assert c.get("/console/jobs?algorithm=npo").text.count('<td data-label="Job">') == 1
    assert c.get("/console/jobs?algorithm=ga&model=model-1").text.count(
        '<td data-label="Job">') == 11  # model-1, model-10..19
    assert c.get("/console/jobs?model=100%25").text.count('<td data-label="Job">') == 0
    assert c.get("/console/jobs?since=2000-01-01&until=2000-01-02").text.count(
        '<td data-label="Job">') == 0
    for bad, field in (("state=NOPE", "state"), ("since=yesterday", "since"),
                       ("page=0", "page"), ("algorithm=<b>", "algorithm"),
                       ("request=a%20b", "request")):
        r = c.get(f"/console/jobs?{bad}")
        assert r.status_code == 400 and f"<strong>{field}</strong>" in r.text, bad
        assert "<b>" not in r.text
    # By deletion request: no request here has jobs.
    r = c.get("/console/jobs?request=r_1")
    assert r.status_code == 200 and r.text.count('<td data-label="Job">') == 0


def test_audit_page_verifies_and_pages(world: World, db) -> None:  # noqa: F811
    c = client(world)
    sign_in(c, world.auditor)
    page = c.get("/console/audit?verify=now").text
    assert 'id="chain-status"' in page and "intact" in page
    assert "No checkpoint has been exported yet" in page
    assert c.get("/console/audit?action=job_submitted").text.count('data-label="Entry"') == 1
    assert c.get("/console/audit?action=DROP TABLE").status_code == 400
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE seq = 3"))
    broken = c.get("/console/audit?verify=now").text
    assert "broken" in broken and '<strong id="first-bad">3</strong>' in broken


def test_requests_page_has_an_empty_state(world: World) -> None:
    c = client(world)
    sign_in(c, world.requester)
    page = c.get("/console/requests")
    assert page.status_code == 200
    assert "No deletion requests in tenant acme" in page.text


def test_console_stays_out_of_the_openapi_schema(world: World) -> None:
    paths = client(world).get("/openapi.json").json()["paths"]
    assert paths and not [p for p in paths if p.startswith("/console")]


def test_certificate_page_shows_signature_and_verdicts_when_present(world: World) -> None:
    from service import certificate

    with session_scope(world.factory) as s:
        cert = certificate.build_certificate(s, world.job, "acme")
    plain = certificate.render_html(cert)
    assert ("signed, verified" if cert.get("signature") else "not signed") in plain
    assert ("router restored" if cert.get("robustness") else
            "not available: this service's certificates") in plain
    # The shapes of issue 15 (service.signing, service.proof); this signature is made up.
    cert["signature"] = {"alg": "Ed25519", "key_id": "sk_1", "public_key": "AAAA",
                         "value": "c2ln"}
    cert["robustness"] = [
        {"check": "router_restored", "verdict": "pass", "threshold": "forget <= 0.35",
         "metrics": {"forget_accuracy_restored": 0.26}, "reason": None},
        {"check": "relearning", "verdict": "fail", "threshold": "recovery <= 0.5",
         "metrics": {"recovery": 0.6}, "reason": "recovered 0.6 of the original"},
        {"check": "quantization", "verdict": "not_run", "threshold": None, "metrics": {},
         "reason": "no library"},
    ]
    page = certificate.render_html(cert)
    assert "key <code>sk_1</code>" in page
    if not has_verifier():  # no verifier: as stated
        assert '<span class="badge signed">signed</span>' in page
    else:  # the service's verifier rejects the made-up signature
        assert "signature does not verify" in page
    assert "router restored: pass" in page and "relearning: fail" in page
    assert "quantization: not run" in page and "recovered 0.6 of the original" in page
    assert "forget &lt;= 0.35" in page and "recovery 0.600" in page
    # The headline: forget accuracy before -> after, utility kept.
    assert "0.920 &rarr; 0.250" in page and "0.810 &rarr; 0.790" in page
    assert json.dumps(cert)  # still plain JSON data


def test_certificate_of_demo_corpora_names_them_without_empty_hashes(world: World) -> None:
    from service import certificate

    with session_scope(world.factory) as s:
        cert = certificate.build_certificate(s, world.job, "acme")
    cert["forget_corpus"] = {"source": "demo", "split": "forget", "max_records": None}
    cert["retain_corpus"] = {"source": "demo", "split": "retain", "max_records": 50}
    page = html.unescape(certificate.render_html(cert))
    assert "the demo world's built-in forget split (no upload, so no hash)" in page
    assert "at most 50" in page and "the demo world's forget topic" in page
    assert not re.search(r'<dd class="hash">\s*</dd>', page)


def test_requests_and_checkpoints_render(world: World, tmp_path: Path) -> None:
    """Real deletion requests (service.requests) and an exported checkpoint
    (service.checkpoints): overdue first, then by due date; the due-date check runs."""
    from datetime import UTC, datetime, timedelta

    from service import checkpoints, requests
    from service.tables import AuditEntry

    now = datetime.now(UTC)
    with session_scope(world.factory) as s:
        def made(ref: str, days_ago: int, **kw: object):
            return requests.create_request(s, "acme", ref, actor="t", due_days=30,
                                           received_at=now - timedelta(days=days_ago), **kw)
        late = made("DSAR-1", 40)  # due 10 days ago
        mid = made("DSAR-0", 20)  # due in 10 days
        soon = made("DSAR-2", 0, subject="s-9")  # due in 30 (+5) days
        requests.extend_due(s, soon.id, "acme", 5, "more time", actor="t")
        requests.attach_job(s, late.id, "acme", world.job, actor="t")
        doc, _ = checkpoints.export(s, world.settings, to=tmp_path)
    c = client(world)
    sign_in(c, world.auditor)
    page = c.get("/console/requests").text
    with session_scope(world.factory) as s:  # the due-date check ran, as GET /v1/requests runs it
        assert s.execute(select(func.count()).select_from(AuditEntry)
                         .where(AuditEntry.action == "request_overdue")).scalar_one() == 1
    order = re.findall(r'data-label="Request"><code>([0-9a-f-]{36})</code>', page)
    assert order == [late.id, mid.id, soon.id]  # overdue first, then by due date
    assert page.count("overdue</span>") == 1 and f"/console/jobs/{world.job}" in page
    assert "(extended)" in page and "subject s-9" in page
    audit_page = c.get("/console/audit").text
    assert doc["entry_hash"] in audit_page and "export" in audit_page
    other = client(world)
    sign_in(other, world.other)
    assert "No deletion requests in tenant globex" in other.get("/console/requests").text
