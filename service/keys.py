"""API keys: created with a role and a tenant, stored only as SHA-256 of the secret.

The secret is returned once by `create_key` (the CLI prints it) and can never be read
back. Secrets are 256 random bits, so a plain SHA-256 (no salt, no slow hash) is enough
and lets `authenticate` look the key up by its hash.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import audit
from service.db import lock_for_write
from service.errors import NotFound, ServiceError
from service.tables import ApiKey, utcnow

SECRET_PREFIX = "mu_"


class Role(StrEnum):
    REQUESTER = "requester"
    AUDITOR = "auditor"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    key_id: str
    role: Role
    tenant: str
    platform: bool = False  # a platform admin acts for any tenant; others for their own


class InvalidKeyRequest(ServiceError, ValueError):
    """A bad role or tenant given to `create_key`."""


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_key(
    session: Session,
    role: Role | str,
    tenant: str,
    *,
    actor: str = "cli",
    expires_at: datetime | None = None,
    platform: bool = False,
) -> tuple[str, str]:
    """Create a key; returns (key_id, secret). Audited (key id, role, tenant; never the
    secret or its hash). `expires_at`: refused after it; `platform` (admin keys only): may
    act for every tenant. The caller commits."""
    try:
        r = Role(role)
    except ValueError:
        raise InvalidKeyRequest(
            "role", f"must be one of {', '.join(Role)} (got {role!r})"
        ) from None
    if not tenant or len(tenant) > 128 or not tenant.isprintable():
        raise InvalidKeyRequest("tenant", "must be 1..128 printable characters")
    if platform and r != Role.ADMIN:
        raise InvalidKeyRequest("platform", "only an admin key can be a platform key")
    if expires_at is not None and (expires_at.tzinfo is None or expires_at <= utcnow()):
        raise InvalidKeyRequest("expires", "must be a time in the future, with a time zone")
    # Take the write lock first: on SQLite a SAVEPOINT outside a transaction would commit
    # on release, splitting the key from its audit entry.
    lock_for_write(session)
    for _ in range(3):
        key_id = "k_" + secrets.token_hex(8)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        try:
            with session.begin_nested():
                session.add(
                    ApiKey(
                        id=key_id,
                        key_hash=hash_secret(secret),
                        role=r.value,
                        tenant=tenant,
                        created_at=utcnow(),
                        revoked=False,
                        expires_at=expires_at,
                        platform=platform,
                    )
                )
                session.flush()
        except IntegrityError:  # astronomically unlikely id collision: draw again
            continue
        audit.append(
            session,
            actor=actor,
            action="key_created",
            tenant=tenant,
            payload={"key_id": key_id, "role": r.value}
            | ({"platform": True} if platform else {})
            | ({"expires_at": expires_at.isoformat()} if expires_at else {}),
        )
        return key_id, secret
    raise RuntimeError("could not allocate a key id")


def authenticate(session: Session, secret: str) -> Principal | None:
    """The principal of a valid, unrevoked key; None otherwise."""
    if not secret or len(secret) > 256:
        return None
    row = session.execute(
        select(ApiKey).where(ApiKey.key_hash == hash_secret(secret))
    ).scalar_one_or_none()
    if row is None or row.revoked:
        return None
    if row.expires_at is not None and row.expires_at <= utcnow():
        return None
    return Principal(row.id, Role(row.role), row.tenant, bool(row.platform))


def revoke_key(
    session: Session, key_id: str, *, actor: str = "cli", tenant: str | None = None
) -> None:
    """Revoke a key (idempotent). Audited. `NotFound` if there is no such key (or, with
    `tenant`, it belongs to another tenant: the same answer)."""
    lock_for_write(session)
    row = session.get(ApiKey, key_id)
    if row is None or (tenant is not None and row.tenant != tenant):
        raise NotFound("key_id", "key not found")
    if row.revoked:
        return
    session.execute(
        update(ApiKey).where(ApiKey.id == key_id).values(revoked=True, revoked_at=utcnow())
    )
    audit.append(
        session, actor=actor, action="key_revoked", tenant=row.tenant, payload={"key_id": key_id}
    )


def list_keys(session: Session, tenant: str | None = None) -> list[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.created_at)
    if tenant is not None:
        stmt = stmt.where(ApiKey.tenant == tenant)
    return list(session.execute(stmt).scalars())


def any_keys(session: Session) -> bool:
    """Whether any unrevoked key exists (without keys the server binds to loopback only)."""
    n = session.execute(
        select(func.count()).select_from(ApiKey).where(ApiKey.revoked.is_(False))
    ).scalar_one()
    return n > 0


def audit_cross_tenant(session: Session, principal: Principal, kind: str, object_id: str) -> bool:
    """If `object_id` (a job, corpus or key id) belongs to a tenant other than the caller's,
    append a `cross_tenant_denied` audit entry under the owning tenant and return True. The
    caller answers 404 either way (no existence oracle)."""
    from service.tables import CorpusRecord, Job

    owners: list[str] = []
    if kind == "job":
        row = session.get(Job, object_id) if len(object_id) <= 36 else None
        owners = [row.tenant] if row is not None else []
    elif kind == "key":
        key = session.get(ApiKey, object_id) if len(object_id) <= 32 else None
        owners = [key.tenant] if key is not None else []
    elif kind == "corpus":
        owners = list(
            session.execute(
                select(CorpusRecord.tenant).where(
                    CorpusRecord.sha256 == object_id, CorpusRecord.deleted_at.is_(None)
                )
            ).scalars()
        )
    others = sorted({t for t in owners if t != principal.tenant})
    if not others:
        return False
    for owner in others[:1]:
        audit.append(
            session,
            actor=f"key:{principal.key_id}",
            action="cross_tenant_denied",
            tenant=owner,
            payload={"kind": kind, "id": object_id[:64], "caller_tenant": principal.tenant},
        )
    return True
