"""What the console reads from the proof-of-deletion parts of the service (issue 15):
deletion requests with due dates, the request a job serves, exported audit checkpoints.
Rows become plain dicts here, so the templates depend on field names only."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from service import checkpoints, requests
from service.certificate_html import fingerprint_of
from service.tables import DeletionRequestJob, Job

MAX_ROWS = 500


def _when(v: Any) -> datetime | None:
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=UTC)
    if isinstance(v, str):
        try:
            d = datetime.fromisoformat(v)
        except ValueError:
            return None
        return d if d.tzinfo else d.replace(tzinfo=UTC)
    return None


def filter_jobs_by_request(stmt: Select[Any], request_id: str) -> Select[Any]:
    """`stmt` restricted to the jobs of one deletion request."""
    link = DeletionRequestJob
    return stmt.where(Job.id.in_(select(link.job_id).where(link.request_id == request_id)))


def request_of_job(session: Session, job_id: str) -> str | None:
    return session.execute(
        select(DeletionRequestJob.request_id).where(DeletionRequestJob.job_id == job_id)
    ).scalar_one_or_none()


def deletion_requests(session: Session, tenant: str) -> list[dict[str, Any]]:
    """The tenant's deletion requests, overdue first, then by due date. Runs the due-date
    check first, as GET /v1/requests does (it records `request_overdue` in the audit trail
    once per request); the caller commits."""
    requests.report_overdue(session)
    rows = requests.list_requests(session, tenant, limit=MAX_ROWS)
    out = []
    for r in (requests.request_to_dict(session, row) for row in rows):
        out.append({
            "id": r["id"],
            "reference": r["reference"] or "",
            "subject": r["subject"],
            "received": _when(r["received_at"]),
            "due": _when(r["due_at"]),
            "extended": bool(r["extended"]),
            "status": str(r["status"]),
            "overdue": bool(r["overdue"]),
            "jobs": [{"id": j["job_id"], "state": j["state"]} for j in r["jobs"]],
        })
    far = datetime.max.replace(tzinfo=UTC)
    out.sort(key=lambda r: (not r["overdue"], r["due"] or far))
    return out


def audit_checkpoints(session: Session) -> list[dict[str, Any]]:
    """Stored signed checkpoints of the audit chain head, newest first."""
    out = []
    for d in checkpoints.list_checkpoints(session, MAX_ROWS):
        sig = d.get("signature") if isinstance(d.get("signature"), dict) else {}
        out.append({
            "seq": d.get("seq"),
            "hash": d.get("entry_hash"),
            "time": d.get("time"),
            "kind": d.get("kind"),
            "key_id": sig.get("key_id"),
            "fingerprint": fingerprint_of(sig.get("public_key")),
        })
    return out
