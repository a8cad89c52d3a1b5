"""Job states, stages and the allowed transitions, and the guarded row helpers every job
module uses: load a job, compare-and-set its state (with its audit entry), check a lease.
The state machine itself is drawn in service/jobs.py's docstring."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Literal, get_args

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service import audit
from service.db import is_sqlite, lock_for_write
from service.errors import (
    IllegalTransition,
    LeaseLost,
    NotFound,
)
from service.tables import (
    Job,
    utcnow,
)

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


def load_job(session: Session, job_id: str, *, for_update: bool = False) -> Job:
    stmt = select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    if for_update and not is_sqlite(session):
        stmt = stmt.with_for_update()
    job = session.execute(stmt).scalar_one_or_none()
    if job is None:
        raise NotFound("job_id", f"job {job_id} not found")
    return job


def transition(
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
        fresh = load_job(session, job.id)
        if guard_owner is not None and fresh.lease_owner != guard_owner:
            raise LeaseLost("lease", f"job {job.id} is no longer leased by {guard_owner}")
        raise IllegalTransition(job.id, fresh.state, target, "the job changed concurrently")
    job = load_job(session, job.id)
    audit.append(
        session,
        actor=actor,
        action=action,
        job_id=job.id,
        tenant=job.tenant,
        payload={"from": current.value, "to": target.value, "attempt": job.attempt}
        | dict(payload or {}),
    )
    if target in TERMINAL:
        from service import corpora

        # The job's uploaded corpora are deleted once no unfinished job needs them.
        corpora.release_for_job(session, job, actor=actor)
    return job


def owned_job(session: Session, job_id: str, owner: str) -> Job:
    """The job, locked, if `owner` holds its lease (else LeaseLost / NotFound)."""
    lock_for_write(session)
    job = load_job(session, job_id, for_update=True)
    if job.lease_owner != owner or State(job.state) not in ACTIVE:
        raise LeaseLost("lease", f"job {job_id} is not leased by {owner} (state {job.state})")
    return job


def get_job(
    session: Session, job_id: str, tenant: str | None = None, *, for_update: bool = False
) -> Job:
    """The job; `NotFound` if missing or (with `tenant`) owned by another tenant."""
    try:
        job = load_job(session, job_id, for_update=for_update)
    except NotFound:
        raise NotFound("job_id", "job not found") from None
    if tenant is not None and job.tenant != tenant:
        raise NotFound("job_id", "job not found")  # same answer as missing: no oracle
    return job
