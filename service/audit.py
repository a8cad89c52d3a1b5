"""The append-only, hash-chained audit log.

Entry n stores the hash of entry n-1 (`prev_hash`) and its own hash: SHA-256 over the
canonical JSON of (seq, prev_hash, ts, actor, action, job_id, tenant, payload). A one-row
`audit_head` table holds the newest seq and hash and is updated by every append in the
same transaction; its row lock (PostgreSQL) or the database write lock (SQLite) serialises
appends, so two writers never chain to the same predecessor. `verify` recomputes the
chain and names the first entry that was edited, deleted or inserted.

Anchoring (issue 15): the hash chain alone proves nothing against someone who can write
the database (rewrite entry k, recompute every later hash, move the head). So every entry
also carries `mac` = HMAC-SHA256(audit key, "entry|<entry_hash>") and the head row
HMAC(audit key, "head|<seq>|<hash>"), with a key the database does not hold
(`MOE_UNLEARN_AUDIT_KEY`, service/signing.py). A chain written before MACs existed is
vouched for by a signed `anchor` checkpoint of its head, made by the first append that
finds it. Against whoever also holds the audit key, only a signed checkpoint kept outside
the database helps: `service.checkpoints.verify_against`.

Payloads carry identifiers, hashes, sizes and counts only - never corpus text
(`check_payload` refuses long strings and text-like keys).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service import signing
from service.db import is_sqlite, lock_for_write
from service.errors import UnsafePayload
from service.settings import Settings, get_settings
from service.tables import GENESIS_HASH, AuditCheckpoint, AuditEntry, AuditHead, utcnow
from workers.spec import canonical_json

# Keys that would hold data content rather than metadata; refused anywhere in a payload.
FORBIDDEN_KEYS = frozenset({"text", "prompt", "answer", "content", "corpus_text", "records_text"})
MAX_STRING = 512  # longer strings are refused: a sentence of corpus text must not slip in


def check_payload(payload: Any, path: str = "payload") -> None:
    """Refuse payloads that could carry corpus text (raises `UnsafePayload`)."""
    if isinstance(payload, dict):
        for k, v in payload.items():
            if not isinstance(k, str):
                raise UnsafePayload(path, f"key {k!r} is not a string")
            if k.lower() in FORBIDDEN_KEYS:
                raise UnsafePayload(f"{path}.{k}", "text-like fields are not allowed")
            check_payload(v, f"{path}.{k}")
    elif isinstance(payload, list | tuple):
        for i, v in enumerate(payload):
            check_payload(v, f"{path}[{i}]")
    elif isinstance(payload, str):
        if len(payload) > MAX_STRING:
            raise UnsafePayload(path, f"string longer than {MAX_STRING} characters")
    elif isinstance(payload, float):
        if not math.isfinite(payload):  # not valid JSON, and SQLite stores NaN as NULL
            raise UnsafePayload(path, f"{payload} is not a finite number")
    elif payload is not None and not isinstance(payload, bool | int):
        raise UnsafePayload(path, f"unsupported type {type(payload).__name__}")


def entry_hash(
    seq: int,
    prev_hash: str,
    ts: str,
    actor: str,
    action: str,
    job_id: str | None,
    tenant: str | None,
    payload: dict[str, Any],
) -> str:
    """SHA-256 of the canonical JSON of an entry's fields."""
    body = {
        "seq": seq,
        "prev_hash": prev_hash,
        "ts": ts,
        "actor": actor,
        "action": action,
        "job_id": job_id,
        "tenant": tenant,
        "payload": payload,
    }
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def _ts(now: datetime | None = None) -> str:
    return (now or utcnow()).isoformat(timespec="microseconds")


CHECKPOINT_SCHEMA = "moe-unlearn/audit-checkpoint/v1"


def entry_mac(key: bytes, entry_hash_: str) -> str:
    return signing.mac(key, f"entry|{entry_hash_}")


def head_mac(key: bytes, seq: int, hash_: str) -> str:
    return signing.mac(key, f"head|{seq}|{hash_}")


def signed_checkpoint(
    seq: int, hash_: str, kind: str, settings: Settings | None = None
) -> dict[str, Any]:
    """A checkpoint of the chain head (sequence, hash, time), signed with the service key."""
    doc = {"schema": CHECKPOINT_SCHEMA, "kind": kind, "seq": seq, "entry_hash": hash_,
           "time": _ts()}
    return signing.sign_document(doc, settings)


