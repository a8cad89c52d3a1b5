"""The job state machine, queue and lease, and the records a running job produces.

    QUEUED --claim--> RUNNING --finish--> SUCCEEDED | FAILED
      |                 |  \\--cancel--> CANCELLING --finish--> CANCELLED (| SUCCEEDED | FAILED)
      |                 \\--lease expired / retryable failure--> RETRYING --claim--> RUNNING
      \\--cancel--> CANCELLED            (RETRYING --cancel--> CANCELLED)

While RUNNING the job moves forward through the stages evaluating_before, attribution,
unlearning, evaluating_after, packaging (stages may be skipped, never revisited).

Every change is a guarded compare-and-set UPDATE (WHERE state = <the state we read>), so
a lost race is refused with `IllegalTransition` instead of overwriting, and every change
appends its audit entry in the same transaction. Functions flush but never commit: the
caller owns the transaction (use `service.db.session_scope`).

Runner-side writes (heartbeat, stage, events, results) name the lease `owner`; a caller
whose lease was reclaimed gets `LeaseLost`, so a stale dispatcher cannot write into the
attempt that replaced it.
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal, NamedTuple, get_args

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import audit
from service.db import is_sqlite, lock_for_write
from service.errors import (
    IdempotencyConflict,
    IllegalTransition,
    InvalidArgument,
    InvalidCursor,
    LeaseLost,
    NotFound,
    SpecRejected,
)
from service.settings import get_settings
from service.tables import (
    Artifact,
    Corpus,
    Evaluation,
    ExpertMapRow,
    IdempotencyKey,
    Job,
    JobEvent,
    utcnow,
)
from workers.spec import JobSpec

# The one definition of the job states; the API's schemas and the enum below derive from it.
JobState = Literal[
    "QUEUED", "RUNNING", "CANCELLING", "RETRYING", "SUCCEEDED", "FAILED", "CANCELLED"
]
JOB_STATES: tuple[JobState, ...] = get_args(JobState)
# Members named as the values (State.RUNNING == "RUNNING"), for the transition table.
State = StrEnum("State", [(s, s) for s in JOB_STATES])  # type: ignore[misc]


class Stage(StrEnum):
    EVALUATING_BEFORE = "evaluating_before"
    ATTRIBUTION = "attribution"
    UNLEARNING = "unlearning"
    EVALUATING_AFTER = "evaluating_after"
    PACKAGING = "packaging"


STAGE_ORDER: tuple[Stage, ...] = tuple(Stage)
TERMINAL: frozenset[State] = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED})
ACTIVE: frozenset[State] = frozenset({State.RUNNING, State.CANCELLING})  # holds a lease
CLAIMABLE: frozenset[State] = frozenset({State.QUEUED, State.RETRYING})

# The only legal moves; anything else raises IllegalTransition.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.RUNNING, State.CANCELLED}),
    State.RETRYING: frozenset({State.RUNNING, State.CANCELLED}),
    State.RUNNING: frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLING, State.RETRYING}),
    # A runner that finishes before it notices the cancel reports what really happened.
    State.CANCELLING: frozenset({State.CANCELLED, State.SUCCEEDED, State.FAILED}),
    State.SUCCEEDED: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELLED: frozenset(),
}

Outcome = Literal["succeeded", "failed", "cancelled"]
Phase = Literal["before", "after"]


def can_transition(current: State | str, target: State | str) -> bool:
    return State(target) in TRANSITIONS[State(current)]


# ----------------------------------------------------------------------------- helpers


def _load(session: Session, job_id: str, *, for_update: bool = False) -> Job:
    stmt = select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    if for_update and not is_sqlite(session):
        stmt = stmt.with_for_update()
    job = session.execute(stmt).scalar_one_or_none()
    if job is None:
        raise NotFound("job_id", f"job {job_id} not found")
    return job


def _transition(
    session: Session,
    job: Job,
    target: State,
    *,
    actor: str,
    action: str,
    values: Mapping[str, Any] | None = None,
    payload: Mapping[str, Any] | None = None,
    guard_owner: str | None = None,
) -> Job:
    """Compare-and-set the job from the state we read to `target`, then audit it."""
    current = State(job.state)
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(job.id, current, target)
    now = utcnow()
    stmt = update(Job).where(Job.id == job.id, Job.state == current.value)
    if guard_owner is not None:
        stmt = stmt.where(Job.lease_owner == guard_owner, Job.attempt == job.attempt)
    res = session.execute(
        stmt.values(state=target.value, updated_at=now, **dict(values or {})).execution_options(
            synchronize_session=False
        )
    )
    if res.rowcount != 1:
        fresh = _load(session, job.id)
        if guard_owner is not None and fresh.lease_owner != guard_owner:
            raise LeaseLost("lease", f"job {job.id} is no longer leased by {guard_owner}")
        raise IllegalTransition(job.id, fresh.state, target, "the job changed concurrently")
    job = _load(session, job.id)
    audit.append(
        session,
        actor=actor,
        action=action,
        job_id=job.id,
        tenant=job.tenant,
        payload={"from": current.value, "to": target.value, "attempt": job.attempt}
        | dict(payload or {}),
    )
    return job


def _owned(session: Session, job_id: str, owner: str) -> Job:
    """The job, locked, if `owner` holds its lease (else LeaseLost / NotFound)."""
    lock_for_write(session)
    job = _load(session, job_id, for_update=True)
    if job.lease_owner != owner or State(job.state) not in ACTIVE:
        raise LeaseLost("lease", f"job {job_id} is not leased by {owner} (state {job.state})")
    return job


# ----------------------------------------------------------------------------- submit


class SubmitResult(NamedTuple):
    job: Job
    created: bool  # False: an earlier request with the same Idempotency-Key


def _check_corpora(session: Session, spec: JobSpec, allow_local_paths: bool) -> None:
    for name in ("forget", "retain"):
        ref = getattr(spec, name)
        if ref is None:
            continue
        if ref.path is not None and not allow_local_paths:
            raise SpecRejected(
                f"{name}.path",
                "server-side paths are not accepted; upload the corpus (POST /v1/corpora) "
                "and give its id as corpus_id",
            )
        if ref.corpus_id is not None and session.get(Corpus, ref.corpus_id) is None:
            raise SpecRejected(f"{name}.corpus_id", f"corpus {ref.corpus_id} was not uploaded")


def submit_job(
    session: Session,
    spec: JobSpec,
    tenant: str,
    actor: str,
    idempotency_key: str | None = None,
    *,
    requester: str | None = None,
    max_attempts: int | None = None,
    allow_local_paths: bool = False,
) -> SubmitResult:
    """Insert a QUEUED job holding the fully resolved spec, and audit it.

    With `idempotency_key`: the same key and the same resolved spec return the first job
    (`created=False`); the same key with a different spec raises `IdempotencyConflict`.
    Corpora given by `corpus_id` must have been uploaded (`SpecRejected` otherwise);
    `path` corpora are refused unless `allow_local_paths` (the API never allows them).
    `requester` is the API key id (defaults to `actor`); `max_attempts` defaults to the
    settings' `max_attempts`.
    """
    if max_attempts is None:
        max_attempts = get_settings().max_attempts
    if not tenant:
        raise SpecRejected("tenant", "must not be empty")
    if idempotency_key is not None and not (1 <= len(idempotency_key) <= 255):
        raise SpecRejected("Idempotency-Key", "must be 1..255 characters")
    _check_corpora(session, spec, allow_local_paths)
    resolved = spec.resolved()
    spec_hash = spec.spec_hash()
    lock_for_write(session)

    def existing() -> SubmitResult | None:
        row = session.execute(
            select(IdempotencyKey).where(
                IdempotencyKey.tenant == tenant, IdempotencyKey.key == idempotency_key
            )
        ).scalar_one_or_none()
        if row is None:
            return None
        if row.request_hash != spec_hash:
            raise IdempotencyConflict(
                "Idempotency-Key",
                f"key {idempotency_key!r} was already used with a different request body",
            )
        return SubmitResult(_load(session, row.job_id), False)

    if idempotency_key is not None and (found := existing()) is not None:
        return found
    now = utcnow()
    job = Job(
        id=str(uuid.uuid4()),
        tenant=tenant,
        requester=requester or actor,
        spec=resolved,
        spec_hash=spec_hash,
        state=State.QUEUED.value,
        stage=None,
        attempt=0,
        max_attempts=max_attempts,
        created_at=now,
        updated_at=now,
        cancel_requested=False,
    )
    try:
        # A savepoint: a concurrent submit with the same key makes only this part fail.
        with session.begin_nested():
            session.add(job)
            session.flush()
            if idempotency_key is not None:
                session.add(
                    IdempotencyKey(
                        tenant=tenant,
                        key=idempotency_key,
                        request_hash=spec_hash,
                        job_id=job.id,
                        created_at=now,
                    )
                )
                session.flush()
    except IntegrityError:
        if idempotency_key is None:
            raise
        found = existing()
        if found is None:
            raise
        return found
    audit.append(
        session,
        actor=actor,
        action="job_submitted",
        job_id=job.id,
        tenant=tenant,
        payload={"spec_hash": spec_hash, **_corpus_summary(session, spec)},
    )
    return SubmitResult(job, True)


def _corpus_summary(session: Session, spec: JobSpec) -> dict[str, Any]:
    """Corpus identity for the audit log: hashes and sizes, never text or paths."""
    out: dict[str, Any] = {"model": spec.model, "algorithm": spec.algorithm}
    for name in ("forget", "retain"):
        ref = getattr(spec, name)
        if ref is None:
            continue
        if ref.corpus_id is not None:
            c = session.get(Corpus, ref.corpus_id)
            out[name] = {
                "corpus_id": ref.corpus_id,
                "size": c.size if c else None,
                "records": c.records if c else None,
            }
        elif ref.demo is not None:
            out[name] = {"demo": ref.demo}
        else:
            out[name] = {"local_path": True}
    return out


# ----------------------------------------------------------------------------- lease


def claim_next(
    session: Session, owner: str, lease_seconds: int, *, now: datetime | None = None
) -> Job | None:
    """Claim the oldest QUEUED or RETRYING job for `owner`: RUNNING, attempt + 1, a lease
    until now + lease_seconds. None when nothing is claimable. Two claimers never get the
    same job (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: the write lock + a guarded
    update). Commit promptly: the row lock is held until then."""
    if not owner:
        raise ValueError("owner must not be empty")
    now = now or utcnow()
    lock_for_write(session)
    stmt = (
        select(Job)
        .where(Job.state.in_([s.value for s in CLAIMABLE]))
        .order_by(Job.created_at, Job.id)
        .limit(1)
        .execution_options(populate_existing=True)
    )
    if not is_sqlite(session):
        stmt = stmt.with_for_update(skip_locked=True)
    for _ in range(5):  # a lost compare-and-set just means: try the next job
        job = session.execute(stmt).scalar_one_or_none()
        if job is None:
            return None
        try:
            return _transition(
                session,
                job,
                State.RUNNING,
                actor=owner,
                action="job_claimed",
                values={
                    "attempt": job.attempt + 1,
                    "lease_owner": owner,
                    "lease_expires_at": now + timedelta(seconds=lease_seconds),
                    "heartbeat_at": now,
                    "started_at": job.started_at or now,
                    "stage": None,
                },
                payload={"owner": owner, "lease_seconds": lease_seconds},
            )
        except IllegalTransition:
            continue
    return None


def heartbeat(
    session: Session, job_id: str, owner: str, lease_seconds: int, *, now: datetime | None = None
) -> bool:
    """Extend the lease. Returns True when a cancel was requested (the runner should stop
    and call `finish_job(..., "cancelled")`). Raises `LeaseLost` if `owner` lost it."""
    now = now or utcnow()
    res = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.lease_owner == owner,
            Job.state.in_([s.value for s in ACTIVE]),
        )
        .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        _load(session, job_id)  # NotFound if it does not exist
        raise LeaseLost("lease", f"job {job_id} is not leased by {owner}")
    return bool(_load(session, job_id).cancel_requested)


def set_stage(session: Session, job_id: str, owner: str, stage: Stage | str) -> Job:
    """Move a RUNNING job to `stage` (forward only; stages may be skipped). Audited, and
    recorded as an event of kind `stage`."""
    try:
        target = Stage(stage)
    except ValueError:
        raise IllegalTransition(job_id, "?", str(stage), "unknown stage") from None
    job = _owned(session, job_id, owner)
    if job.stage is not None and STAGE_ORDER.index(Stage(job.stage)) >= STAGE_ORDER.index(target):
        raise IllegalTransition(job_id, job.stage, target.value, "stages only move forward")
    res = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.lease_owner == owner,
            Job.stage.is_(None) if job.stage is None else Job.stage == job.stage,
        )
        .values(stage=target.value, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        raise IllegalTransition(job_id, str(job.stage), target.value, "changed concurrently")
    # Also a progress event, so clients following the event stream see the stage change.
    record_event(
        session, job_id, owner, STAGE_ORDER.index(target), STAGE_KIND, {"stage": target.value}
    )
    audit.append(
        session,
        actor=owner,
        action="stage_changed",
        job_id=job_id,
        tenant=job.tenant,
        payload={"from": job.stage, "to": target.value, "attempt": job.attempt},
    )
    return _load(session, job_id)


def finish_job(
    session: Session,
    job_id: str,
    owner: str,
    outcome: Outcome,
    *,
    failure_class: str | None = None,
    failure_message: str | None = None,
    retryable: bool = False,
) -> Job:
    """End the attempt: SUCCEEDED, CANCELLED (after a cancel request), or FAILED with a
    failure class and message. A `retryable` failure with attempts left goes to RETRYING
    (claimable again) instead. Releases the lease. Audited."""
    job = _owned(session, job_id, owner)
    now = utcnow()
    release = {"lease_owner": None, "lease_expires_at": None}
    if outcome == "succeeded":
        return _transition(
            session,
            job,
            State.SUCCEEDED,
            actor=owner,
            action="job_succeeded",
            values=release | {"finished_at": now},
            guard_owner=owner,
        )
    if outcome == "cancelled":
        return _transition(
            session,
            job,
            State.CANCELLED,
            actor=owner,
            action="job_cancelled",
            values=release | {"finished_at": now},
            guard_owner=owner,
        )
    if outcome != "failed":
        raise ValueError(f"outcome must be succeeded, failed or cancelled (got {outcome!r})")
    fclass = (failure_class or "error")[:64]
    fmsg = (failure_message or "")[:4000]
    if retryable and job.attempt < job.max_attempts and State(job.state) == State.RUNNING:
        return _transition(
            session,
            job,
            State.RETRYING,
            actor=owner,
            action="job_retrying",
            values=release | {"failure_class": fclass, "failure_message": fmsg, "stage": None},
            payload={"failure_class": fclass},
            guard_owner=owner,
        )
    return _transition(
        session,
        job,
        State.FAILED,
        actor=owner,
        action="job_failed",
        values=release | {"finished_at": now, "failure_class": fclass, "failure_message": fmsg},
        payload={"failure_class": fclass},
        guard_owner=owner,
    )


def request_cancel(session: Session, job_id: str, tenant: str | None, actor: str) -> Job:
    """Cancel: a QUEUED/RETRYING job becomes CANCELLED at once; a RUNNING one CANCELLING
    (the runner sees it on its next heartbeat). Repeating a cancel is a no-op; cancelling a
    SUCCEEDED/FAILED job raises `IllegalTransition`. `tenant` None = any tenant (admin)."""
    lock_for_write(session)
    job = get_job(session, job_id, tenant, for_update=True)
    state = State(job.state)
    if state in (State.CANCELLING, State.CANCELLED):
        return job
    if state in CLAIMABLE:
        return _transition(
            session,
            job,
            State.CANCELLED,
            actor=actor,
            action="job_cancelled",
            values={"finished_at": utcnow(), "cancel_requested": True},
        )
    if state == State.RUNNING:
        return _transition(
            session,
            job,
            State.CANCELLING,
            actor=actor,
            action="cancel_requested",
            values={"cancel_requested": True},
        )
    raise IllegalTransition(job.id, state, State.CANCELLED, "the job already finished")


def reclaim_expired(
    session: Session, *, now: datetime | None = None, actor: str = "reclaimer"
) -> list[Job]:
    """Jobs whose lease expired (their runner died): RUNNING -> RETRYING while attempts
    remain, else FAILED (failure_class `lease_expired`); CANCELLING -> CANCELLED."""
    now = now or utcnow()
    lock_for_write(session)
    stmt = (
        select(Job)
        .where(Job.state.in_([s.value for s in ACTIVE]), Job.lease_expires_at < now)
        .order_by(Job.lease_expires_at)
        .execution_options(populate_existing=True)
    )
    if not is_sqlite(session):
        stmt = stmt.with_for_update(skip_locked=True)
    out: list[Job] = []
    for job in list(session.execute(stmt).scalars()):
        release = {"lease_owner": None, "lease_expires_at": None}
        info = {
            "owner": job.lease_owner,
            "lease_expired_at": job.lease_expires_at.isoformat() if job.lease_expires_at else None,
        }
        try:
            if job.state == State.CANCELLING:
                out.append(
                    _transition(
                        session,
                        job,
                        State.CANCELLED,
                        actor=actor,
                        action="job_cancelled",
                        values=release | {"finished_at": now},
                        payload=info,
                    )
                )
            elif job.attempt < job.max_attempts:
                out.append(
                    _transition(
                        session,
                        job,
                        State.RETRYING,
                        actor=actor,
                        action="lease_expired",
                        values=release
                        | {
                            "stage": None,
                            "failure_class": "lease_expired",
                            "failure_message": "the runner stopped heartbeating",
                        },
                        payload=info,
                    )
                )
            else:
                out.append(
                    _transition(
                        session,
                        job,
                        State.FAILED,
                        actor=actor,
                        action="job_failed",
                        values=release
                        | {
                            "finished_at": now,
                            "failure_class": "lease_expired",
                            "failure_message": f"lease expired on attempt {job.attempt} of "
                            f"{job.max_attempts}",
                        },
                        payload=info | {"failure_class": "lease_expired"},
                    )
                )
        except IllegalTransition:
            continue  # someone else moved it first
    return out


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


def _finite(value: float, field: str) -> float:
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
    data = dict(payload)
    audit.check_payload(data)
    job = _owned(session, job_id, owner)
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
    job = _owned(session, job_id, owner)
    rows = [
        ExpertMapRow(
            job_id=job_id,
            layer=int(s.layer),
            expert=int(s.expert),
            score=_finite(s.score, f"scores[{s.layer},{s.expert}]"),
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
    _owned(session, job_id, owner)
    session.execute(
        delete(Evaluation).where(Evaluation.job_id == job_id, Evaluation.phase == phase)
    )
    rows = [
        Evaluation(
            job_id=job_id,
            phase=phase,
            task=task[:128],
            metric=metric[:128],
            value=_finite(value, f"results.{task}.{metric}"),
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
    job = _owned(session, job_id, owner)
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
    job = _load(session, job_id)
    audit.append(
        session,
        actor=owner,
        action="parameters_changed",
        job_id=job_id,
        tenant=job.tenant,
        payload={"attempt": job.attempt, "tensors": items},
    )


def record_model(session: Session, job_id: str, owner: str, model: str, sha256: str) -> int:
    """Record the identity of the model that was unlearned (its weights' hash)."""
    return record_event(
        session, job_id, owner, 0, MODEL_KIND, {"model": model[:512], "sha256": sha256}
    )


# ----------------------------------------------------------------------------- reads


def get_job(
    session: Session, job_id: str, tenant: str | None = None, *, for_update: bool = False
) -> Job:
    """The job; `NotFound` if missing or (with `tenant`) owned by another tenant."""
    try:
        job = _load(session, job_id, for_update=for_update)
    except NotFound:
        raise NotFound("job_id", "job not found") from None
    if tenant is not None and job.tenant != tenant:
        raise NotFound("job_id", "job not found")  # same answer as missing: no oracle
    return job


@dataclass(frozen=True)
class JobPage:
    items: list[Job]
    next_cursor: str | None  # pass back as `cursor` for the next page; None = last page


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, job_id = json.loads(raw)
        when = datetime.fromisoformat(ts)
        if when.tzinfo is None or not isinstance(job_id, str):
            raise ValueError
        return when, job_id
    except (ValueError, TypeError, json.JSONDecodeError):
        raise InvalidCursor("cursor", "not a cursor returned by this API") from None


def list_jobs(
    session: Session,
    tenant: str | None,
    state: State | str | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> JobPage:
    """Newest first; `tenant` None = all tenants. `state` filters (ValueError if unknown);
    `cursor` continues after the last job of the previous page."""
    if limit < 1:
        raise InvalidArgument("limit", "must be >= 1")
    stmt = select(Job)
    if tenant is not None:
        stmt = stmt.where(Job.tenant == tenant)
    if state is not None:
        try:
            st = State(str(state).upper())
        except ValueError:
            raise InvalidArgument(
                "state", f"unknown state {state!r}; one of {', '.join(State)}"
            ) from None
        stmt = stmt.where(Job.state == st.value)
    if cursor:
        when, last_id = _decode_cursor(cursor)
        stmt = stmt.where(
            or_(Job.created_at < when, and_(Job.created_at == when, Job.id < last_id))
        )
    rows = list(
        session.execute(
            stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
        ).scalars()
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return JobPage(rows, _encode_cursor(rows[-1]) if more and rows else None)


def list_events(
    session: Session, job_id: str, since: int | None = 0, limit: int = 100
) -> list[JobEvent]:
    """Events with id > since, oldest first (all attempts; each carries its attempt).

    The id is a safe cursor: events of one job are written under its row lock (see
    `_owned`), so a smaller id never commits after a larger one a reader has seen."""
    return list(
        session.execute(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.id > (since or 0))
            .order_by(JobEvent.id)
            .limit(limit)
        ).scalars()
    )


def get_expert_map(session: Session, job_id: str) -> list[ExpertMapRow]:
    return list(
        session.execute(
            select(ExpertMapRow).where(ExpertMapRow.job_id == job_id).order_by(ExpertMapRow.rank)
        ).scalars()
    )


def get_evaluations(session: Session, job_id: str) -> list[Evaluation]:
    return list(
        session.execute(
            select(Evaluation)
            .where(Evaluation.job_id == job_id)
            .order_by(Evaluation.phase.desc(), Evaluation.task, Evaluation.metric)
        ).scalars()
    )


def list_artifacts(session: Session, job_id: str) -> list[Artifact]:
    return list(
        session.execute(
            select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.id)
        ).scalars()
    )


def get_artifact(session: Session, job_id: str, artifact_id: int) -> Artifact:
    art = session.get(Artifact, artifact_id)
    if art is None or art.job_id != job_id:
        raise NotFound("artifact_id", "artifact not found")
    return art
