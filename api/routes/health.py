"""Liveness, readiness and Prometheus metrics (tenant-free aggregates; optionally behind
MOE_UNLEARN_METRICS_TOKEN)."""

from __future__ import annotations

import hmac
from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from api.errors import ApiError, ErrorBody
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
    except db.DatabaseNotMigrated:
        # Not str(e): it names the database URL (a SQLite file's server path) to anyone.
        detail = f"database not migrated: run `{db.UPGRADE_COMMAND}`"
        return JSONResponse(status_code=503, content={"status": "not_ready", "detail": detail})
    except Exception as e:  # noqa: BLE001 - any connection failure means "not ready"
        return JSONResponse(
            status_code=503,
            content={"status": "not_ready", "detail": f"database unreachable ({type(e).__name__})"},
        )
    return HealthOut(status="ready")


class _Collector(Collector):
    """Tenant-free aggregates only: jobs by state over all tenants, HTTP requests by method,
    route template and status, denied calls by reason, open event streams in total."""

    def __init__(self, request: Request) -> None:
        self.request = request

    def collect(self) -> Iterator[Metric]:
        state = self.request.app.state
        counts: dict[str, int] = {}
        db_up = 1
        try:
            with db.session_scope(state.session_factory) as s:
                counts = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        except Exception:  # noqa: BLE001 - metrics must answer even when the DB is down
            db_up = 0
        jobs_g = GaugeMetricFamily(
            "moe_unlearn_jobs", "Jobs in the database by state.", labels=["state"]
        )
        for st in JOB_STATES:
            jobs_g.add_metric([st], counts.get(st, 0))
        yield jobs_g
        yield GaugeMetricFamily(
            "moe_unlearn_database_up",
            "Whether the last metrics query reached the database.",
            value=db_up,
        )
        http = CounterMetricFamily(
            "moe_unlearn_http_requests",
            "HTTP requests by method, route and status.",
            labels=["method", "route", "status"],
        )
        for (method, route, status), n in sorted(state.metrics.snapshot().items()):
            http.add_metric([method, route, str(status)], n)
        yield http
        denied = CounterMetricFamily(
            "moe_unlearn_denied",
            "Refused calls by reason: unauthenticated (401), forbidden (403), throttled "
            "(429), cross_tenant (named another tenant's id).",
            labels=["reason"],
        )
        for reason, n in sorted(state.metrics.denied_snapshot().items()):
            denied.add_metric([reason], n)
        yield denied
        yield GaugeMetricFamily(
            "moe_unlearn_event_streams_open",
            "Open event streams in this process (all tenants together).",
            value=state.streams.total(),
        )


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        401: {
            "model": ErrorBody,
            "description": "MOE_UNLEARN_METRICS_TOKEN is set and the request does not carry it.",
        },
    },
)
def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text format, tenant-free aggregates only (no tenant, key or job id in any
    label). With MOE_UNLEARN_METRICS_TOKEN set it needs `Authorization: Bearer <token>`."""
    token = request.app.state.settings.metrics_token
    if token:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(
                401,
                "Authorization",
                "the metrics token is required: `Authorization: Bearer <token>`",
                location="header",
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(request))
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
