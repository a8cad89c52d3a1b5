"""Registered models: the models a remote client may name besides `demo`, hub ids that
match the server's allow-list, and `job:<id>` of its own tenant's succeeded jobs.

Registering and removing needs an admin key (models are shared by every tenant, as the
server's model root is); any key may list them. No server path is ever returned."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as PathParam

from api.auth import admin_access, request_session, require
from api.errors import ErrorBody
from api.schemas import ModelIn, ModelList, ModelOut
from service import models

router = APIRouter(
    prefix="/v1/models",
    tags=["models"],
    responses={
        401: {"model": ErrorBody, "description": "Missing or invalid API key."},
        403: {"model": ErrorBody, "description": "The key's role may not do this."},
    },
)
any_role = require("requester", "auditor", "admin")
ModelId = Annotated[
    str, PathParam(pattern=models.MODEL_ID_PATTERN, description="The registered model id.")
]


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    responses={
        409: {"model": ErrorBody, "description": "That id is already registered."},
        422: {"model": ErrorBody, "description": "Bad id, hub id, revision or path."},
    },
)
def register_model(body: ModelIn, request: Request, principal: Any = Depends(admin_access)) -> Any:
    """Register a hub id + revision, or a directory under the server's model root
    (`MOE_UNLEARN_MODEL_DIR`). Audited."""
    with request_session(request) as session:
        row = models.register(
            session,
            body.id,
            hub_id=body.hub_id,
            revision=body.revision,
            path=body.path,
            actor=f"key:{principal.key_id}",
            settings=request.app.state.settings,
        )
        session.commit()
        return ModelOut(**models.describe(row))  # type: ignore[arg-type]


@router.get("", response_model=ModelList)
def list_models(request: Request, principal: Any = Depends(any_role)) -> ModelList:
    with request_session(request) as session:
        rows = models.list_models(session)
        items = [ModelOut(**models.describe(r)) for r in rows]  # type: ignore[arg-type]
    return ModelList(items=items, allowlist=bool(request.app.state.settings.model_allowlist))


@router.delete(
    "/{model_id}",
    status_code=204,
    responses={404: {"model": ErrorBody, "description": "No such registered model."}},
)
def remove_model(
    request: Request, model_id: ModelId, principal: Any = Depends(admin_access)
) -> Response:
    """Unregister a model (audited); queued jobs that name it fail when they load it."""
    with request_session(request) as session:
        models.remove(session, model_id, actor=f"key:{principal.key_id}")
        session.commit()
    return Response(status_code=204)
