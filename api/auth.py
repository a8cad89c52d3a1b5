"""Request dependencies: the database session, the settings, and the caller (API key).

Roles:
  requester  submits, reads and cancels the jobs of its tenant; uploads corpora
  auditor    reads every job of its tenant (never writes) and the audit endpoints
  admin      creates API keys
A job of another tenant is reported as 404, exactly like a missing one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import Depends, Request, Security
from fastapi.security import HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from api.errors import ApiError

# Used for the OpenAPI security scheme only; the header is parsed below so a missing and
# a garbled header get distinct, precise messages.
bearer_scheme = HTTPBearer(auto_error=False, description="An API key: `Bearer <key>`.")

MAX_KEY_LENGTH = 256  # a longer "key" is garbage: refuse before hashing it


def get_session(request: Request) -> Iterator[Session]:
    """One session per request. Handlers commit what they write; anything not committed
    is rolled back when the session closes."""
    factory: sessionmaker[Session] = request.app.state.session_factory
    session = factory()
    try:
        yield session
    finally:
        session.close()


def get_settings(request: Request) -> Any:
    return request.app.state.settings


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

    def dependency(
        request: Request,
        session: Session = Depends(get_session),
        _creds: Any = Security(bearer_scheme),
    ) -> Any:
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
