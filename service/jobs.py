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

The module is the face of the job service: submit and the reads live here; the states
(service/job_states.py), the queue and lease (service/leases.py) and the records of a
running job (service/job_records.py) are re-exported, so callers keep using `jobs.<name>`.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import Text, and_, cast, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from service import audit
from service.db import lock_for_write
from service.errors import (
    IdempotencyConflict,
    InvalidArgument,
    InvalidCursor,
    NotFound,
    SpecRejected,
)
from service.job_records import (
    MODEL_KIND,
    PARAM_CHANGES_KIND,
    RESULT_KIND,
    STAGE_KIND,
    ExpertScore,
    ParamChange,
    finite,
    latest_event,
    latest_payload,
    record_artifact,
    record_evaluations,
    record_event,
    record_expert_map,
    record_model,
    record_param_changes,
)
from service.job_states import (
    ACTIVE,
    CLAIMABLE,
    JOB_STATES,
    STAGE_ORDER,
    TERMINAL,
    TRANSITIONS,
    JobState,
    Outcome,
    Phase,
    Stage,
    State,
    can_transition,
    get_job,
    load_job,
    owned_job,
    transition,
)
from service.leases import (
    claim_next,
    finish_job,
    heartbeat,
    reclaim_expired,
    request_cancel,
    set_stage,
)
from service.settings import Settings, get_settings
from service.tables import (
    Artifact,
    Corpus,
    CorpusRecord,
    Evaluation,
    ExpertMapRow,
    IdempotencyKey,
    Job,
    JobEvent,
    utcnow,
)
from workers.spec import JobSpec

# ----------------------------------------------------------------------------- submit


class SubmitResult(NamedTuple):
    job: Job
    created: bool  # False: an earlier request with the same Idempotency-Key


def _check_corpora(session: Session, spec: JobSpec, allow_local_paths: bool) -> None:
    # forget, retain and a membership check's holdout corpus (issue 15)
    for name, ref in spec.corpus_refs():
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
    remote: bool = False,
    settings: Settings | None = None,
) -> SubmitResult:
    """Insert a QUEUED job holding the fully resolved spec, and audit it.

    With `idempotency_key`: the same key and the same resolved spec return the first job
    (`created=False`); the same key with a different spec raises `IdempotencyConflict`.
    Corpora given by `corpus_id` must have been uploaded (`SpecRejected` otherwise);
    `path` corpora are refused unless `allow_local_paths` (the API never allows them).
    `requester` is the API key id (defaults to `actor`); `max_attempts` defaults to the
    settings' `max_attempts`.

    `remote` (the HTTP API): the model must be one a client may name (`service.models`),
    corpora must be live corpora of `tenant` (`service.corpora`), the job must fit the
    cluster and the tenant's unfinished-job limit (`service.limits`, 429 beyond it).
    """
    settings = settings or get_settings()
    if max_attempts is None:
        max_attempts = settings.max_attempts
    if not tenant:
        raise SpecRejected("tenant", "must not be empty")
    if idempotency_key is not None and not (1 <= len(idempotency_key) <= 255):
        raise SpecRejected("Idempotency-Key", "must be 1..255 characters")
    resolved = spec.resolved()
    spec_hash = spec.spec_hash()
    owned: dict[str, Any] = {}  # corpus id -> the tenant's live record (remote only)
    if remote:
        from service import corpora, limits, models

        models.check_remote(session, spec.model, tenant, settings, spec.revision)
        owned = corpora.check_spec_corpora(session, tenant, resolved)
        limits.check_fit(spec, settings)
        limits.check_memory(session, spec, settings)
    _check_corpora(session, spec, allow_local_paths)
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
        return SubmitResult(load_job(session, row.job_id), False)

    if idempotency_key is not None and (found := existing()) is not None:
        return found
    if remote:
        from service import limits

        limits.check_queue(session, tenant, settings)  # after the lock: counts are exact
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
    if idempotency_key is None:
        # Nothing to recover from here (an error fails the whole submit): no savepoint,
        # two statements fewer per submit.
        session.add(job)
        session.flush()
    else:
        try:
            # A savepoint: a concurrent submit with the same key makes only this part fail.
            with session.begin_nested():
                session.add(job)
                session.flush()
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
        payload={"spec_hash": spec_hash, **_corpus_summary(session, spec, tenant, owned)},
    )
    return SubmitResult(job, True)


