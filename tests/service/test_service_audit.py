"""The audit hash chain: verifies, and names the first edited or deleted entry."""

from __future__ import annotations

import hashlib
import threading

import pytest
from sqlalchemy import text

from service import audit
from service.db import session_scope
from service.errors import UnsafePayload
from service.tables import GENESIS_HASH
from workers.spec import canonical_json


def fill(db, n=5):
    with session_scope(db.factory) as s:
        for i in range(n):
            audit.append(s, actor="a", action="act", job_id=None, tenant="t",
                         payload={"i": i, "x": 0.5})


def verify(db):
    with session_scope(db.factory) as s:
        return audit.verify(s)


def test_chain_links_and_hashes(db):
    fill(db, 3)
    with session_scope(db.factory) as s:
        es = audit.list_entries(s)
    assert [e.seq for e in es] == [1, 2, 3]
    assert es[0].prev_hash == GENESIS_HASH
    assert es[1].prev_hash == es[0].entry_hash and es[2].prev_hash == es[1].entry_hash
    e = es[1]
    body = {"seq": e.seq, "prev_hash": e.prev_hash, "ts": e.ts, "actor": e.actor,
            "action": e.action, "job_id": e.job_id, "tenant": e.tenant, "payload": e.payload}
    assert e.entry_hash == hashlib.sha256(canonical_json(body).encode()).hexdigest()
    r = verify(db)
    assert (r.ok, r.checked, r.first_bad_seq, r.head_seq) == (True, 3, None, 3)


def test_empty_chain_verifies(db):
    r = verify(db)
    assert (r.ok, r.checked, r.head_hash) == (True, 0, GENESIS_HASH)


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE audit_log SET actor = 'mallory' WHERE seq = 3",
        "UPDATE audit_log SET ts = '2020-01-01T00:00:00.000000+00:00' WHERE seq = 3",
        "UPDATE audit_log SET action = 'nothing' WHERE seq = 3",
    ],
)
def test_edited_entry_is_named(db, sql):
    fill(db)
    with db.engine.begin() as c:
        c.execute(text(sql))
    r = verify(db)
    assert (r.ok, r.first_bad_seq) == (False, 3)
    assert "entry 3 was modified" in r.reason


def test_edited_payload_is_named(db):
    fill(db)
    with session_scope(db.factory) as s:  # rewrite the JSON through the ORM: same types
        e = audit.list_entries(s, after_seq=1, limit=1)[0]
        e.payload = {"i": 99, "x": 0.5}
    r = verify(db)
    assert (r.ok, r.first_bad_seq) == (False, 2)


def test_rehashed_edit_still_breaks_the_next_link(db):
    fill(db)
    with db.engine.begin() as c:
        c.execute(text("UPDATE audit_log SET entry_hash = :h WHERE seq = 2"), {"h": "f" * 64})
    r = verify(db)
    assert (r.ok, r.first_bad_seq) == (False, 2)


def test_deleted_entry_is_named(db):
    fill(db)
    with db.engine.begin() as c:
        c.execute(text("DELETE FROM audit_log WHERE seq = 2"))
    r = verify(db)
    assert (r.ok, r.first_bad_seq) == (False, 2)
    assert "entry 2 is missing" in r.reason


def test_deleted_newest_entries_are_detected(db):
    fill(db)
    with db.engine.begin() as c:
        c.execute(text("DELETE FROM audit_log WHERE seq >= 4"))
    r = verify(db)
    assert (r.ok, r.first_bad_seq, r.checked) == (False, 4, 3)


def test_renumbered_entries_break_the_link(db):
    fill(db)
    with db.engine.begin() as c:
        c.execute(text("DELETE FROM audit_log WHERE seq = 2"))
        c.execute(text("UPDATE audit_log SET seq = 2 WHERE seq = 3"))
    r = verify(db)
    assert (r.ok, r.first_bad_seq) == (False, 2)


def test_entry_added_behind_the_chain_is_detected(db):
    fill(db, 2)
    with session_scope(db.factory) as s:
        last = audit.list_entries(s)[-1]
    forged = {"seq": 3, "prev_hash": last.entry_hash, "ts": last.ts, "actor": "mallory",
              "action": "act", "job_id": None, "tenant": "t", "payload": {}}
    h = hashlib.sha256(canonical_json(forged).encode()).hexdigest()
    with db.engine.begin() as c:  # a well-formed entry, but not written by append()
        c.execute(
            text("INSERT INTO audit_log (seq, prev_hash, entry_hash, ts, actor, action, "
                 "job_id, tenant, payload) VALUES (3, :p, :h, :ts, 'mallory', 'act', NULL, "
                 "'t', '{}')"),
            {"p": last.entry_hash, "h": h, "ts": last.ts},
        )
    r = verify(db)
    assert (r.ok, r.first_bad_seq) == (False, 3)
    assert "not covered by the chain head" in r.reason


def test_concurrent_appends_keep_one_chain(db):
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def go(k: int) -> None:
        try:
            barrier.wait()
            for i in range(5):
                with session_scope(db.factory) as s:
                    audit.append(s, actor=f"w{k}", action="tick", payload={"i": i})
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    r = verify(db)
    assert (r.ok, r.checked, r.head_seq) == (True, 20, 20)


def test_rolled_back_append_leaves_no_trace(db):
    fill(db, 2)
    with pytest.raises(RuntimeError):
        with session_scope(db.factory) as s:
            audit.append(s, actor="a", action="x", payload={})
            raise RuntimeError("the state change failed")
    r = verify(db)
    assert (r.ok, r.head_seq) == (True, 2)


def test_payloads_cannot_carry_text():
    for bad in (
        {"text": "secret"}, {"a": {"Prompt": "q"}}, {"s": "z" * 513}, {"o": object()},
        {"loss": float("nan")}, {"l": [float("inf")]},
    ):
        with pytest.raises(UnsafePayload):
            audit.check_payload(bad)
    audit.check_payload({"sha256": "a" * 64, "size": 10, "ok": True, "l": [1, 2.5, None]})
