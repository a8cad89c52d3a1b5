"""Deletion requests as records: a reference (the requester's case number) and an optional
pseudonymous subject id, the date received and the due date (GDPR Art. 12(3): one month,
extendable once by up to two further months), a status, and the jobs that serve it.

Every change is an audit entry in the same transaction: `request_received` (with the due
date), `request_due_extended`, `request_job_added`, `request_overdue` (the first time a
due-date check finds it open past its due date), `robustness_override` and
`request_closed`. A request is closed as `done` only when every job that joined it
SUCCEEDED and none has a robustness check that failed - unless the closer gives an
override reason, which the audit trail records with the failed checks.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import audit, jobs, proof
from service.db import lock_for_write
from service.errors import IllegalTransition, InvalidArgument, NotFound
from service.settings import get_settings
from service.tables import DeletionRequest, DeletionRequestJob, Job, utcnow

OPEN, DONE = "open", "done"
MAX_EXTENSION_DAYS = 61  # "two further months"
MAX_BACKDATE_DAYS = 366  # a request received more than a year ago is a typo
MAX_REASON = 400


@dataclass(frozen=True)
class RequestJob:
    job_id: str
    state: str
    failed_checks: list[str]


def _now() -> datetime:
    return utcnow()


def create_request(
    session: Session,
    tenant: str,
    reference: str,
    *,
    actor: str,
    subject: str | None = None,
    received_at: datetime | None = None,
    created_by: str | None = None,
    due_days: int | None = None,
) -> DeletionRequest:
    """Record a deletion request; its due date is `received_at + due_days` (settings)."""
    now = _now()
    received = received_at or now
    if received.tzinfo is None:
        raise InvalidArgument("received_at", "must carry a timezone (e.g. 2026-01-31T09:00Z)")
    if received > now + timedelta(minutes=5):
        raise InvalidArgument("received_at", "must not be in the future")
    if received < now - timedelta(days=MAX_BACKDATE_DAYS):
        raise InvalidArgument("received_at", f"more than {MAX_BACKDATE_DAYS} days ago")
    days = due_days or get_settings().request_due_days
    lock_for_write(session)
    dup = session.execute(
        select(DeletionRequest.id).where(
            DeletionRequest.tenant == tenant, DeletionRequest.reference == reference
        )
    ).first()
    if dup is not None:
        raise InvalidArgument("reference", "a request with this reference already exists")
    req = DeletionRequest(
        id=str(uuid.uuid4()), tenant=tenant, reference=reference, subject=subject,
        received_at=received, due_at=received + timedelta(days=days), extended=False,
        status=OPEN, created_by=created_by, created_at=now, overdue_reported=False,
    )
    session.add(req)
    try:
        session.flush()
    except IntegrityError:  # a concurrent request with the same reference won the race
        raise InvalidArgument("reference", "a request with this reference already exists") from None
    audit.append(session, actor=actor, action="request_received", tenant=tenant, payload={
        "request_id": req.id, "reference_sha256": _sha(reference),
        "received_at": received.isoformat(), "due_at": req.due_at.isoformat(),
    })
    return req


def _sha(s: str) -> str:
    # The reference may name a person's case: the audit trail keeps its hash only.
    return hashlib.sha256(s.encode()).hexdigest()


def get_request(
    session: Session, request_id: str, tenant: str | None = None, *, for_update: bool = False
) -> DeletionRequest:
    stmt = select(DeletionRequest).where(DeletionRequest.id == request_id)
    if for_update:
        stmt = stmt.with_for_update()
    req = session.execute(stmt).scalar_one_or_none()
    if req is None or (tenant is not None and req.tenant != tenant):
        raise NotFound("request_id", "request not found")
    return req


def list_requests(
    session: Session, tenant: str, *, overdue: bool = False, limit: int = 100
) -> list[DeletionRequest]:
    """The tenant's requests, soonest due first (`overdue`: open and past due only)."""
    stmt = select(DeletionRequest).where(DeletionRequest.tenant == tenant)
    if overdue:
        stmt = stmt.where(DeletionRequest.status == OPEN, DeletionRequest.due_at < _now())
    stmt = stmt.order_by(DeletionRequest.due_at, DeletionRequest.id).limit(limit)
    return list(session.execute(stmt).scalars())


def report_overdue(session: Session, *, actor: str = "service:due-check") -> list[str]:
    """Append `request_overdue` once for every open request past its due date (the
    due-date check: run by `GET /v1/requests` and `moe-unlearn requests check-due`)."""
    now = _now()
    due = list(session.execute(
        select(DeletionRequest).where(
            DeletionRequest.status == OPEN,
            DeletionRequest.due_at < now,
            DeletionRequest.overdue_reported.is_(False),
        ).limit(1000)
    ).scalars())
    if not due:
        return []
    lock_for_write(session)
    reported = []
    for req in due:
        # Only the transaction that flips the flag reports it (concurrent checks race).
        n = session.execute(
            update(DeletionRequest)
            .where(DeletionRequest.id == req.id, DeletionRequest.overdue_reported.is_(False))
            .values(overdue_reported=True)
            .execution_options(synchronize_session=False)
        ).rowcount
        if n:
            audit.append(session, actor=actor, action="request_overdue", tenant=req.tenant,
                         payload={"request_id": req.id, "due_at": req.due_at.isoformat()})
            reported.append(req.id)
    return reported


