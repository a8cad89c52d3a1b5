"""The web console for governance teams: server-rendered pages under /console, signed in
with an API key (a server-side session; the cookie never holds the key). Out of the
OpenAPI schema. `install(app)` adds it to the FastAPI app."""

from __future__ import annotations

from fastapi import FastAPI


def install(app: FastAPI) -> None:
    from api.console import audit_pages, routes

    app.include_router(routes.router)
    app.include_router(audit_pages.router)
