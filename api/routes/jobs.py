"""Jobs: submit, list, read, cancel, progress events (JSON or server-sent events), and the
results of a job (expert map, evaluations, artifacts, deletion certificate).

Every read goes through `jobs.get_job(session, id, tenant)`, so another tenant's job is
a 404 exactly like a missing one. Each endpoint opens its session with
`with request_session(request)` in its own body, so the database connection is returned
before the endpoint returns (why: api/auth.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import ConfigDict, TypeAdapter, create_model
from pydantic_core import from_json
from sqlalchemy.orm import Session

from api.auth import note_cross_tenant, read_jobs, request_session, write_jobs
from api.errors import ApiError, ErrorBody
from api.schemas import (
    TERMINAL_STATES,
    ArtifactList,
    ArtifactOut,
    EvaluationList,
    EvaluationOut,
    EventList,
    EventOut,
    ExpertMapOut,
    ExpertScoreOut,
    JobList,
    JobOut,
    JobState,
    RoutingOverlapOut,
)
from service import jobs, routing_scores
from service.db import session_scope
from service.errors import NotFound, SpecRejected
from service.storage import BlobStore
from workers.spec import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# Idempotency keys: visible ASCII without spaces (UUIDs, ULIDs, client request ids).
IDEMPOTENCY_PATTERN = r"^[!-~]{1,255}$"
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
JobId = Annotated[str, PathParam(pattern=ID_PATTERN, description="The job id.")]
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid API key."},
    403: {"model": ErrorBody, "description": "The key's role may not do this."},
    404: {"model": ErrorBody, "description": "No such job (or another tenant's)."},
    422: {"model": ErrorBody, "description": "Invalid input; the body names the field."},
}
SSE_POLL_SECONDS = 0.5
SSE_KEEPALIVE_SECONDS = 15.0
_LIMITED = {429: {"model": ErrorBody, "description": "A tenant limit; see `Retry-After`."}}


def _job(session: Session, job_id: str, principal: Any, request: Request | None = None) -> Any:
    try:
        return jobs.get_job(session, job_id, principal.tenant)
    except NotFound:
        if request is not None:
            note_cross_tenant(request, principal, "job", job_id)
        raise


_CLOSED_REQUEST = {
    409: {"model": ErrorBody, "description": "`request_id` names a closed deletion request."}
}


@router.post(
    "", status_code=202, response_model=JobOut,
    responses={**_ERRORS, **_LIMITED, **_CLOSED_REQUEST},
)
def submit_job(
    spec: JobSpec,
    request: Request,
    response: Response,
    principal: Any = Depends(write_jobs),
    idempotency_key: str | None = Header(
        None,
        alias="Idempotency-Key",
        pattern=IDEMPOTENCY_PATTERN,
        description="Retry-safe submission: the same key and body return the same job; "
        "the same key with another body is refused (422).",
    ),
    request_id: str | None = Query(
        None, pattern=ID_PATTERN, description="The deletion request this job serves."
    ),
) -> Any:
    """Queue an unlearning job. The body is the job spec (the same as `moe-unlearn run`
    takes); corpora must be uploaded first (POST /v1/corpora) and named by `corpus_id`;
    `model` is `demo`, a registered model (GET /v1/models) or `job:<id>`. A job that cannot
    fit the cluster is refused (422, with the numbers); beyond the tenant's unfinished-job
    limit the answer is 429."""
    try:
        with request_session(request) as session:
            result = jobs.submit_job(
                session,
                spec,
                tenant=principal.tenant,
                actor=f"key:{principal.key_id}",
                idempotency_key=idempotency_key,
                requester=principal.key_id,
                remote=True,
                settings=request.app.state.settings,
            )
            if request_id is not None and result.created:  # issue 15: join the request
                _join_request(session, request_id, principal, result.job.id)
            session.commit()
    except SpecRejected as e:
        if e.field.endswith("corpus_id"):
            ref = dict(spec.corpus_refs()).get(e.field.removesuffix(".corpus_id"))
            if ref is not None and ref.corpus_id:
                note_cross_tenant(request, principal, "corpus", ref.corpus_id)
        raise
    response.headers["Location"] = f"/v1/jobs/{result.job.id}"
    if idempotency_key is not None:
        response.headers["Idempotency-Replayed"] = "false" if result.created else "true"
    return result.job


def _join_request(session: Session, request_id: str, principal: Any, job_id: str) -> None:
    from service import requests
    from service.errors import IllegalTransition, NotFound

    try:
        requests.attach_job(session, request_id, principal.tenant, job_id,
                            actor=f"key:{principal.key_id}")
    except NotFound:
        raise ApiError(422, "request_id", "no such deletion request", location="query") from None
    except IllegalTransition:
        # The job is not queued either: the caller's transaction rolls back.
        raise ApiError(
            409, "request_id", "the deletion request is closed", location="query"
        ) from None


@router.get("", response_model=JobList, responses=_ERRORS)
def list_jobs(
    request: Request,
    state: JobState | None = Query(None, description="Only jobs in this state."),
    cursor: str | None = Query(
        None, max_length=512, description="`next_cursor` of the previous page."
    ),
    limit: int | None = Query(None, ge=1, le=500, description="Page size."),
    principal: Any = Depends(read_jobs),
) -> Response:
    """Jobs of the caller's tenant, newest first."""
    settings = request.app.state.settings
    n = min(limit or settings.page_size, settings.max_page_size)
    with request_session(request) as session:
        page = jobs.list_jobs(
            session, principal.tenant, state=state, cursor=cursor, limit=n, spec_text=True
        )
    return Response(_job_list_json(page), media_type="application/json")


