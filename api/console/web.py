"""What every console page shares: the templates, the security headers, the session gate
(who is looking, and may their role see this), bounded form reading and CSRF checks.

Roles follow the API's rules (api/auth.py) exactly: jobs are read by requesters and
auditors, cancelled by requesters; the audit pages are for auditors; deletion requests are
read by requesters and auditors; admin keys (which only manage keys) have no pages. Every
read is scoped to the viewer's tenant; another tenant's job is "not found", as in the API.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from api.console import sessions
from api.console.sessions import Viewer

HERE = Path(__file__).resolve().parent
READ_JOBS = ("requester", "auditor")
WRITE_JOBS = ("requester",)
AUDIT = ("auditor",)
READ_REQUESTS = ("requester", "auditor")
MAX_FORM_BYTES = 4096  # the console's forms hold a key and a token: a few hundred bytes
MAX_FIELD_CHARS = 512

# Pages load only their own stylesheet and script; nothing may frame them.
CSP = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer Chromium sends `Origin: null` on form
    # posts, which same_origin() must refuse.
    "Referrer-Policy": "same-origin",
}


def _when(value: Any) -> str:
    """A timestamp for people: 2026-12-05 18:44:56 UTC."""
    if value is None:
        return "-"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value)


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    from service.certificate_html import fmt_number, plain_value

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.ChainableUndefined,  # optional fields may be absent
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = fmt_number
    env.filters["plain"] = plain_value
    env.filters["when"] = _when
    env.filters["urlq"] = lambda v: quote(str(v), safe="")
    return env


def render(
    request: Request,
    template: str,
    viewer: Viewer | None,
    status: int = 200,
    **context: Any,
) -> HTMLResponse:
    page = environment().get_template(template).render(
        viewer=viewer, path=request.url.path, **context
    )
    return HTMLResponse(page, status_code=status, headers=HEADERS)


def error_page(
    request: Request, viewer: Viewer | None, status: int, title: str, reason: str,
    field: str | None = None,
) -> HTMLResponse:
    return render(
        request, "error.html", viewer, status=status, title=title, reason=reason, field=field
    )


def login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path
    if request.url.query:
        target += "?" + request.url.query
    return RedirectResponse(f"/console/login?next={quote(target, safe='')}", status_code=303)


def safe_next(value: str | None) -> str:
    """Where to go after signing in: only a console path of this site (no open redirect)."""
    if (
        not value
        or len(value) > 1024
        or not value.startswith("/console/")
        or value.startswith("/console/login")
        or "\\" in value
        or "//" in value
        or not value.isprintable()
    ):
        return "/console/jobs"
    return value


def gate(
    request: Request, session: Session, roles: tuple[str, ...]
) -> Viewer | Response:
    """The viewer if signed in with one of `roles`; else the response to send (a redirect
    to sign in, or a 403 page naming the role needed). Commits the session bookkeeping."""
    viewer = sessions.resolve(session, request.cookies.get(sessions.COOKIE))
    session.commit()
    if viewer is None:
        response = login_redirect(request)
        if request.cookies.get(sessions.COOKIE):
            sessions.clear_cookie(request, response, sessions.COOKIE)
        return response
    if viewer.role not in roles:
        return error_page(
            request, viewer, 403, "Not allowed",
            f"a {viewer.role} key may not see this page (it needs {' or '.join(roles)})",
        )
    return viewer


async def read_form(request: Request) -> dict[str, str] | str:
    """The urlencoded form of a POST, bounded; or the reason it was refused."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        return "send the form as application/x-www-form-urlencoded"
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return f"form over {MAX_FORM_BYTES} bytes"
    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, max_num_fields=16)
    except (UnicodeDecodeError, ValueError):
        return "malformed form"
    form: dict[str, str] = {}
    for k, v in pairs:
        if k in form or len(v) > MAX_FIELD_CHARS:
            return f"field {k[:32]!r} repeated or too long"
        form[k] = v
    return form


def same_origin(request: Request) -> bool:
    """A POST from another site is refused even before the CSRF token is checked: when the
    browser names an Origin, it must be this server's."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser, or an old one: the CSRF token still decides
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def csrf_failure(request: Request, viewer: Viewer | None) -> HTMLResponse:
    return error_page(
        request, viewer, 403, "Form expired",
        "the form's security token did not match; reload the page and try again",
        field="csrf_token",
    )


def bounded_choice(value: str | None, allowed: tuple[str, ...], field: str) -> str | None:
    """A filter value that must be one of `allowed` (blank = no filter)."""
    if value is None or value == "":
        return None
    if value not in allowed:
        raise FilterError(field, f"must be one of {', '.join(allowed)}")
    return value


class FilterError(ValueError):
    """A bad query parameter of a console page: shown as a 400 page naming the field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
