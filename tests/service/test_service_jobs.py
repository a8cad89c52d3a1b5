"""The job state machine, lease, idempotency and reads, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from service import audit, jobs
from service.db import session_scope
from service.errors import (
    IdempotencyConflict,
    IllegalTransition,
    InvalidArgument,
    InvalidCursor,
    LeaseLost,
    NotFound,
    SpecRejected,
    UnsafePayload,
)
from service.jobs import ExpertScore, Stage, State
from service.tables import AuditEntry, Job, utcnow
from tests.service.helpers import demo_spec


def submit(db, tenant="t1", key=None, **over):
    with session_scope(db.factory) as s:
        return jobs.submit_job(s, demo_spec(**over), tenant, "key:a", key).job


def claim(db, owner, lease=60, now=None):
    with session_scope(db.factory) as s:
        return jobs.claim_next(s, owner, lease, now=now)


def actions(db, job_id):
    with session_scope(db.factory) as s:
        return [e.action for e in audit.list_entries(s, job_id=job_id)]


def test_happy_path_through_every_stage(db):
    job = submit(db)
    assert job.state == "QUEUED" and job.attempt == 0
    assert job.spec["training"]["max_steps"] == 100  # stored fully resolved
    assert job.spec_hash == demo_spec().spec_hash()
    got = claim(db, "w1")
    assert got.id == job.id and got.state == "RUNNING" and got.attempt == 1
    assert got.lease_owner == "w1" and got.lease_expires_at > utcnow()
    with session_scope(db.factory) as s:
        for st in Stage:
            assert jobs.set_stage(s, job.id, "w1", st).stage == st.value
        jobs.record_expert_map(
            s, job.id, "w1",
            [ExpertScore(1, 2, 0.9, 1, True), ExpertScore(0, 0, 0.1, 2, False)], "affinity",
        )
        jobs.record_evaluations(s, job.id, "w1", "before", {"forget": {"acc": 0.9}})
        jobs.record_evaluations(s, job.id, "w1", "after", {"forget": {"acc": 0.2}})
        done = jobs.finish_job(s, job.id, "w1", "succeeded")
    assert done.state == "SUCCEEDED" and done.lease_owner is None and done.finished_at
    assert actions(db, job.id) == (
        ["job_submitted", "job_claimed"] + ["stage_changed"] * 5
        + ["experts_selected", "job_succeeded"]
    )
    with session_scope(db.factory) as s:
        assert audit.verify(s).ok
        assert [(e.step, e.kind, e.payload["stage"]) for e in jobs.list_events(s, job.id)] == [
            (i, "stage", st.value) for i, st in enumerate(Stage)
        ]
        assert [(r.layer, r.expert, r.selected) for r in jobs.get_expert_map(s, job.id)] == [
            (1, 2, True), (0, 0, False)
        ]
        assert {(e.phase, e.value) for e in jobs.get_evaluations(s, job.id)} == {
            ("before", 0.9), ("after", 0.2)
        }


def test_transition_table():
    assert jobs.can_transition("QUEUED", "RUNNING")
    assert jobs.can_transition("RUNNING", "CANCELLING")
    assert not jobs.can_transition("QUEUED", "SUCCEEDED")
    for terminal in jobs.TERMINAL:
        assert not jobs.TRANSITIONS[terminal]


def test_illegal_transitions_are_refused(db):
    job = submit(db)
    with session_scope(db.factory) as s:
        j = jobs.get_job(s, job.id)
        with pytest.raises(IllegalTransition, match="QUEUED to SUCCEEDED"):
            jobs.transition(s, j, State.SUCCEEDED, actor="x", action="bad")
    with pytest.raises(LeaseLost):  # nobody holds a lease on a QUEUED job
        with session_scope(db.factory) as s:
            jobs.finish_job(s, job.id, "w1", "succeeded")
    claim(db, "w1")
    with session_scope(db.factory) as s:
        jobs.set_stage(s, job.id, "w1", "unlearning")
    with pytest.raises(IllegalTransition, match="forward"):
        with session_scope(db.factory) as s:
            jobs.set_stage(s, job.id, "w1", "attribution")
    with pytest.raises(IllegalTransition, match="unknown stage"):
        with session_scope(db.factory) as s:
            jobs.set_stage(s, job.id, "w1", "dancing")
    with pytest.raises(LeaseLost):  # another dispatcher cannot write into this attempt
        with session_scope(db.factory) as s:
            jobs.set_stage(s, job.id, "w2", "packaging")
    with session_scope(db.factory) as s:
        jobs.finish_job(s, job.id, "w1", "failed", failure_class="oom", failure_message="boom")
    with pytest.raises(IllegalTransition, match="already finished"):
        with session_scope(db.factory) as s:
            jobs.request_cancel(s, job.id, "t1", "key:a")
    with session_scope(db.factory) as s:
        j = jobs.get_job(s, job.id)
        assert (j.state, j.failure_class, j.failure_message) == ("FAILED", "oom", "boom")
        # the refused attempts left no audit entries and the chain is intact
        assert actions(db, job.id)[-1] == "job_failed"
        assert audit.verify(s).ok


def test_compare_and_set_refuses_a_stale_read(db):
    job = submit(db)
    with session_scope(db.factory) as s:
        stale = jobs.get_job(s, job.id)  # read QUEUED
    with session_scope(db.factory) as s:
        jobs.request_cancel(s, job.id, "t1", "key:a")  # someone else moves it
    with session_scope(db.factory) as s:
        stale.state = "QUEUED"
        with pytest.raises(IllegalTransition, match="changed concurrently"):
            jobs.transition(s, stale, State.RUNNING, actor="w", action="job_claimed")
    with session_scope(db.factory) as s:
        assert jobs.get_job(s, job.id).state == "CANCELLED"


def test_cancel_queued_and_running(db):
    a, b = submit(db), submit(db)
    with session_scope(db.factory) as s:
        assert jobs.request_cancel(s, a.id, "t1", "key:a").state == "CANCELLED"
        assert jobs.request_cancel(s, a.id, "t1", "key:a").state == "CANCELLED"  # no-op
    assert claim(db, "w1").id == b.id  # the cancelled one is never claimed
    with session_scope(db.factory) as s:
        assert jobs.heartbeat(s, b.id, "w1", 60) is False
        assert jobs.request_cancel(s, b.id, "t1", "key:a").state == "CANCELLING"
        assert jobs.heartbeat(s, b.id, "w1", 60) is True  # the runner learns of it
        assert jobs.finish_job(s, b.id, "w1", "cancelled").state == "CANCELLED"
    with pytest.raises(NotFound):  # another tenant's job looks missing
        with session_scope(db.factory) as s:
            jobs.request_cancel(s, b.id, "t2", "key:b")
    assert actions(db, b.id)[-2:] == ["cancel_requested", "job_cancelled"]


def test_concurrent_claimers_never_share_a_job(db):
    n_jobs, n_threads = 12, 4
    ids = {submit(db).id for _ in range(n_jobs)}
    claimed: dict[str, list[str]] = {f"w{i}": [] for i in range(n_threads)}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def worker(owner: str) -> None:
        try:
            barrier.wait()
            while True:
                job = claim(db, owner)
                if job is None:
                    return
                claimed[owner].append(job.id)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(o,)) for o in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    flat = [j for js in claimed.values() for j in js]
    assert len(flat) == len(set(flat)) == n_jobs  # each job claimed exactly once
    assert set(flat) == ids
    with session_scope(db.factory) as s:
        rows = s.execute(select(Job.id, Job.lease_owner, Job.attempt)).all()
        owner_of = {j: o for o, js in claimed.items() for j in js}
        assert all(owner_of[r.id] == r.lease_owner and r.attempt == 1 for r in rows)
        assert audit.verify(s).ok
        n_claims = s.execute(
            select(AuditEntry).where(AuditEntry.action == "job_claimed")
        ).all()
        assert len(n_claims) == n_jobs


def test_idempotency(db):
    with session_scope(db.factory) as s:
        first = jobs.submit_job(s, demo_spec(), "t1", "key:a", "req-1")
    assert first.created
    with session_scope(db.factory) as s:
        again = jobs.submit_job(s, demo_spec(), "t1", "key:a", "req-1")
    assert not again.created and again.job.id == first.job.id
    with pytest.raises(IdempotencyConflict, match="different request body"):
        with session_scope(db.factory) as s:
            jobs.submit_job(s, demo_spec(algorithm="npo"), "t1", "key:a", "req-1")
    with session_scope(db.factory) as s:  # keys are per tenant
        other = jobs.submit_job(s, demo_spec(), "t2", "key:b", "req-1")
    assert other.created and other.job.id != first.job.id
    with session_scope(db.factory) as s:
        assert len(s.execute(select(Job.id)).all()) == 2
        assert [e.action for e in audit.list_entries(s)] == ["job_submitted"] * 2


def test_concurrent_idempotent_submits_create_one_job(db):
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def go() -> None:
        try:
            barrier.wait()
            with session_scope(db.factory) as s:
                results.append(jobs.submit_job(s, demo_spec(), "t1", "k", "same").job.id)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 4 and len(set(results)) == 1
    with session_scope(db.factory) as s:
        assert len(s.execute(select(Job.id)).all()) == 1
        assert audit.verify(s).ok


def test_reclaim_expired_lease(db):
    job = submit(db)
    with session_scope(db.factory) as s:
        s.execute(text("UPDATE jobs SET max_attempts = 2 WHERE id = :i"), {"i": job.id})
    t0 = utcnow()
    claim(db, "w1", lease=30, now=t0)
    with session_scope(db.factory) as s:  # not yet expired: nothing happens
        assert jobs.reclaim_expired(s, now=t0 + timedelta(seconds=10)) == []
    with session_scope(db.factory) as s:
        back = jobs.reclaim_expired(s, now=t0 + timedelta(seconds=31))
    assert [(j.id, j.state, j.attempt, j.lease_owner) for j in back] == [
        (job.id, "RETRYING", 1, None)
    ]
    with pytest.raises(LeaseLost):  # the dead runner cannot come back
        with session_scope(db.factory) as s:
            jobs.heartbeat(s, job.id, "w1", 30)
    again = claim(db, "w2", lease=30, now=t0 + timedelta(seconds=40))
    assert (again.id, again.attempt, again.lease_owner) == (job.id, 2, "w2")
    with session_scope(db.factory) as s:
        out = jobs.reclaim_expired(s, now=t0 + timedelta(seconds=100))
    assert [(j.state, j.failure_class) for j in out] == [("FAILED", "lease_expired")]
    assert actions(db, job.id) == [
        "job_submitted", "job_claimed", "lease_expired", "job_claimed", "job_failed"
    ]


def test_retryable_failure_goes_back_to_the_queue(db):
    job = submit(db)
    claim(db, "w1")
    with session_scope(db.factory) as s:
        j = jobs.finish_job(s, job.id, "w1", "failed", failure_class="ray", retryable=True)
    assert (j.state, j.lease_owner) == ("RETRYING", None)
    assert claim(db, "w2").attempt == 2


def test_events_are_idempotent_and_paged_by_cursor(db):
    job = submit(db)
    claim(db, "w1")
    with session_scope(db.factory) as s:
        e1 = jobs.record_event(s, job.id, "w1", 1, "train", {"loss": 2.5})
        e2 = jobs.record_event(s, job.id, "w1", 2, "train", {"loss": 2.0})
        dup = jobs.record_event(s, job.id, "w1", 1, "train", {"loss": 9.9})
        jobs.record_event(s, job.id, "w1", 2, "overlap", {"overlap": 0.8})
    assert dup == e1 and e2 > e1
    with session_scope(db.factory) as s:
        all_ev = jobs.list_events(s, job.id)
        assert [(e.step, e.kind, e.payload) for e in all_ev] == [
            (1, "train", {"loss": 2.5}), (2, "train", {"loss": 2.0}),
            (2, "overlap", {"overlap": 0.8}),
        ]
        assert [e.id for e in jobs.list_events(s, job.id, since=e1)] == [
            e.id for e in all_ev[1:]
        ]
        assert jobs.list_events(s, job.id, since=all_ev[-1].id) == []
    for bad in ({"text": "x"}, {"note": "y" * 600}, {"nested": [{"prompt": "q"}]}):
        with pytest.raises(UnsafePayload):
            with session_scope(db.factory) as s:
                jobs.record_event(s, job.id, "w1", 3, "train", bad)
    with pytest.raises(LeaseLost):
        with session_scope(db.factory) as s:
            jobs.record_event(s, job.id, "w2", 3, "train", {"loss": 1.0})
    with pytest.raises(InvalidArgument, match=r"results\.forget\.acc"):
        with session_scope(db.factory) as s:
            jobs.record_evaluations(s, job.id, "w1", "after", {"forget": {"acc": float("nan")}})


def test_list_jobs_filters_tenants_and_pages(db):
    mine = [submit(db, "t1").id for _ in range(5)]
    submit(db, "t2")
    with session_scope(db.factory) as s:
        jobs.request_cancel(s, mine[0], "t1", "k")
    seen: list[str] = []
    cursor = None
    with session_scope(db.factory) as s:
        while True:
            page = jobs.list_jobs(s, "t1", cursor=cursor, limit=2)
            seen += [j.id for j in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == list(reversed(mine))  # newest first, no repeats, no other tenant
        assert [j.id for j in jobs.list_jobs(s, "t1", state="CANCELLED").items] == [mine[0]]
        assert len(jobs.list_jobs(s, "t1", state="queued").items) == 4
        assert len(jobs.list_jobs(s, None).items) == 6
        with pytest.raises(InvalidCursor):
            jobs.list_jobs(s, "t1", cursor="not-a-cursor")
        with pytest.raises(InvalidArgument, match="unknown state"):
            jobs.list_jobs(s, "t1", state="DONE")
        with pytest.raises(NotFound):
            jobs.get_job(s, mine[1], "t2")


def test_submit_refuses_unknown_corpus_and_server_paths(db):
    with pytest.raises(SpecRejected, match="forget.corpus_id"):
        with session_scope(db.factory) as s:
            jobs.submit_job(
                s, demo_spec(model="m", forget={"corpus_id": "a" * 64}, retain=None,
                             algorithm="ga"), "t1", "k",
            )
    with pytest.raises(SpecRejected, match="forget.path"):
        with session_scope(db.factory) as s:
            jobs.submit_job(
                s, demo_spec(model="m", forget={"path": "/etc/passwd"}, retain=None,
                             algorithm="ga"), "t1", "k",
            )
    with session_scope(db.factory) as s:
        assert s.execute(select(Job.id)).all() == []


def test_reclaim_of_a_cancelling_job_cancels_it(db):
    job = submit(db)
    t0 = utcnow()
    claim(db, "w1", lease=10, now=t0)
    with session_scope(db.factory) as s:
        jobs.request_cancel(s, job.id, "t1", "key:a")
    with session_scope(db.factory) as s:
        out = jobs.reclaim_expired(s, now=t0 + timedelta(seconds=11))
    assert [(j.state, j.lease_owner) for j in out] == [("CANCELLED", None)]
    assert claim(db, "w2") is None


def test_claims_oldest_first_and_heartbeat_extends_the_lease(db):
    a, b = submit(db), submit(db)
    t0 = utcnow()
    first = claim(db, "w1", lease=30, now=t0)
    assert first.id == a.id and first.lease_expires_at == t0 + timedelta(seconds=30)
    with session_scope(db.factory) as s:
        jobs.heartbeat(s, a.id, "w1", 30, now=t0 + timedelta(seconds=20))
    with session_scope(db.factory) as s:
        j = jobs.get_job(s, a.id)
        assert j.lease_expires_at == t0 + timedelta(seconds=50)
        assert j.heartbeat_at == t0 + timedelta(seconds=20)
        # the heartbeat kept it alive past its first expiry
        assert jobs.reclaim_expired(s, now=t0 + timedelta(seconds=40)) == []
    assert claim(db, "w2").id == b.id


def test_artifacts(db):
    job, other = submit(db), submit(db)
    claim(db, "w1")
    with session_scope(db.factory) as s:
        art = jobs.record_artifact(
            s, job.id, "w1", kind="expert_patch", name="patch.safetensors",
            location="/blobs/patch.safetensors", sha256="a" * 64, size=123,
        )
        # re-recording the same name (a retried attempt) replaces it
        art2 = jobs.record_artifact(
            s, job.id, "w1", kind="expert_patch", name="patch.safetensors",
            location="/blobs/patch.safetensors", sha256="b" * 64, size=124,
        )
    with session_scope(db.factory) as s:
        assert [(a.name, a.sha256, a.size) for a in jobs.list_artifacts(s, job.id)] == [
            ("patch.safetensors", "b" * 64, 124)
        ]
        assert jobs.get_artifact(s, job.id, art2.id).sha256 == "b" * 64
        with pytest.raises(NotFound):
            jobs.get_artifact(s, job.id, art.id)  # replaced
        with pytest.raises(NotFound):
            jobs.get_artifact(s, other.id, art2.id)  # belongs to another job
