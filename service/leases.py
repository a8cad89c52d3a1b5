"""The queue and the lease: claim the next job fairly, heartbeat, move through stages,
finish, cancel, and reclaim jobs whose lease expired. Runner-side writes name the lease
`owner`; a caller whose lease was reclaimed gets `LeaseLost` (service/jobs.py)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, aliased

from service import audit
from service.db import is_sqlite, lock_for_write
from service.errors import (
    IllegalTransition,
    LeaseLost,
)
from service.job_records import STAGE_KIND, record_event
from service.job_states import (
    ACTIVE,
    CLAIMABLE,
    STAGE_ORDER,
    Outcome,
    Stage,
    State,
    get_job,
    load_job,
    owned_job,
    transition,
)
from service.redact import scrub_text
from service.tables import (
    Job,
    utcnow,
)

# ----------------------------------------------------------------------------- lease


def claim_next(
    session: Session, owner: str, lease_seconds: int, *, now: datetime | None = None
) -> Job | None:
    """Claim the oldest QUEUED or RETRYING job for `owner`: RUNNING, attempt + 1, a lease
    until now + lease_seconds. None when nothing is claimable. Two claimers never get the
    same job (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: the write lock + a guarded
    update). Commit promptly: the row lock is held until then.

    The returned job's `spec["model"]` and `spec["revision"]` are what the runner loads
    (`models.runner_source`: a registered directory or hub id at its revision, the model of
    `job:<id>`); the stored spec keeps the client's name. The returned object is then
    detached, so that substitution is never saved."""
    if not owner:
        raise ValueError("owner must not be empty")
    now = now or utcnow()
    lock_for_write(session)
    # Fair across tenants: the tenant with the fewest active (leased) jobs goes first, then
    # the oldest job. One tenant's 3,000 queued jobs no longer hold back another's one.
    active = aliased(Job)
    running = (
        select(func.count())
        .select_from(active)
        .where(active.tenant == Job.tenant, active.state.in_([s.value for s in ACTIVE]))
        .scalar_subquery()
    )
    stmt = (
        select(Job)
        .where(Job.state.in_([s.value for s in CLAIMABLE]))
        .order_by(running, Job.created_at, Job.id)
        .limit(1)
        .execution_options(populate_existing=True)
    )
    if not is_sqlite(session):
        stmt = stmt.with_for_update(skip_locked=True, of=Job)
    for _ in range(5):  # a lost compare-and-set just means: try the next job
        job = session.execute(stmt).scalar_one_or_none()
        if job is None:
            return None
        try:
            claimed = transition(
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
        return _for_runner(session, claimed)
    return None


def _for_runner(session: Session, job: Job) -> Job:
    from service import models

    name = str((job.spec or {}).get("model", "demo"))
    revision = (job.spec or {}).get("revision")
    try:
        ref, rev = models.runner_source(session, name, revision)
    except ValueError:
        return job  # the runner fails to load it and reports a user_input failure
    if (ref, rev) == (name, revision):
        return job
    session.flush()
    session.expunge(job)
    job.spec = {**job.spec, "model": ref, "revision": rev}
    return job


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
        load_job(session, job_id)  # NotFound if it does not exist
        raise LeaseLost("lease", f"job {job_id} is not leased by {owner}")
    return bool(load_job(session, job_id).cancel_requested)


def set_stage(session: Session, job_id: str, owner: str, stage: Stage | str) -> Job:
    """Move a RUNNING job to `stage` (forward only; stages may be skipped). Audited, and
    recorded as an event of kind `stage`."""
    try:
        target = Stage(stage)
    except ValueError:
        raise IllegalTransition(job_id, "?", str(stage), "unknown stage") from None
    job = owned_job(session, job_id, owner)
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
    return load_job(session, job_id)


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
    job = owned_job(session, job_id, owner)
    now = utcnow()
    release = {"lease_owner": None, "lease_expires_at": None}
    if outcome == "succeeded":
        return transition(
            session,
            job,
            State.SUCCEEDED,
            actor=owner,
            action="job_succeeded",
            values=release | {"finished_at": now},
            guard_owner=owner,
        )
    if outcome == "cancelled":
        return transition(
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
    # Shown to the client (job, certificate, console): no server path ("model '/srv/m'
    # could not be loaded", a traceback's files); the model's by the client's name for it.
    fmsg = scrub_text(failure_message or "", _model_paths(session, job))[:4000]
    if retryable and job.attempt < job.max_attempts and State(job.state) == State.RUNNING:
        return transition(
            session,
            job,
            State.RETRYING,
            actor=owner,
            action="job_retrying",
            values=release | {"failure_class": fclass, "failure_message": fmsg, "stage": None},
            payload={"failure_class": fclass},
            guard_owner=owner,
        )
    return transition(
        session,
        job,
        State.FAILED,
        actor=owner,
        action="job_failed",
        values=release | {"finished_at": now, "failure_class": fclass, "failure_message": fmsg},
        payload={"failure_class": fclass},
        guard_owner=owner,
    )


def _model_paths(session: Session, job: Job) -> dict[str, str]:
    """{the directory the runner loads the job's model from: the client's name for it}
    ({} for a hub id, `demo`, or a source no longer there)."""
    from service import models

    name = str((job.spec or {}).get("model", ""))
    try:
        ref, _ = models.runner_source(session, name, (job.spec or {}).get("revision"))
    except ValueError:
        return {}
    return {ref: name} if ref != name else {}


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
        return transition(
            session,
            job,
            State.CANCELLED,
            actor=actor,
            action="job_cancelled",
            values={"finished_at": utcnow(), "cancel_requested": True},
        )
    if state == State.RUNNING:
        return transition(
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
                    transition(
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
                    transition(
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
                    transition(
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
