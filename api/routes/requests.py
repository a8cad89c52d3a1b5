"""Deletion requests (issue 15): record one, list them (`?overdue=true`), read one with the
jobs that serve it, extend its due date once, close it. A job joins a request with
`POST /v1/jobs?request_id=...`. Another tenant's request is a 404 like a missing one."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from api.auth import read_jobs, request_session, write_jobs
from api.errors import ErrorBody
from api.routes.jobs import ID_PATTERN

router = APIRouter(prefix="/v1/requests", tags=["requests"])
RequestId = Annotated[str, PathParam(pattern=ID_PATTERN, description="The request id.")]
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid API key."},
    403: {"model": ErrorBody, "description": "The key's role may not do this."},
    404: {"model": ErrorBody, "description": "No such request (or another tenant's)."},
    409: {"model": ErrorBody, "description": "Not allowed in the request's state."},
    422: {"model": ErrorBody, "description": "Invalid input; the body names the field."},
}
# Visible text without control characters; the reference is the requester's case number.
TEXT = r"^[^\x00-\x1f\x7f]+$"


class RequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reference: str = Field(min_length=1, max_length=128, pattern=TEXT,
                           description="The requester's own case number (unique per tenant).")
    subject: str | None = Field(None, max_length=256, pattern=TEXT,
                                description="A pseudonymous subject id (never a name).")
    received_at: datetime | None = Field(
        None, description="When the request was received (default: now); the due date is "
        "one month later (MOE_UNLEARN_REQUEST_DUE_DAYS)."
    )


class ExtendIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    days: int = Field(ge=1, le=61, description="Extra days (at most two further months).")
    reason: str = Field(min_length=1, max_length=400, pattern=TEXT)


class CloseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    override_reason: str | None = Field(
        None, min_length=1, max_length=400, pattern=TEXT,
        description="Needed to close while a robustness check failed; goes to the audit trail.",
    )


class RequestJobOut(BaseModel):
    job_id: str
    state: str
    failed_checks: list[str]


class RequestOut(BaseModel):
    id: str
    reference: str
    subject: str | None
    status: str
    received_at: str
    due_at: str
    extended: bool
    overdue: bool
    closed_at: str | None
    jobs: list[RequestJobOut]


class RequestList(BaseModel):
    items: list[RequestOut]


def _out(session: Any, req: Any) -> RequestOut:
    from service import requests

    return RequestOut(**requests.request_to_dict(session, req))


@router.post("", status_code=201, response_model=RequestOut, responses=_ERRORS)
def create_request(
    body: RequestIn, request: Request, principal: Any = Depends(write_jobs)
) -> RequestOut:
    """Record a deletion request (due one month after receipt)."""
    from service import requests

    with request_session(request) as session:
        req = requests.create_request(
            session, principal.tenant, body.reference, subject=body.subject,
            received_at=body.received_at, actor=f"key:{principal.key_id}",
            created_by=principal.key_id,
        )
        out = _out(session, req)
        session.commit()
    return out


@router.get("", response_model=RequestList, responses=_ERRORS)
def list_requests(
    request: Request,
    overdue: bool = Query(False, description="Only open requests past their due date."),
    limit: int = Query(100, ge=1, le=500),
    principal: Any = Depends(read_jobs),
) -> RequestList:
    """The tenant's requests, soonest due first. Runs the due-date check first, so a
    request found past due gets its `request_overdue` audit entry."""
    from service import requests

    with request_session(request) as session:
        requests.report_overdue(session)
        session.commit()
        rows = requests.list_requests(session, principal.tenant, overdue=overdue, limit=limit)
        return RequestList(items=[_out(session, r) for r in rows])


@router.get("/{request_id}", response_model=RequestOut, responses=_ERRORS)
def get_request(
    request: Request, request_id: RequestId, principal: Any = Depends(read_jobs)
) -> RequestOut:
    """One request with its jobs (state, failed robustness checks)."""
    from service import requests

    with request_session(request) as session:
        return _out(session, requests.get_request(session, request_id, principal.tenant))


@router.post("/{request_id}/extend", response_model=RequestOut, responses=_ERRORS)
def extend_request(
    body: ExtendIn, request: Request, request_id: RequestId,
    principal: Any = Depends(write_jobs),
) -> RequestOut:
    """Extend the due date once (GDPR Art. 12(3): by up to two further months)."""
    from service import requests

    with request_session(request) as session:
        req = requests.extend_due(session, request_id, principal.tenant, body.days,
                                  body.reason, actor=f"key:{principal.key_id}")
        out = _out(session, req)
        session.commit()
    return out


@router.post("/{request_id}/close", response_model=RequestOut, responses=_ERRORS)
def close_request(
    body: CloseIn, request: Request, request_id: RequestId,
    principal: Any = Depends(write_jobs),
) -> RequestOut:
    """Close as done: every job SUCCEEDED and no robustness check failed, or an override
    reason (recorded in the audit trail)."""
    from service import requests

    with request_session(request) as session:
        req = requests.close_request(session, request_id, principal.tenant,
                                     actor=f"key:{principal.key_id}",
                                     override_reason=body.override_reason)
        out = _out(session, req)
        session.commit()
    return out
