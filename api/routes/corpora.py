"""Corpora of the caller's tenant: upload (content-addressed by SHA-256, validated while it
streams in), list, delete. Another tenant's corpus id is answered exactly like an unknown
one. Uploaded corpora are deleted when the last job that uses them ends, unless the upload
asked to keep them (`retention_days`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError

from api.auth import note_cross_tenant, read_jobs, request_session, write_jobs
from api.errors import ApiError, ErrorBody
from api.schemas import CorpusList, CorpusOut
from service import corpora, storage
from service.db import session_scope

router = APIRouter(prefix="/v1/corpora", tags=["corpora"])

_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "JSONL (one object per line with a `text` field, or `prompt` and "
        "`answer`), or plain text (one record per non-empty line). Strict UTF-8; records "
        "end at `\\n`. `application/x-ndjson` and `application/jsonl` are accepted too.",
        "content": {
            "text/plain": {"schema": {"type": "string"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-lines")
CorpusId = Annotated[
    str, PathParam(pattern=r"^[0-9a-f]{64}$", description="The corpus id (its SHA-256).")
]


def _out(row: Any) -> CorpusOut:
    return CorpusOut(
        id=row.sha256,
        size=row.size,
        records=row.records,
        format=row.format,
        created_at=row.created_at,
        keep_until=row.keep_until,
    )


@router.post(
    "",
    status_code=201,
    response_model=CorpusOut,
    openapi_extra=_BODY_DOC,
    responses={
        413: {"model": ErrorBody, "description": "Over the size cap or the storage quota."},
        422: {"model": ErrorBody, "description": "Not UTF-8, empty, or malformed records."},
    },
)
async def upload_corpus(
    request: Request,
    format: Literal["auto", "jsonl", "text"] | None = Query(
        None, description="Force the format; default: from Content-Type, else detected."
    ),
    retention_days: int = Query(
        0,
        ge=0,
        le=3650,
        description="Keep the corpus this many days; 0 (default): delete it when the last "
        "job that uses it ends.",
    ),
    principal: Any = Depends(write_jobs),
) -> CorpusOut:
    """Validate and store a corpus while it streams in (memory: one record). The same bytes
    always give the same id; the corpus text is never logged, audited or returned."""
    settings = request.app.state.settings
    if retention_days > settings.max_corpus_retention_days:
        raise ApiError(
            422,
            "retention_days",
            f"over this server's limit of {settings.max_corpus_retention_days}",
            location="query",
        )
    limit = settings.max_corpus_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body", f"{int(declared)} bytes is over the limit of {limit}")
    if format is None:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        format = "jsonl" if ctype in _JSONL_TYPES else "auto"
    factory = request.app.state.session_factory
    tenant = principal.tenant
    if declared is not None and declared.isdigit():

        def precheck() -> None:
            with session_scope(factory) as s:
                corpora.check_quota(s, tenant, int(declared), settings)

        await run_in_threadpool(precheck)
    validator = storage.CorpusValidator(
        format=format,
        max_bytes=limit,
        max_records=settings.max_corpus_records,
        max_record_bytes=settings.max_corpus_record_bytes,
    )
    store = storage.BlobStore.from_settings(settings)
    upload = await run_in_threadpool(storage.CorpusUpload, store, validator)

    def register() -> tuple[Any, bool]:
        actor = f"key:{principal.key_id}"
        for attempt in range(2):
            try:
                with session_scope(factory) as s:
                    row, created = corpora.register(
                        s,
                        upload,
                        tenant,
                        retention_days=retention_days,
                        actor=actor,
                        settings=settings,
                    )
                    corpora.sweep_expired(s, actor=actor)
                    return row, created
            except IntegrityError:
                if attempt:  # the same bytes uploaded concurrently: the other one won
                    raise
        raise AssertionError("unreachable")

    try:
        async for chunk in request.stream():
            if chunk:
                await run_in_threadpool(upload.feed, chunk)
        await run_in_threadpool(upload.finish)
        row, _created = await run_in_threadpool(register)
    except storage.CorpusError as e:
        if e.field == "format":
            raise ApiError(422, "format", e.reason, location="query") from None
        status = 413 if "over the limit" in e.reason and "bytes" in e.reason else 422
        raise ApiError(status, "body", e.reason) from None
    finally:
        await run_in_threadpool(upload.close)
    return _out(row)


@router.get("", response_model=CorpusList)
def list_corpora(request: Request, principal: Any = Depends(read_jobs)) -> CorpusList:
    """The tenant's stored corpora (newest first, at most 500) and its storage in use."""
    with request_session(request) as session:
        rows = corpora.list_records(session, principal.tenant)
        used = corpora.used_bytes(session, principal.tenant)
    return CorpusList(
        items=[_out(r) for r in rows],
        used_bytes=used,
        quota_bytes=request.app.state.settings.corpus_quota_bytes,
    )


@router.delete(
    "/{corpus_id}",
    status_code=204,
    responses={
        404: {"model": ErrorBody, "description": "No such corpus of this tenant."},
        409: {"model": ErrorBody, "description": "An unfinished job uses it."},
    },
)
def delete_corpus(
    request: Request, corpus_id: CorpusId, principal: Any = Depends(write_jobs)
) -> Response:
    """Delete the tenant's corpus now (audited; the blob goes once no tenant holds it)."""
    from service.errors import NotFound

    try:
        with request_session(request) as session:
            corpora.delete(session, principal.tenant, corpus_id, actor=f"key:{principal.key_id}")
            session.commit()
    except NotFound:
        note_cross_tenant(request, principal, "corpus", corpus_id)
        raise
    return Response(status_code=204)
