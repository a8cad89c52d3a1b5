"""POST /v1/keys: create an API key (role admin). The secret is returned once."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from api.auth import admin_access, request_session
from api.errors import ErrorBody
from api.schemas import KeyCreatedOut, KeyCreateIn
from service import keys

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post(
    "",
    status_code=201,
    response_model=KeyCreatedOut,
    responses={
        401: {"model": ErrorBody, "description": "Missing or invalid API key."},
        403: {"model": ErrorBody, "description": "Not an admin key."},
        422: {"model": ErrorBody, "description": "Bad role or tenant."},
    },
)
def create_key(
    body: KeyCreateIn,
    request: Request,
    principal: Any = Depends(admin_access),
) -> KeyCreatedOut:
    """Create a key for any tenant (audited: key id, role and tenant, never the secret)."""
    with request_session(request) as session:
        key_id, secret = keys.create_key(
            session, body.role, body.tenant, actor=f"key:{principal.key_id}"
        )
        session.commit()
    return KeyCreatedOut(id=key_id, key=secret, role=body.role, tenant=body.tenant)
