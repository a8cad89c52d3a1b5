"""Response (and small request) models of the HTTP API.

The request body of POST /v1/jobs is `workers.spec.JobSpec` itself (one definition of the
spec); everything here describes what the API returns. Storage locations on the server
are never returned (artifacts are downloaded through the API).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.jobs import JOB_STATES as JOB_STATES
from service.jobs import TERMINAL, JobState

Role = Literal["requester", "auditor", "admin"]
# The job states are defined once, in service.jobs.
TERMINAL_STATES: frozenset[str] = frozenset(str(s) for s in TERMINAL)

# Tenants are identifiers, not free text (they appear in audit entries and URLs).
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class CorpusOut(_Out):
    id: str = Field(description="SHA-256 of the uploaded bytes (use as `corpus_id`).")
    size: int = Field(description="Size in bytes.")
    records: int = Field(description="Number of records (JSONL objects or non-empty lines).")
    format: str = Field(description="Detected format: jsonl or text.")
    created_at: datetime | None = None
    keep_until: datetime | None = Field(
        None, description="Kept until then (retention_days); null: deleted when its last job ends."
    )


class CorpusList(BaseModel):
    items: list[CorpusOut]
    used_bytes: int = Field(description="Bytes of corpora this tenant holds.")
    quota_bytes: int = Field(description="The most it may hold.")


class JobOut(_Out):
    id: str
    tenant: str
    state: JobState
    stage: str | None = Field(None, description="Stage within RUNNING.")
    attempt: int
    spec: dict[str, Any] = Field(description="The fully resolved job spec.")
    spec_hash: str = Field(description="SHA-256 of the canonical JSON of `spec`.")
    cancel_requested: bool = False
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    failure_class: str | None = None
    failure_message: str | None = None


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` to get the next page; null on the last page."
    )


class EventOut(_Out):
    id: int = Field(description="Monotonic event id: the `since` cursor.")
    attempt: int
    step: int
    kind: str
    payload: dict[str, Any]
    created_at: datetime


class EventList(BaseModel):
    items: list[EventOut]
    next_since: int = Field(description="Pass as `since` to get only newer events.")
    job_state: JobState


class ExpertScoreOut(_Out):
    layer: int
    expert: int
    score: float
    rank: int
    selected: bool
    method: str


class ExpertMapOut(BaseModel):
    items: list[ExpertScoreOut]


class EvaluationOut(_Out):
    phase: str = Field(description="before or after unlearning.")
    task: str
    metric: str
    value: float


class RoutingOverlapOut(BaseModel):
    """Routing overlap of the unlearned model with the original one (issue 13): the share of
    each token's top-K experts kept, on forget and retain data."""

    forget: float | None = Field(None, description="Forget data, mean over MoE layers.")
    retain: float | None = Field(None, description="Retain data, mean over MoE layers.")
    retain_from_target: float | None = Field(
        None,
        description="Retain data, mean over the MoE layers from the target layer up (the "
        "frozen layers below it keep their routing for free).",
    )
    retain_per_layer: dict[str, float] = Field(
        default_factory=dict, description="Retain data, per MoE layer (layer index -> overlap)."
    )


class EvaluationList(BaseModel):
    items: list[EvaluationOut]
    routing: RoutingOverlapOut | None = Field(
        None,
        description="The routing overlaps among `items` (task forget/retain, metrics "
        "routing_overlap, routing_overlap_from_target, routing_overlap_per_layer.<layer>), "
        "gathered; null until the job recorded them.",
    )


class ArtifactOut(_Out):
    id: int
    kind: str
    name: str
    sha256: str
    size: int
    created_at: datetime


class ArtifactList(BaseModel):
    items: list[ArtifactOut]


class AuditEntryOut(BaseModel):
    seq: int
    prev_hash: str
    entry_hash: str
    ts: str
    actor: str
    action: str
    job_id: str | None
    tenant: str | None
    payload: dict[str, Any]


class AuditList(BaseModel):
    items: list[AuditEntryOut]
    next_since: int = Field(description="Pass as `since` to get only newer entries.")


class AuditVerifyOut(BaseModel):
    ok: bool = Field(description="The whole chain (every tenant's entries) is intact.")
    checked: int = Field(description="This tenant's entries whose hash was recomputed.")
    first_bad_seq: int | None = Field(
        None, description="First edited/missing entry, if it is one of this tenant's."
    )
    reason: str | None = None
    head_seq: int = Field(description="Seq of this tenant's newest entry (0: none).")
    head_hash: str = Field(description="Hash of this tenant's newest entry.")


class KeyCreateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    tenant: str | None = Field(
        None,
        pattern=TENANT_PATTERN,
        description="Tenant of the new key: the admin's own (default); another only for a "
        "platform admin.",
    )
    expires_in_days: int | None = Field(
        None, ge=1, le=3650, description="The key stops working after this many days."
    )


class KeyCreatedOut(BaseModel):
    id: str
    key: str = Field(description="The secret: shown only in this response.")
    role: Role
    tenant: str
    expires_at: datetime | None = None


class KeyOut(_Out):
    id: str = Field(description="The key id (`k_...`); never the secret.")
    tenant: str
    role: Role
    platform: bool = False
    created_at: datetime
    expires_at: datetime | None = None
    revoked: bool
    revoked_at: datetime | None = None


class KeyList(BaseModel):
    items: list[KeyOut]


class ModelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="The name clients give as `model`.",
    )
    hub_id: str | None = Field(None, max_length=193, description="A hub id (org/name).")
    revision: str | None = Field(None, max_length=128, description="Hub commit or tag.")
    path: str | None = Field(
        None, max_length=512, description="A directory under the server's model root."
    )


class ModelOut(BaseModel):
    id: str
    source: Literal["hub", "directory"]
    hub_id: str | None = None
    revision: str | None = None
    created_at: datetime


class ModelList(BaseModel):
    items: list[ModelOut]
    allowlist: bool = Field(description="Whether hub ids matching a server pattern are allowed.")


class HealthOut(BaseModel):
    status: str
    detail: str | None = None