def extend_due(
    session: Session, request_id: str, tenant: str, days: int, reason: str, *, actor: str
) -> DeletionRequest:
    """Extend the due date once, by at most two further months, with a reason."""
    if not 1 <= days <= MAX_EXTENSION_DAYS:
        raise InvalidArgument("days", f"must be 1..{MAX_EXTENSION_DAYS}")
    lock_for_write(session)
    req = get_request(session, request_id, tenant, for_update=True)
    if req.extended:
        raise IllegalTransition(req.id, "extended", "extended", "the due date was extended once")
    if req.status != OPEN:
        raise IllegalTransition(req.id, req.status, "extended", "the request is closed")
    req.due_at = req.due_at + timedelta(days=days)
    req.extended = True
    req.overdue_reported = False if req.due_at > _now() else req.overdue_reported
    audit.append(session, actor=actor, action="request_due_extended", tenant=tenant,
                 payload={"request_id": req.id, "days": days, "due_at": req.due_at.isoformat(),
                          "reason_sha256": _sha(reason[:MAX_REASON])})
    session.flush()
    return req


def attach_job(
    session: Session, request_id: str, tenant: str, job_id: str, *, actor: str
) -> None:
    """A job joins an open request of the same tenant (`NotFound` otherwise)."""
    req = get_request(session, request_id, tenant)
    if req.status != OPEN:
        raise IllegalTransition(req.id, req.status, "job added", "the request is closed")
    jobs.get_job(session, job_id, tenant)
    session.add(DeletionRequestJob(request_id=req.id, job_id=job_id, added_at=_now()))
    session.flush()
    audit.append(session, actor=actor, action="request_job_added", tenant=tenant,
                 job_id=job_id, payload={"request_id": req.id})


def request_jobs(session: Session, request_id: str) -> list[RequestJob]:
    rows = session.execute(
        select(Job.id, Job.state)
        .join(DeletionRequestJob, DeletionRequestJob.job_id == Job.id)
        .where(DeletionRequestJob.request_id == request_id)
        .order_by(Job.created_at, Job.id)
    ).all()
    return [RequestJob(jid, state, proof.failed_checks(session, jid)) for jid, state in rows]


def close_request(
    session: Session,
    request_id: str,
    tenant: str,
    *,
    actor: str,
    override_reason: str | None = None,
) -> DeletionRequest:
    """Close as done: needs at least one job, every job SUCCEEDED, and no failed robustness
    check unless `override_reason` (recorded in the audit trail)."""
    lock_for_write(session)
    req = get_request(session, request_id, tenant, for_update=True)
    if req.status != OPEN:
        raise IllegalTransition(req.id, req.status, DONE, "the request is already closed")
    rj = request_jobs(session, req.id)
    if not rj:
        raise IllegalTransition(req.id, req.status, DONE, "no job has served this request")
    unfinished = [j.job_id for j in rj if j.state != "SUCCEEDED"]
    if unfinished:
        raise IllegalTransition(req.id, req.status, DONE,
                                f"jobs not SUCCEEDED: {', '.join(unfinished[:5])}")
    failed = {j.job_id: j.failed_checks for j in rj if j.failed_checks}
    if failed and not override_reason:
        names = "; ".join(f"{k}: {', '.join(v)}" for k, v in list(failed.items())[:5])
        raise IllegalTransition(
            req.id, req.status, DONE,
            f"robustness checks failed ({names}); closing needs an override reason",
        )
    if failed:
        audit.append(session, actor=actor, action="robustness_override", tenant=tenant,
                     payload={"request_id": req.id, "failed": failed,
                              "reason": (override_reason or "")[:MAX_REASON]})
    req.status = DONE
    req.closed_at = _now()
    audit.append(session, actor=actor, action="request_closed", tenant=tenant,
                 payload={"request_id": req.id, "jobs": [j.job_id for j in rj],
                          "on_time": req.closed_at <= req.due_at})
    session.flush()
    return req


def request_to_dict(session: Session, req: DeletionRequest) -> dict[str, Any]:
    now = _now()
    return {
        "id": req.id,
        "reference": req.reference,
        "subject": req.subject,
        "status": req.status,
        "received_at": req.received_at.isoformat(),
        "due_at": req.due_at.isoformat(),
        "extended": req.extended,
        "overdue": req.status == OPEN and req.due_at < now,
        "closed_at": req.closed_at.isoformat() if req.closed_at else None,
        "jobs": [
            {"job_id": j.job_id, "state": j.state, "failed_checks": j.failed_checks}
            for j in request_jobs(session, req.id)
        ],
    }
