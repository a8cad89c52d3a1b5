"""API keys: stored hashed, authenticate, revoke, audited without the secret."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from service import audit, keys
from service.db import session_scope
from service.keys import InvalidKeyRequest, Principal, Role


def test_create_authenticate_revoke(db):
    with session_scope(db.factory) as s:
        assert not keys.any_keys(s)
        key_id, secret = keys.create_key(s, "requester", "acme", actor="cli")
    assert secret.startswith("mu_") and len(secret) > 40
    with session_scope(db.factory) as s:
        assert keys.authenticate(s, secret) == Principal(key_id, Role.REQUESTER, "acme")
        assert keys.authenticate(s, secret + "x") is None
        assert keys.authenticate(s, "") is None
        assert keys.any_keys(s)
    # the secret is nowhere in the database, only its SHA-256
    with db.engine.connect() as c:
        dump = repr(c.execute(text("SELECT * FROM api_keys")).all())
        dump += repr(c.execute(text("SELECT * FROM audit_log")).all())
    assert secret not in dump and secret[3:] not in dump
    assert keys.hash_secret(secret) in dump
    with session_scope(db.factory) as s:
        entries = audit.list_entries(s)
        assert [(e.action, e.payload) for e in entries] == [
            ("key_created", {"key_id": key_id, "role": "requester"})
        ]
        keys.revoke_key(s, key_id)
        keys.revoke_key(s, key_id)  # idempotent
    with session_scope(db.factory) as s:
        assert keys.authenticate(s, secret) is None
        assert [e.action for e in audit.list_entries(s)] == ["key_created", "key_revoked"]
        assert audit.verify(s).ok


def test_bad_requests(db):
    with session_scope(db.factory) as s:
        with pytest.raises(InvalidKeyRequest, match="role"):
            keys.create_key(s, "root", "acme")
        with pytest.raises(InvalidKeyRequest, match="tenant"):
            keys.create_key(s, "admin", "")
        a = keys.create_key(s, "auditor", "acme")
        b = keys.create_key(s, "admin", "acme")
    assert a[0] != b[0] and a[1] != b[1]
