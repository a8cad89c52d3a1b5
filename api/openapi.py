"""Every status code an operation can answer is in the OpenAPI document (issue 14).

FastAPI documents only what each route declares; the refusals that come from shared
layers (authentication, the per-key rate, body parsing and size, the database) apply to
many routes, so they are added here once, by what the operation has: a security
requirement (401, 403, 429), a request body (400, 413, 422), parameters (422), and the
database (503) for all but the liveness probe.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
_TEXTS = {
    "400": "The body could not be parsed (not UTF-8, JSON nested too deeply, a number too large).",
    "401": "Missing, invalid, expired or revoked API key.",
    "403": "The key's role (or tenant) may not do this.",
    "413": "Request body over the size limit (or the tenant's storage quota).",
    "422": "Invalid input; the body names the field and the reason.",
    "429": "Over the key's request rate or a tenant limit; see `Retry-After`.",
    "503": "Database unavailable; see `Retry-After`.",
}
_NO_DB = {"/healthz"}
# OpenAPI links: where an id a response returns is used next (clients and stateful
# testers follow them).
_JOB_READS = [
    ("GetJob", "/v1/jobs/{job_id}", "get"),
    ("CancelJob", "/v1/jobs/{job_id}/cancel", "post"),
    ("JobEvents", "/v1/jobs/{job_id}/events", "get"),
    ("ExpertMap", "/v1/jobs/{job_id}/expert-map", "get"),
    ("Evaluations", "/v1/jobs/{job_id}/evaluations", "get"),
    ("Artifacts", "/v1/jobs/{job_id}/artifacts", "get"),
    ("Certificate", "/v1/jobs/{job_id}/certificate", "get"),
]
_LINKS: list[tuple[str, str, str, list[tuple[str, str, str]], str]] = [
    ("/v1/jobs", "post", "202", _JOB_READS, "job_id"),
    (
        "/v1/corpora",
        "post",
        "201",
        [("DeleteCorpus", "/v1/corpora/{corpus_id}", "delete")],
        "corpus_id",
    ),
    ("/v1/keys", "post", "201", [("RevokeKey", "/v1/keys/{key_id}", "delete")], "key_id"),
    ("/v1/models", "post", "201", [("RemoveModel", "/v1/models/{model_id}", "delete")], "model_id"),
]


def _add_links(schema: dict[str, Any]) -> None:
    paths = schema.get("paths", {})
    for path, method, status, targets, param in _LINKS:
        response = paths.get(path, {}).get(method, {}).get("responses", {}).get(status)
        if response is None:
            continue
        links = response.setdefault("links", {})
        for name, target, target_method in targets:
            op = paths.get(target, {}).get(target_method)
            if op is None:
                continue
            links[name] = {
                "operationId": op["operationId"],
                "parameters": {param: "$response.body#/id"},
            }


def _add(op: dict[str, Any], code: str) -> None:
    responses = op.setdefault("responses", {})
    if code in responses:
        return
    entry: dict[str, Any] = {
        "description": _TEXTS[code],
        "content": {"application/json": {"schema": _ERROR_REF}},
    }
    if code in ("429", "503"):
        entry["headers"] = {
            "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
        }
    responses[code] = entry


def document_statuses(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        if "ErrorBody" not in schema.get("components", {}).get("schemas", {}):
            from api.errors import ErrorBody, FieldError

            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            comps["FieldError"] = FieldError.model_json_schema(by_alias=True)
            comps["ErrorBody"] = ErrorBody.model_json_schema(
                by_alias=True, ref_template="#/components/schemas/{model}"
            )
            comps["ErrorBody"].pop("$defs", None)
        for path, item in schema.get("paths", {}).items():
            for method, op in item.items():
                if not isinstance(op, dict) or method.startswith("x-"):
                    continue
                if op.get("security"):
                    for code in ("401", "403", "429"):
                        _add(op, code)
                if "requestBody" in op:
                    for code in ("400", "413", "422"):
                        _add(op, code)
                if op.get("parameters"):
                    _add(op, "422")
                if path not in _NO_DB:
                    _add(op, "503")
        _add_links(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