# A job without its spec: the list serialises these fields per job and splices in the
# spec's stored JSON text. Decoding 50 stored specs (~2 KB each), validating and encoding
# them again was most of a list's server CPU (bench/api_load.py --profile).
_JobHead = create_model(
    "JobHead",
    __config__=ConfigDict(from_attributes=True),
    **{k: (f.annotation, f) for k, f in JobOut.model_fields.items() if k != "spec"},  # type: ignore[call-overload]
)
_JOB_HEAD: TypeAdapter[Any] = TypeAdapter(_JobHead)
_JOB_OUT: TypeAdapter[JobOut] = TypeAdapter(JobOut)
# json.dumps writes non-finite floats as these bare words, which are not JSON; the
# model path writes them as null.
_NOT_JSON = ("NaN", "Infinity")


def _job_list_json(page: jobs.JobPage) -> bytes:
    """The JobList body of `page` (read with spec_text=True), as the response model
    would write it."""
    assert page.spec_json is not None
    items = []
    for job, spec in zip(page.items, page.spec_json, strict=True):
        head = _JobHead.model_validate(job)
        if any(w in spec for w in _NOT_JSON):
            out = JobOut.model_validate(head.model_dump() | {"spec": from_json(spec)})
            items.append(_JOB_OUT.dump_json(out))
        else:
            items.append(_JOB_HEAD.dump_json(head)[:-1] + b',"spec":' + spec.encode() + b"}")
    cursor = json.dumps(page.next_cursor).encode()
    return b'{"items":[' + b",".join(items) + b'],"next_cursor":' + cursor + b"}"


@router.get("/{job_id}", response_model=JobOut, responses=_ERRORS)
def get_job(request: Request, job_id: JobId, principal: Any = Depends(read_jobs)) -> Any:
    with request_session(request) as session:
        return _job(session, job_id, principal, request)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    responses={**_ERRORS, 409: {"model": ErrorBody, "description": "Already finished."}},
)
def cancel_job(request: Request, job_id: JobId, principal: Any = Depends(write_jobs)) -> Any:
    """Cancel: a queued job is CANCELLED at once, a running one becomes CANCELLING (its
    runner stops at its next heartbeat). Repeating a cancel is harmless."""
    with request_session(request) as session:
        job = jobs.request_cancel(
            session, job_id, principal.tenant, actor=f"key:{principal.key_id}"
        )
        session.commit()
    return job