def store_checkpoint(session: Session, doc: dict[str, Any]) -> AuditCheckpoint:
    row = AuditCheckpoint(kind=doc["kind"], seq=doc["seq"], entry_hash=doc["entry_hash"],
                          key_id=doc["signature"]["key_id"], document=doc)
    session.add(row)
    session.flush()
    return row


def _anchor_if_unkeyed(session: Session, head: AuditHead) -> None:
    """A chain whose head carries no MAC was written before anchoring: vouch for it with
    a signed checkpoint of its head, once."""
    if head.seq == 0 or head.mac is not None:
        return
    exists = session.execute(
        select(AuditCheckpoint.id).where(AuditCheckpoint.kind == "anchor").limit(1)
    ).first()
    if exists is None:
        store_checkpoint(session, signed_checkpoint(head.seq, head.entry_hash, "anchor"))


def append(
    session: Session,
    *,
    actor: str,
    action: str,
    job_id: str | None = None,
    tenant: str | None = None,
    payload: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append one entry in the caller's transaction (commit is the caller's: the entry and
    the state change it records commit or roll back together)."""
    payload = dict(payload or {})
    check_payload(payload)
    lock_for_write(session)
    stmt = select(AuditHead).where(AuditHead.id == 1)
    if not is_sqlite(session):
        stmt = stmt.with_for_update()  # serialises appends on PostgreSQL
    head = session.execute(stmt.execution_options(populate_existing=True)).scalar_one()
    key = signing.audit_key()
    _anchor_if_unkeyed(session, head)
    seq = head.seq + 1
    ts = _ts()
    h = entry_hash(seq, head.entry_hash, ts, actor, action, job_id, tenant, payload)
    entry = AuditEntry(
        seq=seq,
        prev_hash=head.entry_hash,
        entry_hash=h,
        ts=ts,
        actor=actor,
        action=action,
        job_id=job_id,
        tenant=tenant,
        payload=payload,
        mac=entry_mac(key, h),
    )
    session.add(entry)
    session.execute(
        update(AuditHead)
        .where(AuditHead.id == 1)
        .values(seq=seq, entry_hash=h, mac=head_mac(key, seq, h))
    )
    session.flush()
    return entry


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int  # entries examined
    first_bad_seq: int | None  # the first entry that is missing, edited or out of place
    reason: str | None
    head_seq: int  # the newest seq the head row claims
    head_hash: str


def _anchor(session: Session, settings: Settings) -> tuple[int, str | None, str | None]:
    """(seq, hash, problem) of the chain's anchor: the newest `anchor` checkpoint with a
    valid signature by a key of the service's own key history (0, None, None: none)."""
    rows = session.execute(
        select(AuditCheckpoint)
        .where(AuditCheckpoint.kind == "anchor")
        .order_by(AuditCheckpoint.seq.desc())
    ).scalars()
    trusted = signing.trusted_key_ids(settings)
    for row in rows:
        doc = row.document
        check = signing.verify_document(doc)
        if not check.valid or check.key_id not in trusted:
            return 0, None, f"anchor checkpoint {row.id} is not signed by a service key"
        if (doc.get("seq"), doc.get("entry_hash"), doc.get("kind")) != (
            row.seq, row.entry_hash, "anchor"
        ):
            return 0, None, f"anchor checkpoint {row.id} does not match its signed document"
        return int(row.seq), str(row.entry_hash), None
    return 0, None, None


