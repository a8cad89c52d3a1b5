"""Features other parts of the service may or may not have yet: deletion requests with due
dates, exported audit checkpoints, the deletion request a job serves. Each reader returns
None when the feature is absent, and the page then says "not available" instead of failing.

They look for the shapes the design names (service/requests.py with `list_requests`,
service/audit.py with `list_checkpoints`, a `request_id` on jobs); rows become plain dicts
here, so the templates depend on field names only.
"""

from __future__ import annotations

import importlib
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from service.tables import Job

MAX_ROWS = 500
log = logging.getLogger(__name__)


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


def job_request_filter_available() -> bool:
    return hasattr(Job, "request_id")


def deletion_requests(session: Session, tenant: str) -> list[dict[str, Any]] | None:
    """The tenant's deletion requests, overdue first, then by due date; None if the service
    has no deletion requests."""
    try:
        mod = importlib.import_module("service.requests")
    except ImportError:
        return None
    lister = getattr(mod, "list_requests", None)
    if lister is None:
        return None
    try:
        rows = [_as_dict(r) for r in list(lister(session, tenant))[:MAX_ROWS]]
    except TypeError as e:  # another shape than this page knows: say "not available"
        log.warning("deletion requests not shown: %s", e)
        return None
    now = datetime.now(UTC)
    out = []
    for r in rows:
        due = _when(r.get("due_at") or r.get("due_date") or r.get("due"))
        status = str(r.get("status") or "open")
        closed = status.lower() in ("done", "closed", "completed", "rejected")
        out.append({
            "id": r.get("id"),
            "reference": r.get("reference") or r.get("subject") or "",
            "received": _when(r.get("received_at") or r.get("received") or r.get("created_at")),
            "due": due,
            "status": status,
            "overdue": bool(due and due < now and not closed),
            "jobs": r.get("job_ids") or r.get("jobs") or [],
        })
    far = datetime.max.replace(tzinfo=UTC)
    out.sort(key=lambda r: (not r["overdue"], r["due"] or far))
    return out


def audit_checkpoints(session: Session) -> list[dict[str, Any]] | None:
    """Exported, signed checkpoints of the audit chain head; None if the service has none."""
    from service import audit

    lister = getattr(audit, "list_checkpoints", None)
    if lister is None:
        return None
    try:
        rows = list(lister(session))[:MAX_ROWS]
    except TypeError as e:
        log.warning("audit checkpoints not shown: %s", e)
        return None
    out = []
    for r in rows:
        d = _as_dict(r)
        out.append({
            "seq": d.get("seq") or d.get("head_seq"),
            "hash": d.get("hash") or d.get("head_hash") or d.get("entry_hash"),
            "time": d.get("ts") or d.get("time") or d.get("created_at"),
            "key_id": d.get("key_id"),
            "location": d.get("location") or d.get("exported_to"),
        })
    return out
