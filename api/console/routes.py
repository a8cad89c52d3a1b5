"""Console pages for jobs, and signing in and out. Server-rendered; a small script only
follows a running job's progress (server-sent events) and the page reads without it.

    /console/               -> the jobs, or the sign-in
    /console/login          GET shows the form, POST signs in (fields `key`, `csrf_token`)
    /console/logout         GET asks, POST signs out
    /console/jobs           list with filters and pages
    /console/jobs/{id}      one job; .../progress (event stream), .../certificate[?format=json],
                            POST .../cancel (requesters)
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)

from api.auth import MAX_KEY_LENGTH, request_session
from api.console import extras, sessions, views, web
from api.console.sessions import Viewer
from service import jobs
from service.db import session_scope
from service.errors import IllegalTransition, NotFound

router = APIRouter(prefix="/console", include_in_schema=False)
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
LOGIN_TTL = 3600  # seconds a sign-in form stays usable


def _not_found(request: Request, viewer: Viewer) -> HTMLResponse:
    return web.error_page(request, viewer, 404, "Job not found",
                          "no such job in your tenant", field="job_id")


@router.get("/")
def home(request: Request) -> Response:
    with request_session(request) as s:
        viewer = sessions.resolve(s, request.cookies.get(sessions.COOKIE))
        s.commit()
    return RedirectResponse("/console/jobs" if viewer else "/console/login", status_code=303)


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:  # a fixed list: a name is never a path
        return Response("not found", status_code=404, media_type="text/plain")
    return FileResponse(web.HERE / "static" / name, media_type=STATIC[name],
                        headers={"Cache-Control": "max-age=300"})


def _login_page(request: Request, status: int = 200, error: str | None = None,
                next_path: str | None = None) -> HTMLResponse:
    token = sessions.new_login_token()
    page = web.render(request, "login.html", None, status=status, csrf_token=token,
                      error=error, next_path=web.safe_next(next_path))
    sessions.set_cookie(request, page, sessions.LOGIN_COOKIE, token, LOGIN_TTL)
    return page


@router.get("/login")
def login_form(request: Request) -> Response:
    nxt = request.query_params.get("next")
    with request_session(request) as s:
        viewer = sessions.resolve(s, request.cookies.get(sessions.COOKIE))
        s.commit()
    if viewer is not None:
        return RedirectResponse(web.safe_next(nxt), status_code=303)
    return _login_page(request, next_path=nxt)


@router.post("/login")
async def login(request: Request) -> Response:
    form = await web.read_form(request)
    if isinstance(form, str):
        return _login_page(request, 400, form)
    expected = request.cookies.get(sessions.LOGIN_COOKIE)
    if not web.same_origin(request) or not sessions.same_token(expected, form.get("csrf_token")):
        return _login_page(request, 403, "The form expired; please sign in again.",
                           form.get("next"))
    key = form.get("key", "").strip()
    if not key:
        return _login_page(request, 400, "Enter an API key.", form.get("next"))
    if len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        return _login_page(request, 401, "That is not a valid key.", form.get("next"))
    return await run_in_threadpool(_sign_in, request, key, form.get("next"))


def _sign_in(request: Request, key: str, next_path: str | None) -> Response:
    from service import keys

    with request_session(request) as s:
        principal = keys.authenticate(s, key)
        if principal is None:
            return _login_page(request, 401, "Invalid or revoked key.", next_path)
        if principal.role.value not in web.READ_JOBS:
            return _login_page(request, 403, f"A {principal.role.value} key has no console "
                               "pages (requester and auditor keys do).", next_path)
        token, _ = sessions.open_session(s, principal)
        s.commit()
    response = RedirectResponse(web.safe_next(next_path), status_code=303)
    sessions.set_cookie(request, response, sessions.COOKIE, token,
                        int(sessions.LIFETIME.total_seconds()))
    sessions.clear_cookie(request, response, sessions.LOGIN_COOKIE)
    return response


@router.get("/logout")
def logout_form(request: Request) -> Response:
    with request_session(request) as s:
        viewer = web.gate(request, s, web.READ_JOBS)
    if not isinstance(viewer, Viewer):
        return viewer
    return web.render(request, "logout.html", viewer)


@router.post("/logout")
async def logout(request: Request) -> Response:
    form = await web.read_form(request)
    token = request.cookies.get(sessions.COOKIE)

    def run() -> Response:
        with request_session(request) as s:
            viewer = sessions.resolve(s, token)
            if viewer is not None:
                if isinstance(form, str) or not web.same_origin(request) or not (
                    sessions.same_token(viewer.csrf_token, form.get("csrf_token"))
                ):
                    s.commit()
                    return web.csrf_failure(request, viewer)
                sessions.close_session(s, token)
            s.commit()
        response = RedirectResponse("/console/login", status_code=303)
        sessions.clear_cookie(request, response, sessions.COOKIE)
        return response

    return await run_in_threadpool(run)


@router.get("/jobs")
def job_list(request: Request) -> Response:
    with request_session(request) as s:
        viewer = web.gate(request, s, web.READ_JOBS)
        if not isinstance(viewer, Viewer):
            return viewer
        try:
            f = views.parse_filters(request.query_params)
            items, more = views.list_jobs(s, viewer.tenant, f)
        except web.FilterError as e:
            return web.error_page(request, viewer, 400, "Bad filter", e.reason, field=e.field)
    return web.render(
        request, "jobs.html", viewer, jobs=items, more=more, f=f, states=views.STATES,
        algorithms=views.ALGORITHMS,
    )


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str) -> Response:
    from service import certificate as cert_mod
    from service.certificate_html import robustness_checks, signature_status

    with request_session(request) as s:
        viewer = web.gate(request, s, web.READ_JOBS)
        if not isinstance(viewer, Viewer):
            return viewer
        if not JOB_ID.match(job_id):
            return _not_found(request, viewer)
        try:
            job = jobs.get_job(s, job_id, viewer.tenant)
        except NotFound:
            return _not_found(request, viewer)
        info = views.summary(job)
        main_scores, other_scores, routing = views.scores(s, job.id)
        cert = None
        if info["terminal"]:
            cert = cert_mod.build_certificate(s, job.id, viewer.tenant)
        context: dict[str, Any] = {
            "job": info,
            "progress": views.progress(s, job),
            "scores": main_scores,
            "other_scores": other_scores,
            "routing": routing,
            "emap": views.expert_map(s, job.id, request.app.state.settings),
            "changes": views.param_changes(s, job.id),
            "settings": views.settings_groups(job),
            "robustness": robustness_checks(cert) if cert else None,
            "signature": signature_status(cert) if cert else None,
            "verification": cert["verification"] if cert else None,
            "request_id": extras.request_of_job(s, job.id),
            "can_cancel": viewer.role in web.WRITE_JOBS and not info["terminal"]
            and job.state != jobs.State.CANCELLING.value,
        }
    return web.render(request, "job.html", viewer, **context)


@router.get("/jobs/{job_id}/certificate")
def job_certificate(request: Request, job_id: str) -> Response:
    """The same certificate as GET /v1/jobs/{id}/certificate: the page, or the JSON file."""
    from service import certificate as cert_mod

    fmt = request.query_params.get("format", "html")
    with request_session(request) as s:
        viewer = web.gate(request, s, web.READ_JOBS)
        if not isinstance(viewer, Viewer):
            return viewer
        if fmt not in ("html", "json"):
            return web.error_page(request, viewer, 400, "Bad format", "html or json",
                                  field="format")
        if not JOB_ID.match(job_id):
            return _not_found(request, viewer)
        try:
            cert = cert_mod.build_certificate(s, job_id, viewer.tenant)
        except NotFound:
            return _not_found(request, viewer)
        except cert_mod.CertificateUnavailable as e:
            return web.error_page(request, viewer, 409, "Not finished yet", e.reason,
                                  field="state")
    if fmt == "json":
        return JSONResponse(cert, headers={
            "Content-Disposition": f'attachment; filename="certificate-{job_id}.json"',
            "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
    # Inline style only, no script: the page is also a file people keep.
    csp = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"
    return HTMLResponse(cert_mod.render_html(cert), headers={
        "Content-Security-Policy": csp, "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff"})


@router.post("/jobs/{job_id}/cancel")
async def cancel(request: Request, job_id: str) -> Response:
    form = await web.read_form(request)

    def run() -> Response:
        with request_session(request) as s:
            viewer = web.gate(request, s, web.WRITE_JOBS)
            if not isinstance(viewer, Viewer):
                return viewer
            if isinstance(form, str):
                return web.error_page(request, viewer, 400, "Bad form", form)
            if not web.same_origin(request) or not sessions.same_token(
                viewer.csrf_token, form.get("csrf_token")
            ):
                return web.csrf_failure(request, viewer)
            if not JOB_ID.match(job_id):
                return _not_found(request, viewer)
            try:
                jobs.request_cancel(s, job_id, viewer.tenant,
                                    actor=f"key:{viewer.principal.key_id}")
                s.commit()
            except NotFound:
                return _not_found(request, viewer)
            except IllegalTransition as e:
                return web.error_page(request, viewer, 409, "Cannot cancel", e.reason,
                                      field="state")
        return RedirectResponse(f"/console/jobs/{job_id}", status_code=303)

    return await run_in_threadpool(run)


@router.get("/jobs/{job_id}/progress")
def job_progress(request: Request, job_id: str) -> Response:
    """Server-sent events with the job's state, stage and latest step, until it ends."""
    with request_session(request) as s:
        viewer = web.gate(request, s, web.READ_JOBS)
        if not isinstance(viewer, Viewer):
            return Response("sign in first", status_code=401, media_type="text/plain")
        try:
            job = jobs.get_job(s, job_id, viewer.tenant) if JOB_ID.match(job_id) else None
        except NotFound:
            job = None
        if job is None:
            return Response("job not found", status_code=404, media_type="text/plain")
    return StreamingResponse(
        _progress_stream(request, job.id, request.cookies.get(sessions.COOKIE)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _progress_stream(request: Request, job_id: str, token: str | None) -> AsyncIterator[str]:
    factory = request.app.state.session_factory

    def poll() -> dict[str, Any] | None:
        with session_scope(factory) as s:
            viewer = sessions.resolve(s, token)  # a session that ended ends the stream
            if viewer is None:
                return None
            try:
                job = jobs.get_job(s, job_id, viewer.tenant)
            except NotFound:  # deleted meanwhile
                return None
            p = views.progress(s, job)
            return {
                "state": job.state, "stage": job.stage, "step": p.step,
                "max_steps": p.max_steps, "loss": p.loss,
                "forget_accuracy": p.forget_accuracy,
                "stages": [{"name": x["name"], "status": x["status"]} for x in p.stages],
                "terminal": jobs.State(job.state) in jobs.TERMINAL,
            }

    last: str | None = None
    sent_at = time.monotonic()
    yield "retry: 3000\n\n"
    while True:
        data = await run_in_threadpool(poll)
        if data is None:  # signed out (or the job is gone): the page goes to the sign-in
            yield "event: end\ndata: {\"signed_out\": true}\n\n"
            return
        text = json.dumps(data)
        if text != last:
            yield f"event: progress\ndata: {text}\n\n"
            last, sent_at = text, time.monotonic()
        if data["terminal"]:
            yield f"event: end\ndata: {text}\n\n"
            return
        if await request.is_disconnected():
            return
        if time.monotonic() - sent_at > KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            sent_at = time.monotonic()
        await asyncio.sleep(POLL_SECONDS)
