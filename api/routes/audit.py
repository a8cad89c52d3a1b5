"""Audit endpoints for governance (role auditor): the hash-chained log and its check."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import func, select

from api.auth import audit_access, request_session
from api.errors import ErrorBody
from api.routes.jobs import ID_PATTERN
from api.schemas import AuditEntryOut, AuditList, AuditVerifyOut
from service import audit
from service.tables import AuditEntry

router = APIRouter(
    prefix="/v1/audit",
    tags=["audit"],
    responses={
        401: {"model": ErrorBody, "description": "Missing or invalid API key."},
        403: {"model": ErrorBody, "description": "Not an auditor key."},
        422: {"model": ErrorBody, "description": "Invalid query parameter."},
    },
)


@router.get("/events", response_model=AuditList)
def audit_events(
    request: Request,
    since: int = Query(0, ge=0, le=2**62, description="Only entries with seq > since."),
    limit: int = Query(100, ge=1, le=1000),
    job_id: str | None = Query(None, pattern=ID_PATTERN, description="One job only."),
    principal: Any = Depends(audit_access),
) -> AuditList:
    """Audit entries of the auditor's tenant, oldest first (payloads hold ids, hashes and
    counts, never corpus text)."""
    with request_session(request) as session:
        rows = audit.list_entries(
            session, tenant=principal.tenant, job_id=job_id, after_seq=since, limit=limit
        )
        items = [AuditEntryOut(**audit.entry_to_dict(e)) for e in rows]
    return AuditList(items=items, next_since=items[-1].seq if items else since)


@router.get("/verify", response_model=AuditVerifyOut)
def audit_verify(
    request: Request,
    principal: Any = Depends(audit_access),
    against: str | None = Query(
        None, max_length=4096, description="A signed checkpoint (its JSON) from "
        "GET /v1/audit/checkpoints: also check that the chain still extends it."
    ),
) -> AuditVerifyOut:
    """Recompute the whole hash chain. Counts are the auditor's tenant's: `checked` is how
    many of its entries were verified, `head_seq`/`head_hash` its newest entry. `ok` is
    false if the chain is broken anywhere; `first_bad_seq` names the first bad entry only
    when it is one of the tenant's (another tenant's activity is not shown). With `against`,
    also check that the chain still extends that checkpoint (whose head is the chain's)."""
    if against is not None:  # issue 15: service/checkpoints.py
        from api.routes.proof import verify_against

        return verify_against(request, against)
    tenant = principal.tenant
    with request_session(request) as session:
        r = audit.verify(session)
        mine = select(AuditEntry).where(AuditEntry.tenant == tenant)
        upto = r.first_bad_seq - 1 if r.first_bad_seq is not None else r.head_seq
        checked = session.execute(
            select(func.count()).select_from(mine.where(AuditEntry.seq <= upto).subquery())
        ).scalar_one()
        head = session.execute(mine.order_by(AuditEntry.seq.desc()).limit(1)).scalar_one_or_none()
        bad = None
        if r.first_bad_seq is not None:
            row = session.get(AuditEntry, r.first_bad_seq)
            bad = r.first_bad_seq if row is not None and row.tenant == tenant else None
    reason = r.reason
    if not r.ok and bad is None:
        reason = "the chain is broken outside this tenant's entries"
    return AuditVerifyOut(
        ok=r.ok,
        checked=int(checked),
        first_bad_seq=bad,
        reason=reason,
        head_seq=head.seq if head is not None else 0,
        head_hash=head.entry_hash if head is not None else "0" * 64,
    )