def _corpus_summary(
    session: Session, spec: JobSpec, tenant: str, owned: dict[str, Any]
) -> dict[str, Any]:
    """Corpus identity for the audit log: hashes and sizes, never text or paths. `owned`:
    the tenant's records the submit already read (not read twice)."""
    out: dict[str, Any] = {"model": spec.model, "algorithm": spec.algorithm}
    for path, ref in spec.corpus_refs():
        name = "holdout" if path.endswith(".holdout") else path
        if ref.corpus_id is not None:
            # The tenant's own record first: never another tenant's figures.
            c: Any = owned.get(ref.corpus_id) or session.execute(
                select(CorpusRecord).where(
                    CorpusRecord.tenant == tenant, CorpusRecord.sha256 == ref.corpus_id
                )
            ).scalar_one_or_none() or session.get(Corpus, ref.corpus_id)
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


# ----------------------------------------------------------------------------- reads


@dataclass(frozen=True)
class JobPage:
    items: list[Job]
    next_cursor: str | None  # pass back as `cursor` for the next page; None = last page
    # With `list_jobs(spec_text=True)`: each item's spec as its stored JSON text, and the
    # items' `spec` attribute is not loaded (reading it raises).
    spec_json: list[str] | None = None


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
        # In UTC here, where a time near datetime's ends fails as a bad cursor, not later
        # in the database bind (year 1 at +14:00 is before year 1 in UTC).
        return when.astimezone(UTC), job_id
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidCursor("cursor", "not a cursor returned by this API") from None


def list_jobs(
    session: Session,
    tenant: str | None,
    state: State | str | None = None,
    cursor: str | None = None,
    limit: int = 50,
    *,
    spec_text: bool = False,
) -> JobPage:
    """Newest first; `tenant` None = all tenants. `state` filters (ValueError if unknown);
    `cursor` continues after the last job of the previous page. `spec_text`: the specs
    come as their stored JSON text (`JobPage.spec_json`), never decoded: the API's list
    passes them through, where decoding and re-encoding 50 specs was most of its cost."""
    if limit < 1:
        raise InvalidArgument("limit", "must be >= 1")
    stmt = select(Job)
    if spec_text:
        stmt = select(Job, cast(Job.spec, Text)).options(defer(Job.spec, raiseload=True))
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
    result = session.execute(
        stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    )
    pairs = [(r[0], r[1]) for r in result] if spec_text else [(j, None) for j in result.scalars()]
    more = len(pairs) > limit
    rows = [j for j, _ in pairs[:limit]]
    texts = [str(t) for _, t in pairs[:limit]] if spec_text else None
    return JobPage(rows, _encode_cursor(rows[-1]) if more and rows else None, texts)


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


__all__ = [
    "ACTIVE",
    "CLAIMABLE",
    "ExpertScore",
    "JOB_STATES",
    "JobPage",
    "JobState",
    "MODEL_KIND",
    "Outcome",
    "PARAM_CHANGES_KIND",
    "RESULT_KIND",
    "ParamChange",
    "Phase",
    "STAGE_KIND",
    "STAGE_ORDER",
    "Stage",
    "State",
    "SubmitResult",
    "TERMINAL",
    "TRANSITIONS",
    "can_transition",
    "claim_next",
    "finish_job",
    "finite",
    "get_artifact",
    "get_evaluations",
    "get_expert_map",
    "get_job",
    "heartbeat",
    "latest_event",
    "latest_payload",
    "list_artifacts",
    "list_events",
    "list_jobs",
    "load_job",
    "owned_job",
    "reclaim_expired",
    "record_artifact",
    "record_evaluations",
    "record_event",
    "record_expert_map",
    "record_model",
    "record_param_changes",
    "request_cancel",
    "set_stage",
    "submit_job",
    "transition",
]
