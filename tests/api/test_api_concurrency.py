"""Concurrent requests against a live uvicorn (real HTTP, real threadpool, real connection
pool), on SQLite and PostgreSQL: many simultaneous submits all succeed and leave one
unbroken audit chain with exactly one entry per job; one Idempotency-Key sent by many
clients at once makes one job; and a burst larger than the connection pool and the
worker-thread pool is answered instead of wedging the server (the hold-and-wait deadlock
described in api/auth.py). Behaviour only: timings live in bench/api_load.py."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import func, select

from api.app import create_app
from service import audit, db
from service.settings import Settings
from service.tables import AuditEntry, IdempotencyKey, Job
from tests.api.conftest import FORGET, Keys, serve_in_thread, spec, upload

TIMEOUT_S = 60.0  # generous: the box is shared; a wedged server would still fail it


def _all_at_once(
    n: int, call: Callable[[httpx.Client, int], httpx.Response], base: str, key: str
) -> list[httpx.Response]:
    """Run `call` n times on n threads released together by a barrier; one HTTP client
    (and connection) per thread, as n separate callers would."""
    barrier = threading.Barrier(n)

    def one(i: int) -> httpx.Response:
        with httpx.Client(base_url=base, headers=Keys.h(key), timeout=TIMEOUT_S) as c:
            barrier.wait(timeout=TIMEOUT_S)
            return call(c, i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def _chain_ok(app: FastAPI) -> audit.VerifyResult:
    with db.session_scope(app.state.session_factory) as s:
        return audit.verify(s)


def test_concurrent_submits_make_one_unbroken_audit_chain(
    app: FastAPI, live_url: str, api_keys: Keys
) -> None:
    with httpx.Client(base_url=live_url, headers=Keys.h(api_keys.requester)) as c:
        fid = upload(c, api_keys.requester, FORGET)
    with db.session_scope(app.state.session_factory) as s:
        head_before = audit.verify(s).head_seq

    n = 48
    responses = _all_at_once(
        n, lambda c, i: c.post("/v1/jobs", json=spec(fid)), live_url, api_keys.requester
    )

    assert [r.status_code for r in responses] == [202] * n, [r.text for r in responses]
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == n
    result = _chain_ok(app)
    assert result.ok, result.reason
    with db.session_scope(app.state.session_factory) as s:
        submitted = Counter(
            s.execute(
                select(AuditEntry.job_id).where(
                    AuditEntry.action == "job_submitted", AuditEntry.job_id.in_(ids)
                )
            ).scalars()
        )
        queued = s.execute(
            select(func.count()).select_from(Job).where(Job.id.in_(ids), Job.state == "QUEUED")
        ).scalar_one()
    # Each job committed together with exactly one audit entry, and nothing else was
    # appended meanwhile: the chain grew by exactly n.
    assert submitted == Counter(ids)
    assert queued == n
    assert result.head_seq == head_before + n
    with httpx.Client(base_url=live_url, headers=Keys.h(api_keys.auditor)) as aud:
        verify = aud.get("/v1/audit/verify").json()
    assert verify["ok"] is True and verify["first_bad_seq"] is None


def test_one_idempotency_key_sent_concurrently_makes_one_job(
    app: FastAPI, live_url: str, api_keys: Keys
) -> None:
    with httpx.Client(base_url=live_url, headers=Keys.h(api_keys.requester)) as c:
        fid = upload(c, api_keys.requester, FORGET)
    key = "concurrent-idem-1"

    def post(c: httpx.Client, _i: int) -> httpx.Response:
        return c.post("/v1/jobs", json=spec(fid), headers={"Idempotency-Key": key})

    responses = _all_at_once(16, post, live_url, api_keys.requester)

    assert [r.status_code for r in responses] == [202] * 16, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    replayed = Counter(r.headers["Idempotency-Replayed"] for r in responses)
    assert replayed == {"false": 1, "true": 15}
    job_id = responses[0].json()["id"]
    with db.session_scope(app.state.session_factory) as s:
        keys_rows = s.execute(
            select(func.count()).select_from(IdempotencyKey).where(IdempotencyKey.key == key)
        ).scalar_one()
        entries = s.execute(
            select(func.count())
            .select_from(AuditEntry)
            .where(AuditEntry.job_id == job_id, AuditEntry.action == "job_submitted")
        ).scalar_one()
    assert keys_rows == 1 and entries == 1
    assert _chain_ok(app).ok


def test_burst_beyond_pool_and_threads_is_answered(settings: Settings, api_keys: Keys) -> None:
    """One pooled connection, 2 s pool timeout, 60 simultaneous callers (more than the 40
    worker threads): when a request held a connection across two threadpool hops, every
    thread ended up waiting for the pool while the connection's owner waited for a thread,
    and the requests failed with 500 at the pool timeout. Now each hop returns its
    connection, so all of them are answered."""
    tiny = settings.model_copy(
        update={"db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout_s": 2.0}
    )
    app = create_app(tiny)
    try:
        with serve_in_thread(app) as base:
            with httpx.Client(base_url=base, headers=Keys.h(api_keys.requester)) as c:
                fid = upload(c, api_keys.requester, FORGET)
                job_id = c.post("/v1/jobs", json=spec(fid)).json()["id"]

            def mixed(c: httpx.Client, i: int) -> httpx.Response:
                kind = i % 3
                if kind == 0:
                    return c.get("/v1/jobs")
                if kind == 1:
                    return c.get(f"/v1/jobs/{job_id}")
                return c.post("/v1/jobs", json=spec(fid))

            responses = _all_at_once(60, mixed, base, api_keys.requester)
            codes: Counter[Any] = Counter(r.status_code for r in responses)
            assert codes == {200: 40, 202: 20}, [r.text for r in responses if r.status_code >= 500]
            # The server is still healthy afterwards, and the chain intact.
            with httpx.Client(base_url=base, headers=Keys.h(api_keys.auditor)) as aud:
                assert aud.get("/v1/audit/verify").json()["ok"] is True
    finally:
        app.state.engine.dispose()


def test_open_event_streams_beyond_the_thread_pool_do_not_starve_other_calls(
    live_url: str, api_keys: Keys
) -> None:
    """60 clients follow a job that does not end (more than the 40 worker threads). Each
    stream waits between polls on the event loop, not on a thread, so ordinary calls are
    answered while the streams open. (A sync stream held a thread from one sent line to
    the next, up to the 15 s keep-alive: once 40 streams were open, every other call and
    the remaining streams waited for those 15 s.)"""
    with httpx.Client(base_url=live_url, headers=Keys.h(api_keys.requester)) as c:
        fid = upload(c, api_keys.requester, FORGET)
        job_id = c.post("/v1/jobs", json=spec(fid)).json()["id"]
    n, threads = 60, 40
    opened: list[str] = []
    lock = threading.Lock()
    done = threading.Event()

    def watch(_: int) -> None:
        sse = {**Keys.h(api_keys.requester), "Accept": "text/event-stream"}
        with httpx.Client(base_url=live_url, headers=sse, timeout=TIMEOUT_S) as c:
            with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                first = next(r.iter_lines())
                with lock:
                    opened.append(first)
                done.wait(timeout=TIMEOUT_S)

    def count() -> int:
        with lock:
            return len(opened)

    with ThreadPoolExecutor(max_workers=n) as pool:
        watchers = [pool.submit(watch, i) for i in range(n)]
        try:
            _wait(lambda: count() >= threads, "40 open streams")
            # Answered now, not after a stream's 15 s keep-alive frees a thread.
            with httpx.Client(
                base_url=live_url, headers=Keys.h(api_keys.requester), timeout=8.0
            ) as c:
                for _ in range(10):
                    r = c.get(f"/v1/jobs/{job_id}")
                    assert r.status_code == 200 and r.json()["state"] == "QUEUED"
            _wait(lambda: count() == n, "all 60 streams open")
        finally:
            done.set()
        for w in watchers:
            w.result()
    assert opened == ["retry: 2000"] * n


def _wait(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
