"""POST /v1/corpora: upload a forget/retain corpus, content-addressed by SHA-256."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError

from api.auth import write_jobs
from api.errors import ApiError, ErrorBody
from api.schemas import CorpusOut
from service import storage
from service.db import session_scope

router = APIRouter(prefix="/v1/corpora", tags=["corpora"])

_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "JSONL (one object per line with a `text` field, or `prompt` and "
        "`answer`), or plain text (one record per non-empty line). Strict UTF-8. "
        "`application/x-ndjson` and `application/jsonl` are accepted too.",
        "content": {
            "text/plain": {"schema": {"type": "string"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

_JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-lines")


async def _read_capped(request: Request, limit: int) -> bytes:
    """The body, refusing (413) as soon as it exceeds `limit` bytes: never buffer more."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body", f"{int(declared)} bytes is over the limit of {limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "body", f"more than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post(
    "",
    status_code=201,
    response_model=CorpusOut,
    openapi_extra=_BODY_DOC,
    responses={
        413: {"model": ErrorBody, "description": "Over the size cap."},
        422: {"model": ErrorBody, "description": "Not UTF-8, empty, or malformed records."},
    },
)
async def upload_corpus(
    request: Request,
    format: Literal["auto", "jsonl", "text"] | None = Query(
        None, description="Force the format; default: from Content-Type, else detected."
    ),
    principal: Any = Depends(write_jobs),
) -> CorpusOut:
    """Validate and store a corpus. The same bytes always give the same id; the corpus text
    is never logged, audited or returned."""
    settings = request.app.state.settings
    data = await _read_capped(request, settings.max_corpus_bytes)
    if format is None:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        format = "jsonl" if ctype in _JSONL_TYPES else "auto"
    if not data:
        raise ApiError(422, "body", "is empty: send the corpus as the request body")

    def store() -> storage.CorpusInfo:
        factory = request.app.state.session_factory
        try:
            with session_scope(factory) as s:
                return storage.store_corpus(s, data, format=format, settings=settings)
        except IntegrityError:
            # The same corpus uploaded concurrently: the other request registered it.
            with session_scope(factory) as s:
                return storage.store_corpus(s, data, format=format, settings=settings)

    try:
        info = await run_in_threadpool(store)
    except storage.CorpusError as e:
        # Field `corpus` is the body itself; `format` is the query parameter.
        if e.field == "format":
            raise ApiError(422, "format", e.reason, location="query") from None
        status = 413 if "over the limit" in e.reason and "bytes" in e.reason else 422
        raise ApiError(status, "body", e.reason) from None
    return CorpusOut(id=info.sha256, size=info.size, records=info.records, format=info.format)