def _event_dict(e: Any) -> dict[str, Any]:
    return EventOut.model_validate(e).model_dump(mode="json")


def _sse_event(ev: dict[str, Any]) -> bytes:
    return format_sse_event(data_str=json.dumps(ev), event=str(ev["kind"]), id=str(ev["id"]))


async def _sse(request: Request, job_id: str, since: int, tenant: str) -> AsyncIterator[bytes]:
    """Server-sent events until the job is terminal and every event was sent, or until the
    stream's maximum lifetime (then `event: timeout`; reconnect with `Last-Event-ID`).
    Each poll reads the state *before* the events, so a terminal state implies all events
    are in. Holds one of the tenant's stream slots while it lives.

    Async on purpose: a sync generator holds one of the threadpool's 40 threads from one
    sent line to the next, so 40 quiet watchers starved every other endpoint. Only the
    short database poll runs on a thread; the wait between polls is on the event loop."""
    factory = request.app.state.session_factory
    slots = request.app.state.streams
    lifetime = float(request.app.state.settings.stream_max_s)

    def poll(after: int) -> tuple[str, list[dict[str, Any]]]:
        with session_scope(factory) as s:
            state = jobs.get_job(s, job_id).state
            batch = jobs.list_events(s, job_id, since=after, limit=500)
            return state, [_event_dict(e) for e in batch]

    try:
        started = last_sent = time.monotonic()
        yield b"retry: 2000\n\n"
        while True:
            state, events = await run_in_threadpool(poll, since)
            for ev in events:
                since = ev["id"]
                yield _sse_event(ev)
                last_sent = time.monotonic()
            if len(events) == 500:
                continue  # more are waiting
            if state in TERMINAL_STATES:
                end = {"kind": "end", "job_state": state, "next_since": since}
                yield format_sse_event(data_str=json.dumps(end), event="end")
                return
            if time.monotonic() - started > lifetime:
                # A stream of a job that stays queued must not live forever.
                end = {"kind": "timeout", "job_state": state, "next_since": since}
                yield format_sse_event(data_str=json.dumps(end), event="timeout")
                return
            if await request.is_disconnected():
                return  # the client left: stop polling for it
            if time.monotonic() - last_sent > SSE_KEEPALIVE_SECONDS:
                yield b": keep-alive\n\n"  # keeps proxies from closing the stream
                last_sent = time.monotonic()
            await asyncio.sleep(SSE_POLL_SECONDS)
    finally:
        slots.release(tenant)


