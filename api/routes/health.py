"""Liveness, readiness and Prometheus metrics (no authentication: no tenant data)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import func, select

from api.schemas import JOB_STATES, HealthOut
from service import db
from service.tables import Job

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut)
def healthz() -> HealthOut:
    """The process is up (does not touch the database)."""
    return HealthOut(status="ok")


@router.get(
    "/readyz",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "Database unreachable or unmigrated."}},
)
def readyz(request: Request) -> HealthOut | JSONResponse:
    """Ready to serve: the database is reachable and at the newest migration."""
    try:
        db.check_migrated(request.app.state.engine)
    except db.DatabaseNotMigrated as e:
        return JSONResponse(status_code=503, content={"status": "not_ready", "detail": str(e)})
    except Exception as e:  # noqa: BLE001 - any connection failure means "not ready"
        return JSONResponse(
            status_code=503,
            content={"status": "not_ready", "detail": f"database unreachable ({type(e).__name__})"},
        )
    return HealthOut(status="ready")


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text format: jobs by state (from the database) and HTTP requests served
    by this process."""
    lines = [
        "# HELP moe_unlearn_jobs Jobs in the database by state.",
        "# TYPE moe_unlearn_jobs gauge",
    ]
    counts: dict[str, int] = {}
    db_up = 1
    try:
        with db.session_scope(request.app.state.session_factory) as s:
            counts = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    except Exception:  # noqa: BLE001 - metrics must answer even when the DB is down
        db_up = 0
    for state in JOB_STATES:
        lines.append(f'moe_unlearn_jobs{{state="{state}"}} {counts.get(state, 0)}')
    lines += [
        "# HELP moe_unlearn_database_up Whether the last metrics query reached the database.",
        "# TYPE moe_unlearn_database_up gauge",
        f"moe_unlearn_database_up {db_up}",
        "# HELP moe_unlearn_http_requests_total HTTP requests by method, route and status.",
        "# TYPE moe_unlearn_http_requests_total counter",
    ]
    for (method, route, status), n in sorted(request.app.state.metrics.snapshot().items()):
        lines.append(
            f'moe_unlearn_http_requests_total{{method="{_escape(method)}",'
            f'route="{_escape(route)}",status="{status}"}} {n}'
        )
    return PlainTextResponse(
        "\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8"
    )
