"""Console sessions: a browser signs in with an API key once and then holds only a session
cookie (a random token; the database keeps its SHA-256, never the key or the token).

A session acts as its key: `resolve` returns the key's Principal, and ends the session
when the key was revoked since (or the session expired: idle or absolute limit). Forms are
protected against CSRF by a per-session token in a hidden input; the sign-in form, which
has no session yet, by a double-submit token (a cookie and the same value in the form).
Cookies are HttpOnly, SameSite=Strict, Path=/console, and Secure over HTTPS.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from fastapi import Request, Response
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from service.keys import Principal, Role
from service.tables import ApiKey, ConsoleSession, utcnow

COOKIE = "mu_console"
LOGIN_COOKIE = "mu_console_login"
COOKIE_PATH = "/console"
IDLE = timedelta(minutes=30)  # a session unused this long ends
LIFETIME = timedelta(hours=12)  # and none outlives this, used or not
TOUCH_EVERY = timedelta(minutes=1)  # last_seen is written at most this often (fewer writes)
MAX_SESSIONS_PER_KEY = 20  # signing in again past this ends the oldest
TOKEN_CHARS = 43  # secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Viewer:
    """Who is looking: the key's principal and the session's CSRF token."""

    principal: Principal
    csrf_token: str
    token_hash: str

    @property
    def role(self) -> str:
        return self.principal.role.value

    @property
    def tenant(self) -> str:
        return self.principal.tenant


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def _well_formed(token: str | None) -> bool:
    return (
        token is not None
        and 16 <= len(token) <= 64
        and all(ch.isalnum() or ch in "-_" for ch in token)
    )


def open_session(session: Session, principal: Principal) -> tuple[str, str]:
    """A new session for this key; returns (cookie token, CSRF token). The caller commits."""
    now = utcnow()
    session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now))
    # Bounded per key: the oldest sessions beyond the limit end.
    rows = session.execute(
        select(ConsoleSession.token_hash)
        .where(ConsoleSession.key_id == principal.key_id)
        .order_by(ConsoleSession.created_at.desc())
        .offset(MAX_SESSIONS_PER_KEY - 1)
    ).scalars().all()
    if rows:
        session.execute(delete(ConsoleSession).where(ConsoleSession.token_hash.in_(rows)))
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    session.add(
        ConsoleSession(
            token_hash=_hash(token),
            key_id=principal.key_id,
            csrf_token=csrf,
            created_at=now,
            last_seen_at=now,
            expires_at=now + LIFETIME,
        )
    )
    return token, csrf


def resolve(session: Session, token: str | None) -> Viewer | None:
    """The viewer of a session cookie, or None (no such session, expired, or its key was
    revoked: then the session is deleted). The caller commits."""
    if not _well_formed(token):
        return None
    assert token is not None
    th = _hash(token)
    row = session.get(ConsoleSession, th)
    if row is None:
        return None
    now = utcnow()
    key = session.get(ApiKey, row.key_id)
    if key is None or key.revoked or row.expires_at <= now or now - row.last_seen_at > IDLE:
        session.execute(delete(ConsoleSession).where(ConsoleSession.token_hash == th))
        return None
    if now - row.last_seen_at > TOUCH_EVERY:
        session.execute(
            update(ConsoleSession).where(ConsoleSession.token_hash == th).values(last_seen_at=now)
        )
    return Viewer(Principal(key.id, Role(key.role), key.tenant), row.csrf_token, th)


def close_session(session: Session, token: str | None) -> None:
    """Sign out: the session row is deleted (the cookie is then worthless)."""
    if _well_formed(token):
        assert token is not None
        session.execute(delete(ConsoleSession).where(ConsoleSession.token_hash == _hash(token)))


def end_sessions_of_key(session: Session, key_id: str) -> int:
    """End every session of one key (e.g. right after revoking it); returns how many."""
    result = session.execute(delete(ConsoleSession).where(ConsoleSession.key_id == key_id))
    return int(getattr(result, "rowcount", 0) or 0)


def same_token(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of CSRF tokens; absent or malformed never matches."""
    if not expected or not given or len(given) > 128 or not given.isascii():
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_cookie(request: Request, response: Response, name: str) -> None:
    response.delete_cookie(
        name,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def new_login_token() -> str:
    return secrets.token_urlsafe(32)