@router.get(
    "/{job_id}/events",
    response_model=EventList,
    responses={
        **_ERRORS,
        **_LIMITED,
        200: {
            "description": "JSON page, or with `Accept: text/event-stream` a stream of "
            "server-sent events (`id` = event id, `event` = kind, `data` = the event as JSON) "
            "that ends with `event: end` when the job is terminal, or `event: timeout` after "
            "the stream's maximum lifetime (reconnect with `Last-Event-ID`).",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
)
def job_events(
    request: Request,
    job_id: JobId,
    since: int = Query(0, ge=0, le=2**62, description="Only events with id > since."),
    limit: int = Query(100, ge=1, le=1000),
    last_event_id: str | None = Header(
        None,
        alias="Last-Event-ID",
        max_length=20,
        description="Resume a stream after this event id (sent by EventSource clients).",
    ),
    principal: Any = Depends(read_jobs),
) -> Any:
    """Progress events (steps, losses, routing overlap), oldest first."""
    stream = "text/event-stream" in request.headers.get("accept", "")
    if last_event_id is not None:
        if not last_event_id.isdigit() or int(last_event_id) > 2**62:
            raise ApiError(422, "Last-Event-ID", "must be an event id", location="header")
        since = max(since, int(last_event_id))
    with request_session(request) as session:
        job = _job(session, job_id, principal, request)
        if not stream:
            rows = jobs.list_events(session, job.id, since, limit)
            items = [EventOut.model_validate(e) for e in rows]
            return EventList(
                items=items, next_since=items[-1].id if items else since, job_state=job.state
            )
    # A slot per open stream (429 beyond the tenant's limit); the stream releases it.
    request.app.state.streams.acquire(principal.tenant)
    # The stream opens its own short sessions, one per poll.
    return EventSourceResponse(
        _sse(request, job.id, since, principal.tenant),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/{job_id}/expert-map", response_model=ExpertMapOut, responses=_ERRORS)
def expert_map(
    request: Request, job_id: JobId, principal: Any = Depends(read_jobs)
) -> ExpertMapOut:
    """Every scored expert (layer, expert, score, rank); `selected` marks the unlearned ones."""
    with request_session(request) as session:
        job = _job(session, job_id, principal, request)
        rows = jobs.get_expert_map(session, job.id)
        return ExpertMapOut(items=[ExpertScoreOut.model_validate(r) for r in rows])


@router.get("/{job_id}/evaluations", response_model=EvaluationList, responses=_ERRORS)
def evaluations(
    request: Request, job_id: JobId, principal: Any = Depends(read_jobs)
) -> EvaluationList:
    """Forget and utility scores before and after unlearning; `routing`: the routing
    overlaps among them (retain per layer too)."""
    with request_session(request) as session:
        job = _job(session, job_id, principal, request)
        rows = jobs.get_evaluations(session, job.id)
        routing = routing_scores.summary(rows)
        return EvaluationList(
            items=[EvaluationOut.model_validate(r) for r in rows],
            routing=RoutingOverlapOut(**routing) if routing is not None else None,
        )


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=_ERRORS)
def artifacts(request: Request, job_id: JobId, principal: Any = Depends(read_jobs)) -> ArtifactList:
    with request_session(request) as session:
        job = _job(session, job_id, principal, request)
        rows = jobs.list_artifacts(session, job.id)
        return ArtifactList(items=[ArtifactOut.model_validate(a) for a in rows])


@router.get(
    "/{job_id}/artifacts/{artifact_id}",
    response_class=FileResponse,
    responses={
        **_ERRORS,
        200: {"content": {"application/octet-stream": {"schema": {"type": "string"}}}},
    },
)
def download_artifact(
    request: Request,
    job_id: JobId,
    artifact_id: int = PathParam(ge=1, le=2**62),
    principal: Any = Depends(read_jobs),
) -> FileResponse:
    """The artifact's bytes; the `X-Content-SHA256` header lets the client check them."""
    with request_session(request) as session:
        job = _job(session, job_id, principal, request)
        art = jobs.get_artifact(session, job.id, artifact_id)
    path = Path(art.location)
    # Only serve files inside the blob store (a location is data, not a trusted path).
    root = BlobStore.from_settings(request.app.state.settings).root
    try:
        resolved = path.resolve()
        inside = resolved.is_relative_to(root)
    except OSError:
        inside = False
    if not inside or not resolved.is_file():
        raise ApiError(404, "artifact_id", "artifact file is not available", location="path")
    return FileResponse(
        resolved,
        filename=art.name,
        media_type="application/octet-stream",
        headers={"X-Content-SHA256": art.sha256},
    )


@router.get(
    "/{job_id}/certificate",
    responses={
        **_ERRORS,
        409: {"model": ErrorBody, "description": "The job has not finished."},
        200: {
            "description": "The deletion certificate (JSON, or HTML with `format=html`).",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/html": {"schema": {"type": "string"}},
            },
        },
    },
)
def certificate(
    request: Request,
    job_id: JobId,
    format: Literal["json", "html"] = Query("json", description="json, or html for a page."),
    principal: Any = Depends(read_jobs),
) -> Response:
    """Who asked, on which data (by hash), what changed, scores before/after, and the audit
    entries that cover it. Available once the job finished."""
    from service import certificate as cert_mod

    try:
        with request_session(request) as session:
            cert = cert_mod.build_certificate(session, job_id, principal.tenant)
    except cert_mod.CertificateUnavailable as e:
        raise ApiError(409, "state", e.reason, location="request", code="not_finished") from None
    if format == "html":
        return HTMLResponse(cert_mod.render_html(cert))
    return JSONResponse(cert)
