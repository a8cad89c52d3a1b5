"""Tenant-owned corpora (issue 14): who holds an uploaded corpus, and when it is deleted.

A blob (`corpora` table + file) is shared by content. Each tenant that uploads it gets its
own `CorpusRecord` (tenant, sha256): another tenant's id is refused exactly like an unknown
one. A record is deleted (hash, size and record count kept; `deleted_at` set) when the last
unfinished job of its tenant that names it ends, unless its upload asked to keep it
(`keep_until`), or when the tenant deletes it; the blob file goes once no live record holds
it. A forget corpus is the very text a deletion request asks to remove. Every deletion is
an audit entry. Functions flush, never commit.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import audit
from service.db import lock_for_write
from service.errors import NotFound, ServiceError, SpecRejected
from service.settings import Settings
from service.storage import CorpusInfo, CorpusUpload, register_blob
from service.tables import Corpus, CorpusRecord, Job, utcnow

UNFINISHED = ("QUEUED", "RUNNING", "CANCELLING", "RETRYING")


class QuotaExceeded(ServiceError):
    """A tenant's storage quota would be exceeded (HTTP 413)."""


class CorpusInUse(ServiceError):
    """The corpus is named by an unfinished job of its tenant (HTTP 409)."""


def _live(session: Session, tenant: str, sha256: str) -> CorpusRecord | None:
    return session.execute(
        select(CorpusRecord).where(
            CorpusRecord.tenant == tenant,
            CorpusRecord.sha256 == sha256,
            CorpusRecord.deleted_at.is_(None),
        )
    ).scalar_one_or_none()


def used_bytes(session: Session, tenant: str) -> int:
    return int(
        session.execute(
            select(func.coalesce(func.sum(CorpusRecord.size), 0)).where(
                CorpusRecord.tenant == tenant, CorpusRecord.deleted_at.is_(None)
            )
        ).scalar_one()
    )


def check_quota(session: Session, tenant: str, size: int, settings: Settings) -> None:
    """Refuse (`QuotaExceeded`) if `size` more bytes would exceed the tenant's quota."""
    used = used_bytes(session, tenant)
    if used + size > settings.corpus_quota_bytes:
        raise QuotaExceeded(
            "body",
            f"storage quota of {settings.corpus_quota_bytes} bytes exceeded ({used} in use, "
            f"{size} more asked); delete corpora with DELETE /v1/corpora/{{id}}",
        )


def register(
    session: Session,
    upload: CorpusUpload,
    tenant: str,
    *,
    retention_days: int,
    actor: str,
    settings: Settings,
) -> tuple[CorpusRecord, bool]:
    """Place a finished upload at its content address and give `tenant` a record of it
    (the same record again if it already holds these bytes; a deleted one comes back).
    Returns (record, created). Quota-checked and audited."""
    info = upload.info
    assert info is not None
    lock_for_write(session)  # the rename below must not interleave with a deletion
    now = utcnow()
    keep = now + timedelta(days=retention_days) if retention_days > 0 else None
    row = session.execute(
        select(CorpusRecord).where(
            CorpusRecord.tenant == tenant, CorpusRecord.sha256 == info.sha256
        )
    ).scalar_one_or_none()
    if row is None or row.deleted_at is not None:
        check_quota(session, tenant, info.size, settings)
    location = upload.commit()
    register_blob(session, info, location)
    created = row is None or row.deleted_at is not None
    if row is None:
        row = CorpusRecord(
            tenant=tenant,
            sha256=info.sha256,
            size=info.size,
            records=info.records,
            format=info.format,
            created_at=now,
            keep_until=keep,
        )
        session.add(row)
    else:
        row.deleted_at = None
        row.deleted_reason = None
        if row.keep_until is None or (keep is not None and keep > row.keep_until):
            row.keep_until = keep
    session.flush()
    if created:
        audit.append(
            session,
            actor=actor,
            action="corpus_stored",
            tenant=tenant,
            payload=_identity(row) | {"retention_days": retention_days},
        )
    return row, created


def _identity(row: CorpusRecord) -> dict[str, Any]:
    return {"corpus_id": row.sha256, "size": row.size, "records": row.records}


def owned(session: Session, tenant: str, sha256: str, field: str = "corpus_id") -> CorpusRecord:
    """The tenant's live record; the same `NotFound` for unknown, deleted and another
    tenant's corpora (no existence oracle)."""
    row = _live(session, tenant, sha256)
    if row is None:
        raise NotFound(field, "corpus not found")
    return row


