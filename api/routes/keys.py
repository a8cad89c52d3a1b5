"""API keys (role admin): create (the secret is returned once), list, revoke.

An admin acts for its own tenant; a platform admin (`keys create --platform` on the
command line) for any tenant, named with `tenant`. Another tenant's key id is answered
404, exactly like an unknown one (and audited). A revocation takes effect on the next
request and is an audit entry."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam

from api.auth import acting_tenant, admin_access, note_cross_tenant, request_session
from api.errors import ErrorBody
from api.schemas import TENANT_PATTERN, KeyCreatedOut, KeyCreateIn, KeyList, KeyOut
from service import keys
from service.errors import NotFound
from service.tables import utcnow

router = APIRouter(
    prefix="/v1/keys",
    tags=["keys"],
    responses={
        401: {"model": ErrorBody, "description": "Missing or invalid API key."},
        403: {"model": ErrorBody, "description": "Not an admin key (of this tenant)."},
    },
)
KeyId = Annotated[str, PathParam(pattern=r"^k_[0-9a-f]{16}$", description="The key id.")]


@router.post(
    "",
    status_code=201,
    response_model=KeyCreatedOut,
    responses={422: {"model": ErrorBody, "description": "Bad role or tenant."}},
)
def create_key(
    body: KeyCreateIn,
    request: Request,
    principal: Any = Depends(admin_access),
) -> KeyCreatedOut:
    """Create a key for the admin's tenant (a platform admin: for `tenant`). Audited: key
    id, role and tenant, never the secret."""
    tenant = acting_tenant(principal, body.tenant)
    expires = utcnow() + timedelta(days=body.expires_in_days) if body.expires_in_days else None
    with request_session(request) as session:
        key_id, secret = keys.create_key(
            session, body.role, tenant, actor=f"key:{principal.key_id}", expires_at=expires
        )
        session.commit()
    return KeyCreatedOut(id=key_id, key=secret, role=body.role, tenant=tenant, expires_at=expires)


@router.get("", response_model=KeyList)
def list_keys(
    request: Request,
    tenant: str | None = Query(
        None, pattern=TENANT_PATTERN, description="Platform admins: another tenant's keys."
    ),
    principal: Any = Depends(admin_access),
) -> KeyList:
    """The keys of the admin's tenant, oldest first (ids and metadata, never secrets)."""
    scope = acting_tenant(principal, tenant)
    with request_session(request) as session:
        rows = keys.list_keys(session, scope)
        return KeyList(items=[KeyOut.model_validate(r) for r in rows[:1000]])


@router.delete(
    "/{key_id}",
    status_code=204,
    responses={404: {"model": ErrorBody, "description": "No such key of this tenant."}},
)
def revoke_key(request: Request, key_id: KeyId, principal: Any = Depends(admin_access)) -> Response:
    """Revoke a key (idempotent; audited). It is refused from the next request on."""
    scope = None if principal.platform else principal.tenant
    try:
        with request_session(request) as session:
            keys.revoke_key(session, key_id, actor=f"key:{principal.key_id}", tenant=scope)
            session.commit()
    except NotFound:
        note_cross_tenant(request, principal, "key", key_id)
        raise
    return Response(status_code=204)
