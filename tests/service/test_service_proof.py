"""Signed certificates and the anchored audit chain (issue 15): a certificate with one byte
changed fails verification; a chain rewritten without the audit key fails `verify`; a chain
rewritten WITH the audit key after an exported checkpoint fails `verify --against`."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text

from api.cli import main
from service import audit, certificate, checkpoints, signing
from service.db import session_scope
from service.settings import Settings, get_settings
from tests.service.test_service_certificate import run_job
from workers.spec import canonical_json


@pytest.fixture
def cli_env(db, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The CLI's settings point at the test database."""
    monkeypatch.setenv("DATABASE_URL", db.url)
    monkeypatch.setenv("MOE_UNLEARN_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def fill(db, n: int = 5) -> None:
    with session_scope(db.factory) as s:
        for i in range(n):
            audit.append(s, actor="a", action="act", tenant="t", payload={"i": i})


def verify(db) -> audit.VerifyResult:
    with session_scope(db.factory) as s:
        return audit.verify(s)


# --- signed certificates ------------------------------------------------------------------


def test_certificate_is_signed_and_verifies_offline(db, tmp_path, cli_env, capsys):
    job_id, _, _ = run_job(db, tmp_path)
    with session_scope(db.factory) as s:
        cert = certificate.build_certificate(s, job_id, "acme")
        page = certificate.render_html(cert)
    sig = cert["signature"]
    cur = signing.signing_key()
    assert (sig["alg"], sig["key_id"], sig["public_key"]) == ("Ed25519", cur.key_id,
                                                             cur.public_b64)
    assert signing.verify_document(cert).valid
    assert cur.fingerprint in page and "Robustness checks" in page
    assert [c["check"] for c in cert["robustness"]] == list(
        ("router_restored", "relearning", "quantization", "membership_inference")
    )
    assert {c["verdict"] for c in cert["robustness"]} == {"not_run"}

    path = tmp_path / "certificate.json"
    path.write_text(json.dumps(cert, indent=2))
    capsys.readouterr()
    assert main(["certificate", "verify", str(path)]) == 0
    assert cur.fingerprint in capsys.readouterr().out
    assert main(["certificate", "verify", str(path), "--key", cur.fingerprint]) == 0
    assert main(["certificate", "verify", str(path), "--key", cur.public_b64]) == 0
    other = Ed25519PrivateKey.generate().public_key()
    pem = tmp_path / "other.pem"
    pem.write_bytes(other.public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    capsys.readouterr()
    assert main(["certificate", "verify", str(path), "--key", str(pem)]) == 1
    assert "not by the expected key" in capsys.readouterr().out


def test_a_certificate_with_one_byte_changed_fails(db, tmp_path, cli_env, capsys):
    job_id, _, _ = run_job(db, tmp_path)
    with session_scope(db.factory) as s:
        cert = certificate.build_certificate(s, job_id, "acme")
    raw = canonical_json(cert).encode()
    # The score 0.92 before unlearning, changed to 0.93: a file that still parses.
    i = raw.index(b"0.92")
    forged = raw[: i + 3] + b"3" + raw[i + 4 :]
    path = tmp_path / "forged.json"
    path.write_bytes(forged)
    capsys.readouterr()
    assert main(["certificate", "verify", str(path)]) == 1
    assert "INVALID" in capsys.readouterr().out
    # Every single-byte change that still parses to other content fails.
    changed = 0
    for pos in range(0, len(raw), max(1, len(raw) // 400)):
        b = bytearray(raw)
        b[pos] = ord("x") if b[pos] != ord("x") else ord("y")
        try:
            doc = json.loads(bytes(b))
        except ValueError:
            continue
        if doc == cert:
            continue
        changed += 1
        assert not signing.verify_document(doc).valid, pos
    assert changed > 50
    path.write_bytes(raw)
    assert main(["certificate", "verify", str(path)]) == 0


def test_rotated_keys_stay_published_and_old_certificates_verify(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    old = Settings(data_dir=tmp_path, keys_dir=keys)
    signing.clear_cache()
    doc_old = signing.sign_document({"a": 1}, old)
    new_key = tmp_path / "new.pem"
    new_key.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    new = Settings(data_dir=tmp_path, keys_dir=keys, signing_key=new_key)
    doc_new = signing.sign_document({"a": 1}, new)
    pub = signing.published_keys(new)
    assert [k.current for k in pub] == [True, False]
    assert {k.key_id for k in pub} == {doc_old["signature"]["key_id"],
                                      doc_new["signature"]["key_id"]}
    assert signing.verify_document(doc_old).valid and signing.verify_document(doc_new).valid
    signing.clear_cache()


def test_signature_checks_refuse_garbage():
    for bad in (None, [], {"signature": "x"}, {"signature": {"alg": "RSA"}},
                {"signature": {"alg": "Ed25519", "public_key": "!!", "value": "x"}}):
        assert not signing.verify_document(bad).valid


# --- the anchored audit chain -------------------------------------------------------------


def _rehash_from(db, start: int, key: bytes | None) -> None:
    """Rewrite entries start.. (actor 'mallory'), recomputing every hash and moving the
    head: what someone who can write the database does. With `key`, also the MACs."""
    with session_scope(db.factory) as s:
        es = audit.list_entries(s, limit=1000)
    prev = es[start - 2].entry_hash if start > 1 else "0" * 64
    with db.engine.begin() as c:
        for e in es[start - 1 :]:
            h = audit.entry_hash(e.seq, prev, e.ts, "mallory", e.action, e.job_id, e.tenant,
                                 e.payload)
            mac = audit.entry_mac(key, h) if key else e.mac
            c.execute(text("UPDATE audit_log SET actor='mallory', prev_hash=:p, "
                           "entry_hash=:h, mac=:m WHERE seq=:s"),
                      {"p": prev, "h": h, "m": mac, "s": e.seq})
            prev = h
        head_mac = audit.head_mac(key, es[-1].seq, prev) if key else None
        c.execute(text("UPDATE audit_head SET entry_hash=:h, mac=:m"), {"h": prev, "m": head_mac})


def test_rewrite_without_the_audit_key_is_detected(db):
    fill(db)
    _rehash_from(db, 2, key=None)
    r = verify(db)
    assert (r.ok, r.first_bad_seq) == (False, 2)
    assert "audit key" in r.reason


def test_forged_append_with_the_head_moved_is_detected(db):
    fill(db, 2)
    with session_scope(db.factory) as s:
        last = audit.list_entries(s)[-1]
    h = audit.entry_hash(3, last.entry_hash, last.ts, "mallory", "key_revoked", None, "t", {})
    with db.engine.begin() as c:
        c.execute(text("INSERT INTO audit_log (seq, prev_hash, entry_hash, ts, actor, action, "
                       "job_id, tenant, payload) VALUES (3, :p, :h, :ts, 'mallory', "
                       "'key_revoked', NULL, 't', '{}')"),
                  {"p": last.entry_hash, "h": h, "ts": last.ts})
        c.execute(text("UPDATE audit_head SET seq=3, entry_hash=:h"), {"h": h})
    r = verify(db)
    assert (r.ok, r.first_bad_seq) == (False, 3)


def test_rewrite_after_an_exported_checkpoint_fails_verify_against(db, tmp_path, cli_env,
                                                                     capsys):
    fill(db, 4)
    capsys.readouterr()
    assert main(["audit", "export", "--to", str(tmp_path / "ckpt.json")]) == 0
    ckpt_path = Path(capsys.readouterr().out.strip())
    ckpt = json.loads(ckpt_path.read_text())
    assert (ckpt["seq"], ckpt["kind"]) == (4, "export")
    fill(db, 2)  # the chain goes on after the checkpoint
    assert main(["audit", "verify", "--local", "--against", str(ckpt_path)]) == 0
    assert "intact" in capsys.readouterr().out

    # Someone holding the audit key rewrites entry 2 and everything after it.
    _rehash_from(db, 2, key=signing.audit_key())
    assert verify(db).ok  # the chain alone cannot tell...
    assert main(["audit", "verify", "--local"]) == 0
    capsys.readouterr()
    # ...the checkpoint can
    assert main(["audit", "verify", "--local", "--against", str(ckpt_path)]) == 1
    out = capsys.readouterr().out
    assert "TAMPERED" in out and "entry 4 differs from the checkpoint" in out
    with session_scope(db.factory) as s:
        r = checkpoints.verify_against(s, ckpt)
    assert (r.ok, r.first_bad_seq) == (False, 4)


def test_truncation_before_a_checkpoint_and_forged_checkpoints_are_refused(db, tmp_path):
    fill(db, 4)
    with session_scope(db.factory) as s:
        doc, _ = checkpoints.export(s, to=tmp_path)
    key = signing.audit_key()
    with db.engine.begin() as c:  # drop entries 3..4 and re-MAC the head (key holder)
        c.execute(text("DELETE FROM audit_log WHERE seq >= 3"))
        row = c.execute(text("SELECT entry_hash FROM audit_log WHERE seq = 2")).scalar_one()
        c.execute(text("UPDATE audit_head SET seq=2, entry_hash=:h, mac=:m"),
                  {"h": row, "m": audit.head_mac(key, 2, row)})
    with session_scope(db.factory) as s:
        assert audit.verify(s).ok
        r = checkpoints.verify_against(s, doc)
        assert (r.ok, r.first_bad_seq) == (False, 3) and "removed" in r.reason
        forged = {**doc, "seq": 2}
        assert not checkpoints.verify_against(s, forged).ok
        other = Ed25519PrivateKey.generate()
        body = {k: v for k, v in forged.items() if k != "signature"}
        forged["signature"] = {**doc["signature"]}
        forged["signature"]["value"] = base64.b64encode(
            other.sign(canonical_json(body).encode())).decode()
        assert "signature" in (checkpoints.verify_against(s, forged).reason or "")


def test_a_chain_written_before_macs_is_anchored_by_a_signed_checkpoint(db):
    fill(db, 3)
    with db.engine.begin() as c:  # as the chain was before migration 0003
        c.execute(text("UPDATE audit_log SET mac = NULL"))
        c.execute(text("UPDATE audit_head SET mac = NULL"))
    r = verify(db)
    assert (r.ok, r.first_bad_seq) == (False, 1)
    fill(db, 1)  # the next append anchors the old head
    with session_scope(db.factory) as s:
        anchors = [d for d in checkpoints.list_checkpoints(s) if d["kind"] == "anchor"]
    assert [a["seq"] for a in anchors] == [3] and signing.verify_document(anchors[0]).valid
    assert verify(db).ok
    # Rewriting an old (MAC-less) entry no longer matches the signed anchor.
    _rehash_from(db, 2, key=signing.audit_key())
    r = verify(db)
    assert (r.ok, r.first_bad_seq) == (False, 3) and "anchor" in r.reason
    # Deleting the anchor leaves entries without MACs: detected too.
    with db.engine.begin() as c:
        c.execute(text("DELETE FROM audit_checkpoints"))
    assert verify(db).first_bad_seq == 1


def test_check_due_audits_overdue_requests_once(db, cli_env, capsys):
    from datetime import timedelta

    from service import requests
    from service.tables import utcnow

    with session_scope(db.factory) as s:
        late = requests.create_request(s, "acme", "case-1", actor="t",
                                       received_at=utcnow() - timedelta(days=31))
        requests.create_request(s, "acme", "case-2", actor="t")
    capsys.readouterr()
    assert main(["requests", "check-due"]) == 0
    assert capsys.readouterr().out.startswith("1 request(s)")
    assert main(["requests", "check-due"]) == 0
    assert capsys.readouterr().out.startswith("0 request(s)")
    with session_scope(db.factory) as s:
        overdue = [e for e in audit.list_entries(s) if e.action == "request_overdue"]
        assert [e.payload["request_id"] for e in overdue] == [late.id]
        assert [r.reference for r in requests.list_requests(s, "acme", overdue=True)] == [
            "case-1"]
    assert verify(db).ok
