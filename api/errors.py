"""One error shape for every failure the API reports, and the handlers that produce it.

Every 4xx body names the offending field (a dotted path into the body, or the query
parameter / header / path parameter name) and the reason, so a client can fix its
request without reading server logs. A catch-all turns any unexpected exception into a
500 JSON body with an opaque reference (never a traceback, never request content).
"""

from __future__ import annotations

import logging
import re
import traceback
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("api")

Location = Literal["body", "query", "header", "path", "request"]


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the field (e.g. `training.max_steps`).")
    location: Location = Field(
        "body", alias="in", description="Where the field is: body, query, header, path."
    )
    reason: str = Field(description="Why the value was refused.")

    model_config = {"populate_by_name": True}


class ErrorBody(BaseModel):
    """Body of every error response."""

    code: str = Field(description="Machine-readable error class, e.g. `validation_error`.")
    message: str = Field(description="One human-readable line: `<field>: <reason>`.")
    errors: list[FieldError] = Field(default_factory=list)


class ApiError(Exception):
    """An error the client caused (or a refusal); rendered as `ErrorBody`."""

    def __init__(
        self,
        status: int,
        field: str,
        reason: str,
        *,
        location: Location = "body",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{field}: {reason}")
        self.status = status
        self.field = field
        self.reason = reason
        self.location: Location = location
        self.code = code or _default_code(status)
        self.headers = headers


class BodyTooLarge(Exception):
    """Raised while reading a request body that exceeds the limit (see api.app)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over the limit of {limit} bytes")
        self.limit = limit


def not_found(what: str, field: str = "job_id") -> ApiError:
    # Another tenant's job is reported exactly like a missing one (no existence oracle).
    return ApiError(404, field, f"{what} not found", location="path", code="not_found")


def _default_code(status: int) -> str:
    return {
        400: "bad_request",
        401: "unauthenticated",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        406: "not_acceptable",
        409: "conflict",
        413: "payload_too_large",
        415: "unsupported_media_type",
        422: "validation_error",
        429: "too_many_requests",
        503: "unavailable",
    }.get(status, "error" if status >= 500 else "bad_request")


def error_response(
    status: int,
    code: str,
    errors: Sequence[FieldError],
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    first = errors[0] if errors else FieldError(field="request", reason=code, location="request")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    body = ErrorBody(code=code, message=f"{first.field}: {first.reason}{more}", errors=list(errors))
    return JSONResponse(
        status_code=status, content=body.model_dump(mode="json", by_alias=True), headers=headers
    )


# pydantic names the member of a union it tried in `loc` ("constrained-int",
# "literal['auto']", "function-after[...]", "int"): a type, not a field of the body. Only
# its own labels are dropped; a client's misspelt key ("num-experts") is kept.
_UNION_MEMBER = re.compile(
    r"^(constrained-[a-z]+|literal\[.*\]|function-(after|before|wrap|plain)\[.*\]"
    r"|(list|dict|set|tuple|nullable|tagged-union|json-or-python|lax-or-strict)\[.*\]"
    r"|int|float|str|bool|none|bytes)$"
)


def _loc_to_field(loc: Sequence[Any]) -> tuple[Location, str]:
    """("body", "seuf", "experts", 0, "layer") -> ("body", "seuf.experts[0].layer");
    union members in the path are dropped ("seuf.num_experts", not
    "seuf.num_experts.constrained-int")."""
    parts = list(loc)
    location: Location = "body"
    if parts and parts[0] in ("body", "query", "header", "path"):
        location = parts.pop(0)
    out = ""
    for i, p in enumerate(parts):
        if isinstance(p, int):
            out += f"[{p}]"
        elif i > 0 and _UNION_MEMBER.match(str(p)):
            continue
        else:
            out += ("." if out else "") + str(p)
    return location, out or location


def _reason(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", "invalid value"))
    # pydantic prefixes errors raised in validators; the prefix tells the client nothing.
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error")
        msg = f"invalid JSON: {detail}" if detail else "invalid JSON"
    elif err.get("type") == "extra_forbidden":
        msg = "unknown field (not part of the schema)"
    return msg


def validation_errors(errs: Sequence[dict[str, Any]]) -> list[FieldError]:
    """One error per field: the members of a union that all failed become one reason
    ("... or ...")."""
    reasons: dict[tuple[Location, str], list[str]] = {}
    for e in errs:
        loc = e.get("loc", ())
        # json_invalid carries a character offset as loc[1]; it is not a field.
        if e.get("type") == "json_invalid":
            loc = ("body",)
        got = reasons.setdefault(_loc_to_field(loc), [])
        if (r := _reason(e)) not in got:
            got.append(r)
    return [
        FieldError(field=field, location=location, reason=" or ".join(rs))
        for (location, field), rs in reasons.items()
    ]


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(
        exc.status,
        exc.code,
        [FieldError(field=exc.field, location=exc.location, reason=exc.reason)],
        headers=exc.headers,
    )


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "validation_error", validation_errors(exc.errors()))


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 404:
        fe = FieldError(field="path", location="path", reason=f"no route {request.url.path}")
    elif status == 405:
        fe = FieldError(
            field="method",
            location="request",
            reason=f"method {request.method} not allowed on {request.url.path}",
        )
    elif status == 400 and isinstance(exc.__cause__, BodyTooLarge):
        # FastAPI wraps errors raised while reading the body into a 400.
        return error_response(
            413, "payload_too_large", [FieldError(field="body", reason=str(exc.__cause__))]
        )
    elif status == 400 and "parsing the body" in str(exc.detail):
        # FastAPI raises this when json.loads fails other than by a syntax error.
        fe = FieldError(field="body", location="body", reason=_parse_failure(exc.__cause__))
    else:
        fe = FieldError(field="request", location="request", reason=str(exc.detail))
    headers = getattr(exc, "headers", None)
    return error_response(status, _default_code(status), [fe], headers=headers)


def _parse_failure(cause: BaseException | None) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return "body is not valid UTF-8"
    if isinstance(cause, RecursionError):
        return "JSON nested too deeply"
    if isinstance(cause, ValueError) and "integer" in str(cause):
        return "JSON number too large (more than 4300 digits)"
    return "body could not be parsed as JSON"


def log_unexpected(exc: BaseException, method: str, path: str) -> str:
    """Log an unhandled error by type, place and a fresh reference; returns the reference.
    Never the exception text nor the traceback's values: either could quote the request."""
    ref = uuid.uuid4().hex[:12]
    frames = traceback.extract_tb(exc.__traceback__)
    where = "; ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in frames[-5:])
    log.error("unhandled %s on %s %s (ref %s) at %s", type(exc).__name__, method, path, ref, where)
    return ref


def internal_error_response(ref: str) -> JSONResponse:
    return error_response(
        500,
        "internal_error",
        [FieldError(field="request", location="request", reason=f"internal error (ref {ref})")],
    )


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    return internal_error_response(log_unexpected(exc, request.method, request.url.path))


# Where a service error's field lives, for the `in` of the error body.
_HEADER_FIELDS = {"Idempotency-Key", "Authorization", "Accept", "Last-Event-ID"}
_QUERY_FIELDS = {"cursor", "state", "since", "limit", "format", "retention_days", "tenant"}
_PATH_FIELDS = {"job_id", "artifact_id", "corpus_id", "key_id", "model_id"}


def _service_status(exc: Exception) -> tuple[int, str]:
    from service import corpora, limits, models
    from service import errors as se

    if isinstance(exc, se.NotFound):
        return 404, "not_found"
    if isinstance(exc, limits.Throttled):
        return 429, "too_many_requests"
    if isinstance(exc, corpora.QuotaExceeded):
        return 413, "quota_exceeded"
    if isinstance(exc, corpora.CorpusInUse | models.ModelExists):
        return 409, "conflict"
    if isinstance(exc, se.IllegalTransition | se.LeaseLost):
        return 409, "conflict"
    if isinstance(exc, se.IdempotencyConflict):
        return 422, "idempotency_conflict"
    return 422, "validation_error"


async def _on_service_error(request: Request, exc: Exception) -> JSONResponse:
    field = str(getattr(exc, "field", "request"))
    reason = str(getattr(exc, "reason", "refused"))
    status, code = _service_status(exc)
    if status == 404:
        reason = "not found"  # identical for missing and other-tenant objects
    location: Location = "body"
    headers = None
    retry_after = getattr(exc, "retry_after", None)
    if status == 429 and retry_after is not None:
        headers = {"Retry-After": str(retry_after)}
    if field in _HEADER_FIELDS:
        location = "header"
    elif field in _QUERY_FIELDS:
        location = "query"
    elif field in _PATH_FIELDS:
        location = "path"
    return error_response(
        status, code, [FieldError(field=field, location=location, reason=reason)], headers=headers
    )


async def _on_db_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.error(
        "database unavailable on %s %s: %s", request.method, request.url.path, type(exc).__name__
    )
    return error_response(
        503,
        "unavailable",
        [FieldError(field="database", location="request", reason="database unavailable")],
        headers={"Retry-After": "5"},
    )


async def _on_db_data_error(request: Request, exc: Exception) -> JSONResponse:
    # A value the database refuses (PostgreSQL: a NUL character in text): the client's.
    return error_response(
        422,
        "validation_error",
        [
            FieldError(
                field="request",
                location="request",
                reason="a value contains characters the database cannot store (e.g. NUL)",
            )
        ],
    )


def install_error_handlers(app: FastAPI) -> None:
    from sqlalchemy.exc import DataError, OperationalError

    from service.errors import ServiceError

    app.add_exception_handler(ServiceError, _on_service_error)
    app.add_exception_handler(OperationalError, _on_db_unavailable)
    app.add_exception_handler(DataError, _on_db_data_error)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