def verify(
    session: Session, *, batch: int = 1000, settings: Settings | None = None
) -> VerifyResult:
    """Recompute the whole chain. Detects an edited entry (hash mismatch), a deleted entry
    (gap in seq, or the next entry's prev_hash no longer links), deleted newest entries
    (the head row points past the last entry) and entries added without an append (past
    the head). With the audit key it also detects any entry or head written without the
    key (a rewrite with recomputed hashes, a forged append, an entry past a signed anchor
    that lacks its MAC). Safe to run while others append."""
    settings = settings or get_settings()
    key = signing.audit_key(settings)
    anchor_seq, anchor_hash, anchor_problem = _anchor(session, settings)
    head = session.execute(
        select(AuditHead).where(AuditHead.id == 1).execution_options(populate_existing=True)
    ).scalar_one()
    expected_seq = 1
    prev = GENESIS_HASH
    checked = 0
    last_seq = 0

    def bad(seq: int, reason: str) -> VerifyResult:
        return VerifyResult(False, checked, seq, reason, head.seq, head.entry_hash)

    if anchor_problem is not None:
        return bad(1, anchor_problem)

    while expected_seq <= head.seq:
        # Only up to the head we read: entries appended meanwhile are checked next time.
        rows = (
            session.execute(
                select(AuditEntry)
                .where(AuditEntry.seq >= expected_seq, AuditEntry.seq <= head.seq)
                .order_by(AuditEntry.seq)
                .limit(batch)
                .execution_options(populate_existing=True)
            )
            .scalars()
            .all()
        )
        if not rows:
            break
        for e in rows:
            if e.seq != expected_seq:
                return bad(expected_seq, f"entry {expected_seq} is missing (next is {e.seq})")
            if e.prev_hash != prev:
                return bad(e.seq, f"entry {e.seq} does not link to entry {e.seq - 1}")
            h = entry_hash(
                e.seq, e.prev_hash, e.ts, e.actor, e.action, e.job_id, e.tenant, e.payload
            )
            if h != e.entry_hash:
                return bad(e.seq, f"entry {e.seq} was modified (hash mismatch)")
            if e.seq == anchor_seq and e.entry_hash != anchor_hash:
                return bad(e.seq, f"entry {e.seq} differs from the signed anchor: the chain "
                           f"was rewritten at or before entry {e.seq}")
            if e.seq > anchor_seq and not signing.mac_ok(
                key, f"entry|{e.entry_hash}", e.mac
            ):
                return bad(e.seq, f"entry {e.seq} was not written with the audit key "
                           "(MAC missing or wrong)")
            checked += 1
            prev = e.entry_hash
            last_seq = e.seq
            expected_seq += 1
    if head.seq != last_seq or head.entry_hash != prev:
        if head.seq > last_seq:
            return bad(last_seq + 1, f"entries {last_seq + 1}..{head.seq} are missing")
        return bad(last_seq, f"the chain head (seq {head.seq}) does not match entry {last_seq}")
    if head.seq > anchor_seq and not signing.mac_ok(
        key, f"head|{head.seq}|{head.entry_hash}", head.mac
    ):
        return bad(head.seq, "the chain head was not written with the audit key")
    if anchor_seq > head.seq:
        return bad(head.seq + 1, f"entries {head.seq + 1}..{anchor_seq} (signed anchor) are "
                   "missing")
    # Entries past the head that no append accounted for were inserted behind our back.
    # (Read the max first, the head second: a concurrent append moves both, in that order.)
    max_seq = session.execute(select(func.max(AuditEntry.seq))).scalar_one() or 0
    head_now = session.execute(
        select(AuditHead.seq).where(AuditHead.id == 1).execution_options(populate_existing=True)
    ).scalar_one()
    if max_seq > head_now:
        return bad(head_now + 1, f"entry {head_now + 1} is not covered by the chain head")
    return VerifyResult(True, checked, None, None, head.seq, head.entry_hash)


def list_entries(
    session: Session,
    *,
    tenant: str | None = None,
    job_id: str | None = None,
    after_seq: int | None = 0,
    limit: int = 100,
) -> list[AuditEntry]:
    """Entries with seq > after_seq, oldest first (filter by tenant and/or job)."""
    stmt = select(AuditEntry).where(AuditEntry.seq > (after_seq or 0))
    if tenant is not None:
        stmt = stmt.where(AuditEntry.tenant == tenant)
    if job_id is not None:
        stmt = stmt.where(AuditEntry.job_id == job_id)
    return list(session.execute(stmt.order_by(AuditEntry.seq).limit(limit)).scalars())


def entry_to_dict(e: AuditEntry) -> dict[str, Any]:
    """An entry as plain JSON data (what the audit endpoints return)."""
    return {
        "seq": e.seq,
        "prev_hash": e.prev_hash,
        "entry_hash": e.entry_hash,
        "ts": e.ts,
        "actor": e.actor,
        "action": e.action,
        "job_id": e.job_id,
        "tenant": e.tenant,
        "payload": e.payload,
    }
