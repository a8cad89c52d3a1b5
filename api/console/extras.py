"""What the console reads from the proof-of-deletion parts of the service (issue 15):
deletion requests with due dates, the request a job serves, exported audit checkpoints.
Each reader returns None where the service has no such part, and the page then says
"not available" instead of failing.

The parts are looked up by the names issue 15 gave them: `service.requests`
(`list_requests(session, tenant, *, overdue, limit)`, `request_to_dict(session, row)`,
`report_overdue(session)`), `service.checkpoints.list_checkpoints(session, limit)` (signed
checkpoint documents: seq, entry_hash, time, kind, signature) and the table
`DeletionRequestJob(request_id, job_id)`. Rows become plain dicts here, so the templates
depend on field names only.
"""

from __future__ import annotations

import importlib
import logging
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from service import tables
from service.tables import Job

MAX_ROWS = 500
log = logging.getLogger(__name__)


def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _as_dict(row: Any) -> dict[str, Any]:
    if isinstance(row, dict):
        return dict(row)
    table = getattr(row, "__table__", None)
    if table is not None:
        return {c.key: getattr(row, c.key, None) for c in table.columns}
    return {k: v for k, v in vars(row).items() if not k.startswith("_")}


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


def _request_jobs_table() -> Any:
    return getattr(tables, "DeletionRequestJob", None)


def job_request_filter_available() -> bool:
    return _request_jobs_table() is not None


def filter_jobs_by_request(stmt: Select[Any], request_id: str) -> Select[Any] | None:
    """`stmt` restricted to the jobs of one deletion request; None without requests."""
    link = _request_jobs_table()
    if link is None:
        return None
    return stmt.where(Job.id.in_(select(link.job_id).where(link.request_id == request_id)))


def request_of_job(session: Session, job_id: str) -> str | None:
    link = _request_jobs_table()
    if link is None:
        return None
    return session.execute(
        select(link.request_id).where(link.job_id == job_id)
    ).scalar_one_or_none()


def deletion_requests(session: Session, tenant: str) -> list[dict[str, Any]] | None:
    """The tenant's deletion requests, overdue first, then by due date; None if the service
    has no deletion requests. Runs the due-date check first, as GET /v1/requests does (it
    records `request_overdue` in the audit trail once per request); the caller commits."""
    mod = _module("service.requests")
    if mod is None or not hasattr(mod, "list_requests"):
        return None
    try:
        if hasattr(mod, "report_overdue"):
            mod.report_overdue(session)
        rows = list(mod.list_requests(session, tenant, limit=MAX_ROWS))[:MAX_ROWS]
        to_dict = getattr(mod, "request_to_dict", None)
        dicts = [to_dict(session, r) if to_dict else _as_dict(r) for r in rows]
    except TypeError as e:  # another shape than this page knows: say "not available"
        log.warning("deletion requests not shown: %s", e)
        return None
    now = datetime.now(UTC)
    out = []
    for r in dicts:
        due = _when(r.get("due_at"))
        status = str(r.get("status") or "open")
        overdue = r["overdue"] if "overdue" in r else bool(due and due < now and status == "open")
        jobs = [
            {"id": j.get("job_id"), "state": j.get("state")} if isinstance(j, dict)
            else {"id": str(j), "state": None}
            for j in (r.get("jobs") or [])
        ]
        out.append({
            "id": r.get("id"),
            "reference": r.get("reference") or "",
            "subject": r.get("subject"),
            "received": _when(r.get("received_at")),
            "due": due,
            "extended": bool(r.get("extended")),
            "status": status,
            "overdue": bool(overdue),
            "jobs": jobs,
        })
    far = datetime.max.replace(tzinfo=UTC)
    out.sort(key=lambda r: (not r["overdue"], r["due"] or far))
    return out


def audit_checkpoints(session: Session) -> list[dict[str, Any]] | None:
    """Stored signed checkpoints of the audit chain head, newest first; None if the service
    has none."""
    mod = _module("service.checkpoints")
    if mod is None or not hasattr(mod, "list_checkpoints"):
        return None
    try:
        docs = list(mod.list_checkpoints(session, MAX_ROWS))[:MAX_ROWS]
    except TypeError as e:
        log.warning("audit checkpoints not shown: %s", e)
        return None
    from service.certificate_html import fingerprint_of

    out = []
    for d in (_as_dict(x) for x in docs):
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
