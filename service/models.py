"""Registered models (issue 14): which `model` a remote client may name.

A remote client (the HTTP API) may name only:
  - `demo`, the built-in world's tiny MoE;
  - the id of a model an admin registered: a hub id + revision, or a directory under the
    model root `MOE_UNLEARN_MODEL_DIR` (checked and resolved at registration);
  - a hub id matching `MOE_UNLEARN_MODEL_ALLOWLIST` (a regular expression, full match);
  - `job:<id>`, the unlearned model of one of its own tenant's SUCCEEDED jobs (how
    deletion requests chain).
Anything else is refused with one message, whether or not such a path or job exists (no
oracle). A local user (`moe-unlearn run`) keeps free paths; this module is not used there.

`runner_source` turns an accepted name (and the spec's `revision`) into what the runner
loads: a directory, a hub id with its revision (a registered hub model's own), or a
patch-only job's output folder (its base reference and patch: workers.model_source); the
stored spec keeps the client's name, so no server path is ever shown to a client.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import audit
from service.errors import NotFound, ServiceError, SpecRejected
from service.settings import Settings
from service.tables import Artifact, Job, RegisteredModel, utcnow
from workers.model_source import is_patch_output
from workers.spec import REVISION_PATTERN

MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
HUB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$"
JOB_PREFIX = "job:"
_MODEL_ID = re.compile(MODEL_ID_PATTERN)
_HUB_ID = re.compile(HUB_ID_PATTERN)
_REVISION = re.compile(REVISION_PATTERN)
_JOB_ID = re.compile(r"^[0-9a-fA-F-]{1,36}$")
REFUSED = (
    "not an allowed model: use 'demo', a registered model id (GET /v1/models), or "
    "job:<id> of a succeeded job of this tenant"
)


class InvalidModel(ServiceError, ValueError):
    """A registration an admin got wrong (bad id, path outside the model root...)."""


class ModelExists(ServiceError):
    """A model with this id is already registered (HTTP 409)."""


def model_root(settings: Settings) -> Path | None:
    return Path(settings.model_dir).expanduser().resolve() if settings.model_dir else None


def _inside_root(settings: Settings, rel: str) -> Path:
    root = model_root(settings)
    if root is None:
        raise InvalidModel("path", "no model root: set MOE_UNLEARN_MODEL_DIR")
    if Path(rel).is_absolute():
        candidate = Path(rel).resolve()
    else:
        candidate = (root / rel).resolve()
    if not candidate.is_relative_to(root) or candidate == root:
        raise InvalidModel("path", "must be a directory under the model root")
    if not candidate.is_dir():
        raise InvalidModel("path", "is not a directory under the model root")
    return candidate


def register(
    session: Session,
    model_id: str,
    *,
    hub_id: str | None = None,
    revision: str | None = None,
    path: str | None = None,
    actor: str,
    settings: Settings,
) -> RegisteredModel:
    """Register a model: exactly one of `hub_id` (with `revision`) or `path` (a directory
    under the model root, absolute or relative to it). Audited. The caller commits."""
    if not _MODEL_ID.match(model_id) or model_id == "demo" or model_id.startswith(JOB_PREFIX):
        raise InvalidModel("id", f"must match {MODEL_ID_PATTERN} and not be 'demo'")
    if (hub_id is None) == (path is None):
        raise InvalidModel("hub_id", "give exactly one of hub_id (with revision) or path")
    stored_path: str | None = None
    if hub_id is not None:
        if not _HUB_ID.match(hub_id):
            raise InvalidModel("hub_id", "must be a hub id like org/name")
        if revision is None or not _REVISION.match(revision):
            raise InvalidModel("revision", "a hub model needs a revision (commit or tag)")
    else:
        assert path is not None
        if len(path) > 512 or "\x00" in path:
            raise InvalidModel("path", "must be at most 512 characters, without NUL")
        # Stored resolved (absolute): the runner loads it without the API's settings.
        stored_path = str(_inside_root(settings, path))
        revision = None
    if session.get(RegisteredModel, model_id) is not None:
        raise ModelExists("id", f"model {model_id} is already registered")
    row = RegisteredModel(
        id=model_id,
        hub_id=hub_id,
        revision=revision,
        path=stored_path,
        created_by=actor[:128],
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    audit.append(
        session,
        actor=actor,
        action="model_registered",
        payload={
            "model_id": model_id,
            "hub_id": hub_id,
            "revision": revision,
            "directory": stored_path is not None,
        },
    )
    return row


def list_models(session: Session) -> list[RegisteredModel]:
    return list(session.execute(select(RegisteredModel).order_by(RegisteredModel.id)).scalars())


def remove(session: Session, model_id: str, *, actor: str) -> None:
    """Unregister (jobs already queued keep their reference and fail at load). Audited."""
    row = session.get(RegisteredModel, model_id)
    if row is None:
        raise NotFound("model_id", "model not found")
    session.delete(row)
    session.flush()
    audit.append(session, actor=actor, action="model_removed", payload={"model_id": model_id})


def _allowlisted(settings: Settings, name: str) -> bool:
    pattern = settings.model_allowlist
    if not pattern or not _HUB_ID.match(name):
        return False
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False  # a broken pattern allows nothing


def _source_job(session: Session, name: str, tenant: str | None) -> Job | None:
    job_id = name[len(JOB_PREFIX) :]
    if not _JOB_ID.match(job_id):
        return None
    job = session.get(Job, job_id)
    if job is None or job.state != "SUCCEEDED" or (tenant is not None and job.tenant != tenant):
        return None
    return job


def check_remote(
    session: Session, name: str, tenant: str, settings: Settings, revision: str | None = None
) -> None:
    """Refuse (`SpecRejected` on `model`, one message for every refusal) a model a remote
    client of `tenant` may not name; and (on `revision`) a revision other than the one an
    admin registered with the model."""
    if name == "demo":
        return
    if name.startswith(JOB_PREFIX):
        if _source_job(session, name, tenant) is not None:
            return
    elif _MODEL_ID.match(name) and (row := session.get(RegisteredModel, name)) is not None:
        if revision is not None and revision != row.revision:
            raise SpecRejected(
                "revision",
                "a registered model loads at the revision it was registered with "
                f"({row.revision or 'none: a directory'}); drop `revision`",
            )
        return
    elif _allowlisted(settings, name):
        return
    raise SpecRejected("model", REFUSED)


def _job_model_dir(session: Session, job: Job) -> Path | None:
    # The attempt's output folder holds `model/` beside the recorded artifacts; a
    # patch-only job's folder (output.model patch) is loaded as it is: base + patch.
    stmt = select(Artifact.location).where(Artifact.job_id == job.id)
    for loc in session.execute(stmt).scalars():
        out = Path(loc).parent
        if (out / "model").is_dir():
            return out / "model"
        if is_patch_output(out):
            return out
    return None


def runner_source(
    session: Session, name: str, revision: str | None = None
) -> tuple[str, str | None]:
    """What the runner loads for a stored model name and revision: `demo`, a registered
    directory (an absolute path) or hub id at its registered revision, the unlearned model
    (or patch-only output) of `job:<id>`, or the name itself (an allow-listed hub id, or a
    local path from a trusted caller) at `revision`."""
    if name == "demo":
        return name, revision
    if name.startswith(JOB_PREFIX):
        job = _source_job(session, name, None)
        d = _job_model_dir(session, job) if job is not None else None
        if d is None:
            raise ValueError(f"model {name}: the job's unlearned model is not available")
        return str(d), revision
    row = session.get(RegisteredModel, name) if _MODEL_ID.match(name) else None
    if row is None:
        return name, revision
    if row.path is not None:
        return row.path, revision
    return str(row.hub_id), row.revision


def describe(row: RegisteredModel) -> dict[str, str | datetime | None]:
    """A registered model as a client may see it (no server path)."""
    return {
        "id": row.id,
        "source": "hub" if row.hub_id else "directory",
        "hub_id": row.hub_id,
        "revision": row.revision,
        "created_at": row.created_at,
    }
