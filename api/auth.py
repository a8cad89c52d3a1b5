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
  requester  submits, reads and cancels the jobs of its tenant; uploads and deletes corpora
  auditor    reads every job of its tenant (never writes) and the audit endpoints
  admin      manages the API keys of its tenant (a platform admin: of every tenant) and
             the registered models
A job of another tenant is reported as 404, exactly like a missing one (and audited).
Every authenticated call spends one token of its key's rate (429 + Retry-After beyond it).
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
        raise _unauthorized("invalid, expired or revoked key")
    return principal


def require(*roles: str) -> Callable[..., Any]:
    """A dependency returning the caller's Principal if its role is one of `roles`."""

    def dependency(request: Request, _creds: Any = Security(bearer_scheme)) -> Any:
        # Its own session, closed before this hop ends: see the module docstring.
        with request_session(request) as session:
            principal = authenticate_header(session, request.headers.get("authorization"))
        limiter = getattr(request.app.state, "rate_limiter", None)
        if limiter is not None:
            limiter.take(principal.key_id)  # Throttled: 429 with Retry-After
        if principal.role not in roles:
            raise ApiError(
                403,
                "Authorization",
                f"role {str(principal.role.value)!r} may not do this (needs {' or '.join(roles)})",
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


def acting_tenant(principal: Any, tenant: str | None) -> str:
    """The tenant an admin call acts for: its own, or (platform admins only) `tenant`. A
    plain admin naming another tenant gets 403."""
    if tenant is None or tenant == principal.tenant:
        return str(principal.tenant)
    if not principal.platform:
        raise ApiError(
            403,
            "tenant",
            "an admin key acts for its own tenant only (platform keys for any)",
            code="forbidden",
        )
    return tenant


def note_cross_tenant(request: Request, principal: Any, kind: str, object_id: str) -> None:
    """If `object_id` names another tenant's object, count the denial and audit it (the
    caller still answers 404, exactly as for an unknown id)."""
    from service import db, keys

    try:
        with db.session_scope(request.app.state.session_factory) as s:
            hit = keys.audit_cross_tenant(s, principal, kind, object_id)
    except Exception:  # noqa: BLE001 - the refusal stands even if auditing it fails
        hit = False
    if hit:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.deny("cross_tenant")
