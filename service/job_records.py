"""The records a running job produces: events, expert map, evaluations, artifacts, changed
parameters and the model's hash. Every write names the lease `owner` (service/leases.py)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service import audit
from service.db import is_sqlite
from service.errors import (
    InvalidArgument,
)
from service.job_states import (
    Phase,
    load_job,
    owned_job,
)
from service.redact import scrub_json
from service.tables import (
    Artifact,
    Evaluation,
    ExpertMapRow,
    JobEvent,
    utcnow,
)

# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ExpertScore:
    layer: int
    expert: int
    score: float
    rank: int
    selected: bool


@dataclass(frozen=True)
class ParamChange:
    """One tensor (slice) the unlearning changed, as the certificate reports it."""

    name: str  # parameter name, e.g. model.layers.1.mlp.experts.3.down_proj.weight
    slice: str  # the part that trained, e.g. "[3]" or "" for the whole tensor
    sha256_before: str
    sha256_after: str
    numel: int = 0


# Event kinds this module writes itself (the runner's progress events use any other kind).
PARAM_CHANGES_KIND = "param_changes"
STAGE_KIND = "stage"  # step = index of the stage in STAGE_ORDER
MODEL_KIND = "model"
RESULT_KIND = "result"  # service.recording's summary of the engine's JobResult


def finite(value: float, field: str) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise InvalidArgument(field, f"{v} is not a finite number")
    return v


def record_event(
    session: Session,
    job_id: str,
    owner: str,
    step: int,
    kind: str,
    payload: Mapping[str, Any],
) -> int:
    """Store a progress event of the current attempt (losses, overlap...) and return its id
    (the cursor). Idempotent: the same (attempt, step, kind) again returns the first id and
    keeps the first payload. Payloads must not carry text (`UnsafePayload`)."""
    if not kind or len(kind) > 64:
        raise ValueError("kind must be 1..64 characters")
    # Clients read events (API, stream, console): no server path in them (service.redact).
    data = scrub_json(dict(payload), max_chars=audit.MAX_STRING)
    audit.check_payload(data)
    job = owned_job(session, job_id, owner)
    values = {
        "job_id": job_id,
        "attempt": job.attempt,
        "step": int(step),
        "kind": kind,
        "payload": data,
        "created_at": utcnow(),
    }
    ins = (sqlite_insert if is_sqlite(session) else pg_insert)(JobEvent).values(**values)
    session.execute(
        ins.on_conflict_do_nothing(index_elements=["job_id", "attempt", "step", "kind"])
    )
    return session.execute(
        select(JobEvent.id).where(
            JobEvent.job_id == job_id,
            JobEvent.attempt == job.attempt,
            JobEvent.step == int(step),
            JobEvent.kind == kind,
        )
    ).scalar_one()


def record_expert_map(
    session: Session, job_id: str, owner: str, scores: Iterable[ExpertScore], method: str
) -> list[ExpertMapRow]:
    """Replace the job's expert map (every scored expert; `selected` marks the chosen ones)
    and audit the selection (layer, expert, score of each selected expert)."""
    job = owned_job(session, job_id, owner)
    rows = [
        ExpertMapRow(
            job_id=job_id,
            layer=int(s.layer),
            expert=int(s.expert),
            score=finite(s.score, f"scores[{s.layer},{s.expert}]"),
            rank=int(s.rank),
            selected=bool(s.selected),
            method=method[:32],
        )
        for s in scores
    ]
    session.execute(delete(ExpertMapRow).where(ExpertMapRow.job_id == job_id))
    session.add_all(rows)
    session.flush()
    audit.append(
        session,
        actor=owner,
        action="experts_selected",
        job_id=job_id,
        tenant=job.tenant,
        payload={
            "method": method,
            "attempt": job.attempt,
            "scored": len(rows),
            "selected": [
                {"layer": r.layer, "expert": r.expert, "score": r.score, "rank": r.rank}
                for r in rows
                if r.selected
            ],
        },
    )
    return rows


def record_evaluations(
    session: Session,
    job_id: str,
    owner: str,
    phase: Phase,
    results: Mapping[str, Mapping[str, float]],
) -> list[Evaluation]:
    """Store `results[task][metric] = value` for phase "before" or "after" (replacing
    that phase's earlier values, e.g. from a failed attempt)."""
    if phase not in ("before", "after"):
        raise ValueError(f"phase must be 'before' or 'after' (got {phase!r})")
    owned_job(session, job_id, owner)
    session.execute(
        delete(Evaluation).where(Evaluation.job_id == job_id, Evaluation.phase == phase)
    )
    rows = [
        Evaluation(
            job_id=job_id,
            phase=phase,
            task=task[:128],
            metric=metric[:128],
            value=finite(value, f"results.{task}.{metric}"),
        )
        for task, metrics in results.items()
        for metric, value in metrics.items()
    ]
    session.add_all(rows)
    session.flush()
    return rows


def record_artifact(
    session: Session,
    job_id: str,
    owner: str,
    *,
    kind: str,
    name: str,
    location: str,
    sha256: str,
    size: int,
) -> Artifact:
    """Register a file the job produced (see `storage.BlobStore.put_artifact`). Audited."""
    job = owned_job(session, job_id, owner)
    session.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    art = Artifact(
        job_id=job_id,
        kind=kind[:64],
        name=name[:255],
        location=location,
        sha256=sha256,
        size=int(size),
        created_at=utcnow(),
    )
    session.add(art)
    session.flush()
    audit.append(
        session,
        actor=owner,
        action="artifact_recorded",
        job_id=job_id,
        tenant=job.tenant,
        payload={"kind": kind, "name": name, "sha256": sha256, "size": int(size)},
    )
    return art


def record_param_changes(
    session: Session, job_id: str, owner: str, changes: Sequence[ParamChange]
) -> None:
    """Record which tensors (slices) the unlearning changed, with hashes before and after
    (an event of kind `param_changes` + an audit entry); the certificate lists them."""
    items = [
        {
            "name": c.name,
            "slice": c.slice,
            "sha256_before": c.sha256_before,
            "sha256_after": c.sha256_after,
            "numel": int(c.numel),
        }
        for c in changes
    ]
    record_event(session, job_id, owner, 0, PARAM_CHANGES_KIND, {"tensors": items})
    job = load_job(session, job_id)
    audit.append(
        session,
        actor=owner,
        action="parameters_changed",
        job_id=job_id,
        tenant=job.tenant,
        payload={"attempt": job.attempt, "tensors": items},
    )


def record_model(
    session: Session, job_id: str, owner: str, model: str, sha256: str, revision: str | None = None
) -> int:
    """Record the identity of the model that was unlearned (its weights' hash, and the
    commit its source resolved to: None for a plain directory)."""
    payload = {"model": model[:512], "sha256": sha256, "revision": revision}
    return record_event(session, job_id, owner, 0, MODEL_KIND, payload)


def latest_event(session: Session, job_id: str, kind: str) -> JobEvent | None:
    """The job's newest event of `kind` (its latest attempt's): the one query behind the
    certificate, the lineage, the robustness proof and the console's views."""
    return session.execute(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.kind == kind)
        .order_by(JobEvent.attempt.desc(), JobEvent.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def latest_payload(session: Session, job_id: str, kind: str) -> dict[str, Any]:
    """`latest_event`'s payload ({} when the job has no such event)."""
    ev = latest_event(session, job_id, kind)
    return dict(ev.payload) if ev is not None else {}
