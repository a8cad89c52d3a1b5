"""Console pages for governance: the audit trail (auditors) and deletion requests.

    /console/audit      chain status (?verify=now recomputes it: the result, and the first
                        bad entry if any), the tenant's entries newest first with filters
                        (action, job) and pages (?before=seq), exported checkpoints
    /console/requests   deletion requests, overdue first (an empty state where the service
                        has none)
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select

from api.auth import request_session
from api.console import extras, web
from api.console.sessions import Viewer
from service import audit
from service.tables import AuditEntry

router = APIRouter(prefix="/console", include_in_schema=False)
PAGE = 50
ACTION = re.compile(r"^[a-z_]{1,64}$")
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@router.get("/audit")
def audit_page(request: Request) -> Response:
    q = request.query_params
    with request_session(request) as s:
        viewer = web.gate(request, s, web.AUDIT)
        if not isinstance(viewer, Viewer):
            return viewer
        action = q.get("action") or None
        job_id = q.get("job") or None
        before = q.get("before") or None
        if action and not ACTION.match(action):
            return web.error_page(request, viewer, 400, "Bad filter",
                                  "an action name: lower-case letters and _", field="action")
        if job_id and not JOB_ID.match(job_id):
            return web.error_page(request, viewer, 400, "Bad filter", "a job id", field="job")
        if before and (not before.isdigit() or len(before) > 18):
            return web.error_page(request, viewer, 400, "Bad filter", "an entry number",
                                  field="before")
        stmt = select(AuditEntry).where(AuditEntry.tenant == viewer.tenant)
        if action:
            stmt = stmt.where(AuditEntry.action == action)
        if job_id:
            stmt = stmt.where(AuditEntry.job_id == job_id)
        if before:
            stmt = stmt.where(AuditEntry.seq < int(before))
        rows = list(s.execute(stmt.order_by(AuditEntry.seq.desc()).limit(PAGE + 1)).scalars())
        entries = [audit.entry_to_dict(e) for e in rows[:PAGE]]
        verify = audit.verify(s) if q.get("verify") == "now" else None
        checkpoints = extras.audit_checkpoints(s)
    older = entries[-1]["seq"] if len(rows) > PAGE else None
    return web.render(
        request, "audit.html", viewer, entries=entries, verify=verify, older=older,
        action=action or "", job_filter=job_id or "", checkpoints=checkpoints,
    )


@router.get("/requests")
def requests_page(request: Request) -> Response:
    with request_session(request) as s:
        viewer = web.gate(request, s, web.READ_REQUESTS)
        if not isinstance(viewer, Viewer):
            return viewer
        items = extras.deletion_requests(s, viewer.tenant)
        s.commit()  # the due-date check's audit entries, as GET /v1/requests records them
    return web.render(request, "requests.html", viewer, items=items)
