"""The FastAPI application: `create_app(settings)` builds one (OpenAPI docs at /docs).

    uvicorn "api.app:app_from_env" --factory      # or: moe-unlearn serve

The app refuses to start on an unmigrated database (DatabaseNotMigrated names the command
to run) unless `settings.migrate_on_start` is set, in which case it migrates first.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import console
from api.errors import BodyTooLarge, install_error_handlers
from api.openapi import document_statuses
from api.routes import audit, corpora, health, jobs, keys, models, proof, requests
from service import db
from service.limits import RateLimiter, StreamSlots
from service.settings import Settings, get_settings

API_VERSION = "0.1.0"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    """Request counters by (method, route template, status) for /metrics, and denied calls
    by reason (401, 403, 429, cross-tenant ids). Route templates, not raw paths, keep the
    number of series bounded; no label ever holds a tenant or key."""

    DENIED = {401: "unauthenticated", 403: "forbidden", 429: "throttled"}

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[tuple[str, str, int]] = Counter()
        self.denied: Counter[str] = Counter()

    def add(self, method: str, route: str, status: int) -> None:
        with self._lock:
            self.counts[(method, route, status)] += 1
            if status in self.DENIED:
                self.denied[self.DENIED[status]] += 1

    def deny(self, reason: str) -> None:
        with self._lock:
            self.denied[reason] += 1

    def snapshot(self) -> dict[tuple[str, str, int], int]:
        with self._lock:
            return dict(self.counts)

    def denied_snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.denied)


class CatchAllMiddleware:
    """Turns an unhandled exception into the 500 body with a reference, and logs only the
    reference, type and place. (Starlette's own catch-all re-raises, so the server logged
    the exception text, which can quote the request.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except BodyTooLarge:
            raise  # BodyLimitMiddleware answers it (413)
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            from api.errors import internal_error_response, log_unexpected

            ref = log_unexpected(exc, scope.get("method", ""), scope.get("path", ""))
            if not started:
                await internal_error_response(ref)(scope, receive, send)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: RequestMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            # Only standard methods become label values: the label set stays bounded.
            method = method if method in _METHODS else "OTHER"
            self.metrics.add(method, template, status)


MAX_JSON_BODY_BYTES = 1024 * 1024  # job specs and key requests are small


class BodyLimitMiddleware:
    """Refuse (413) request bodies over `limit` bytes, except on routes that enforce their
    own cap (corpus uploads): a huge JSON body must not be buffered in memory."""

    def __init__(self, app: ASGIApp, limit: int, exempt: tuple[str, ...]) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        from api.errors import FieldError, error_response

        reason = f"request body over the limit of {self.limit} bytes"
        response = error_response(
            413, "payload_too_large", [FieldError(field="body", reason=reason)]
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(response.body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": bytes(response.body)})


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for `settings` (default: from the environment)."""
    settings = settings or get_settings()
    if settings.migrate_on_start:
        db.upgrade(settings.database_url)
    engine = db.engine_for(settings)
    db.check_migrated(engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()  # release pooled connections (PostgreSQL) on shutdown

    app = FastAPI(
        lifespan=lifespan,
        title="moe-unlearn",
        version=API_VERSION,
        summary="Remove knowledge from Mixture-of-Experts LLMs, with an audit trail.",
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = db.make_session_factory(engine)
    app.state.metrics = RequestMetrics()
    app.state.rate_limiter = RateLimiter(settings.rate_per_key, settings.rate_burst)
    app.state.streams = StreamSlots(settings.max_streams_per_tenant)
    install_error_handlers(app)
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(BodyLimitMiddleware, limit=MAX_JSON_BODY_BYTES, exempt=("/v1/corpora",))
    # Added last = outermost: counts every answer, the 413s above included.
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    for module in (health, corpora, jobs, audit, keys, models):
        app.include_router(module.router)
    app.include_router(proof.router)  # issue 15: certificate key, audit checkpoints
    app.include_router(requests.router)  # issue 15: deletion requests
    document_statuses(app)
    console.install(app)  # the web console (/console), outside the OpenAPI schema

    return app


def app_from_env() -> Any:
    """Factory for `uvicorn --factory api.app:app_from_env`."""
    return create_app(get_settings())