def _refs(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(field path, corpus ref) of a stored spec: forget, retain, and the membership
    check's holdout corpus (issue 15: `evaluation.robustness[i].holdout`)."""
    out = [(name, spec.get(name)) for name in ("forget", "retain")]
    checks = (spec.get("evaluation") or {}).get("robustness") or []
    if isinstance(checks, list):
        out += [(f"evaluation.robustness[{i}].holdout", c.get("holdout"))
                for i, c in enumerate(checks) if isinstance(c, dict)]
    return [(n, r) for n, r in out if isinstance(r, dict)]


def check_spec_corpora(
    session: Session, tenant: str, spec_data: dict[str, Any]
) -> dict[str, CorpusRecord]:
    """Every `corpus_id` of a remote client's spec must be a live corpus of its tenant.
    Returns those records by id (the submit's audit entry reads their size from them)."""
    found: dict[str, CorpusRecord] = {}
    for name, ref in _refs(spec_data):
        cid = ref.get("corpus_id")
        if cid is None:
            continue
        row = found.get(cid) or _live(session, tenant, cid)
        if row is None:
            raise SpecRejected(
                f"{name}.corpus_id",
                "no such corpus of this tenant (upload it with POST /v1/corpora)",
            )
        found[cid] = row
    return found


def list_records(session: Session, tenant: str, limit: int = 500) -> list[CorpusRecord]:
    return list(
        session.execute(
            select(CorpusRecord)
            .where(CorpusRecord.tenant == tenant, CorpusRecord.deleted_at.is_(None))
            .order_by(CorpusRecord.created_at.desc(), CorpusRecord.id.desc())
            .limit(limit)
        ).scalars()
    )


def _corpus_ids(spec: dict[str, Any]) -> set[str]:
    return {str(ref["corpus_id"]) for _, ref in _refs(spec) if ref.get("corpus_id")}


def _in_use(session: Session, tenant: str, sha256: str, *, except_job: str | None) -> bool:
    stmt = select(Job.id, Job.spec).where(Job.tenant == tenant, Job.state.in_(UNFINISHED))
    for job_id, spec in session.execute(stmt):
        if job_id != except_job and sha256 in _corpus_ids(spec or {}):
            return True
    return False


def _remove_blob(session: Session, sha256: str) -> bool:
    blob = session.get(Corpus, sha256)
    if blob is None:
        return False
    path = Path(blob.location)
    # The location is database data: only ever unlink a file at a corpus address.
    where = (path.name, path.parent.name, path.parent.parent.name)
    if where != (sha256, sha256[:2], "corpora"):
        return False
    existed = path.is_file()
    path.unlink(missing_ok=True)
    return existed


def _delete(session: Session, row: CorpusRecord, *, actor: str, reason: str) -> None:
    row.deleted_at = utcnow()
    row.deleted_reason = reason
    session.flush()
    holders = session.execute(
        select(func.count())
        .select_from(CorpusRecord)
        .where(CorpusRecord.sha256 == row.sha256, CorpusRecord.deleted_at.is_(None))
    ).scalar_one()
    blob_removed = False
    if holders == 0:
        blob_removed = _remove_blob(session, row.sha256)
    audit.append(
        session,
        actor=actor,
        action="corpus_deleted",
        tenant=row.tenant,
        payload=_identity(row) | {"reason": reason, "blob_removed": blob_removed},
    )


def delete(session: Session, tenant: str, sha256: str, *, actor: str) -> None:
    """DELETE /v1/corpora/{id}: refused (`IllegalTransition`, 409) while an unfinished job
    of the tenant names it; `NotFound` like an unknown id otherwise."""
    lock_for_write(session)
    row = owned(session, tenant, sha256)
    if _in_use(session, tenant, sha256, except_job=None):
        raise CorpusInUse("corpus_id", "an unfinished job uses this corpus; cancel it first")
    _delete(session, row, actor=actor, reason="deleted_by_client")


def release_for_job(session: Session, job: Job, *, actor: str) -> None:
    """Called when `job` reaches a terminal state: delete each of its tenant's corpora that
    no other unfinished job names and whose retention has passed. Then sweep."""
    now = utcnow()
    for sha in sorted(_corpus_ids(job.spec or {})):
        row = _live(session, job.tenant, sha)
        if row is None or (row.keep_until is not None and row.keep_until > now):
            continue
        if not _in_use(session, job.tenant, sha, except_job=job.id):
            _delete(session, row, actor=actor, reason="job_ended")
    sweep_expired(session, actor=actor, now=now)


def sweep_expired(session: Session, *, actor: str, now: datetime | None = None) -> int:
    """Delete records kept with `retention_days` whose time has passed and that no
    unfinished job names. Returns how many were deleted."""
    now = now or utcnow()
    rows: Iterable[CorpusRecord] = list(
        session.execute(
            select(CorpusRecord)
            .where(
                CorpusRecord.deleted_at.is_(None),
                CorpusRecord.keep_until.is_not(None),
                CorpusRecord.keep_until < now,
            )
            .limit(100)
        ).scalars()
    )
    n = 0
    for row in rows:
        if not _in_use(session, row.tenant, row.sha256, except_job=None):
            _delete(session, row, actor=actor, reason="retention_ended")
            n += 1
    return n


__all__ = [
    "CorpusInUse",
    "CorpusInfo",
    "QuotaExceeded",
    "check_quota",
    "check_spec_corpora",
    "delete",
    "list_records",
    "owned",
    "register",
    "release_for_job",
    "sweep_expired",
    "used_bytes",
]
