"""Request dependencies: the caller (API key) and the settings; the database session of a
request (`request_session`).

Connection rule: a pooled database connection is checked out and returned inside ONE call
on one worker thread, never held across two. FastAPI runs each sync dependency and the
sync endpoint as separate hops on the threadpool (40 threads); a session opened by the auth
dependency and closed by a later hop held its connection while that request queued for
the next thread. Under a burst, every pooled connection (5 + 10 overflow) was held by a
request waiting for a thread while all 40 threads waited for a connection: a deadlock that
lasted the pool's 30 s timeout (measured: bench/api_load.py, py-spy). So the auth check
uses its own short session, and endpoints open theirs with `with request_session(request)`
inside the endpoint body.

Roles:
  requester  submits, reads and cancels the jobs of its tenant; uploads corpora
  auditor    reads every job of its tenant (never writes) and the audit endpoints
  admin      creates API keys
A job of another tenant is reported as 404, exactly like a missing one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import Request, Security
from fastapi.security import HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from api.errors import ApiError

# Used for the OpenAPI security scheme only; the header is parsed below so a missing and
# a garbled header get distinct, precise messages.
bearer_scheme = HTTPBearer(auto_error=False, description="An API key: `Bearer <key>`.")

MAX_KEY_LENGTH = 256  # a longer "key" is garbage: refuse before hashing it


@contextmanager
def request_session(request: Request) -> Iterator[Session]:
    """The request's session, to be used as `with request_session(request) as s:` inside a
    sync endpoint, so its connection goes back to the pool before the endpoint returns
    (module docstring). Handlers commit what they write; anything not committed is rolled
    back on close. Loaded objects stay readable afterwards (expire_on_commit=False), so the
    response is serialised from them without touching the database."""
    factory: sessionmaker[Session] = request.app.state.session_factory
    session = factory()
    try:
        yield session
    finally:
        session.close()


def _unauthorized(reason: str) -> ApiError:
    return ApiError(
        401,
        "Authorization",
        reason,
        location="header",
        code="unauthenticated",
        headers={"WWW-Authenticate": 'Bearer realm="moe-unlearn"'},
    )


def authenticate_header(session: Session, header: str | None) -> Any:
    """Return the Principal for an `Authorization` header value, or raise 401."""
    from service import keys

    if header is None or not header.strip():
        raise _unauthorized("missing header: send `Authorization: Bearer <key>`")
    scheme, _, secret = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise _unauthorized(f"unsupported scheme {scheme[:20]!r}: use `Bearer <key>`")
    secret = secret.strip()
    if not secret:
        raise _unauthorized("empty key after `Bearer`")
    if len(secret) > MAX_KEY_LENGTH or not secret.isascii() or not secret.isprintable():
        raise _unauthorized("malformed key")
    principal = keys.authenticate(session, secret)
    if principal is None:
        raise _unauthorized("invalid or revoked key")
    return principal


def require(*roles: str) -> Callable[..., Any]:
    """A dependency returning the caller's Principal if its role is one of `roles`."""

    def dependency(request: Request, _creds: Any = Security(bearer_scheme)) -> Any:
        # Its own session, closed before this hop ends: see the module docstring.
        with request_session(request) as session:
            principal = authenticate_header(session, request.headers.get("authorization"))
        if principal.role not in roles:
            raise ApiError(
                403,
                "Authorization",
                f"role {principal.role!r} may not do this (needs {' or '.join(roles)})",
                location="header",
                code="forbidden",
            )
        return principal

    return dependency


# The three access levels used by the routers.
read_jobs = require("requester", "auditor")
write_jobs = require("requester")
audit_access = require("auditor")
admin_access = require("admin")
