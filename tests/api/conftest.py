"""Fixtures of the API tests: a migrated database per backend (SQLite file and a fresh
PostgreSQL database), the app, API keys of two tenants, and a job driver that advances jobs
through the service's own functions (what the dispatcher will do).

PostgreSQL must be reachable at 127.0.0.1:5432 (user postgres, trust auth): if it is not,
the PostgreSQL variants fail (they never skip).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from service import db, jobs, keys
from service.settings import Settings
from service.storage import BlobStore
from service.tables import Job

PG_HOST = os.environ.get("MOE_UNLEARN_TEST_PG_HOST", "127.0.0.1")
PG_ADMIN_DSN = f"host={PG_HOST} port=5432 user=postgres dbname=test connect_timeout=5"


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A migrated, empty database for the session (one per backend)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'api.db'}"
        db.upgrade(url)
        yield url
        return
    name = f"mu_api_{uuid.uuid4().hex[:10]}"
    # No skip: an unreachable PostgreSQL is an error of the run.
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@{PG_HOST}:5432/{name}"
    try:
        db.upgrade(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def settings(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        database_url=db_url,
        data_dir=tmp_path_factory.mktemp("blobs"),
        max_corpus_bytes=4096,
        max_corpus_records=50,
        page_size=2,
        # The shared app's limits stay out of the way; tests/api/test_api_security.py
        # builds apps with tight ones.
        rate_per_key=1e6,
        rate_burst=1_000_000,
        max_queued_jobs=1_000_000,
        max_streams_per_tenant=1000,
    )


@pytest.fixture(scope="session")
def app(settings: Settings) -> Iterator[FastAPI]:
    application = create_app(settings)
    yield application
    application.state.engine.dispose()


@pytest.fixture(scope="session")
def client(app: FastAPI) -> Iterator[TestClient]:
    # raise_server_exceptions=False: a bug must show up as the 500 a user would get.
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@dataclass(frozen=True)
class Keys:
    requester: str  # tenant acme
    auditor: str  # tenant acme
    other: str  # requester of tenant globex
    other_auditor: str  # auditor of tenant globex
    admin: str  # tenant ops, platform admin

    @staticmethod
    def h(secret: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="session")
def api_keys(app: FastAPI) -> Keys:
    with db.session_scope(app.state.session_factory) as s:
        # The admin is a platform admin (acts for any tenant); plain admins are tested in
        # tests/api/test_api_security.py.
        made = {
            name: keys.create_key(s, role, tenant, actor="test", platform=role == "admin")[1]
            for name, role, tenant in [
                ("requester", "requester", "acme"),
                ("auditor", "auditor", "acme"),
                ("other", "requester", "globex"),
                ("other_auditor", "auditor", "globex"),
                ("admin", "admin", "ops"),
            ]
        }
    return Keys(**made)


class Driver:
    """Advances a job the way the dispatcher and runner will: through service.jobs."""

    def __init__(self, app: FastAPI, owner: str = "test-driver") -> None:
        self.factory = app.state.session_factory
        self.settings: Settings = app.state.settings
        self.owner = owner

    def claim(self, job_id: str) -> None:
        with db.session_scope(self.factory) as s:
            job = jobs.claim_next(s, self.owner, lease_seconds=300)
            assert job is not None and job.id == job_id, "another job was queued first"

    def stage(self, job_id: str, stage: str) -> None:
        with db.session_scope(self.factory) as s:
            jobs.set_stage(s, job_id, self.owner, stage)

    def event(self, job_id: str, step: int, kind: str, payload: dict[str, Any]) -> int:
        with db.session_scope(self.factory) as s:
            return jobs.record_event(s, job_id, self.owner, step, kind, payload)

    def run_to_success(
        self,
        job_id: str,
        *,
        artifact: bytes = b"patch-bytes",
        more: tuple[tuple[str, str, bytes], ...] = (),
    ) -> None:
        """The whole life of a job with recorded results: 2 layers x 4 experts scored,
        expert (1, 2) selected, 3 training steps, scores before/after, one artifact (and
        `more`: (kind, name, bytes) each)."""
        self.claim(job_id)
        self.stage(job_id, "evaluating_before")
        with db.session_scope(self.factory) as s:
            jobs.record_model(s, job_id, self.owner, "demo", "ab" * 32)
            jobs.record_evaluations(
                s,
                job_id,
                self.owner,
                "before",
                {"forget_qa": {"acc": 0.9}, "retain_qa": {"acc": 0.8}},
            )
        self.stage(job_id, "attribution")
        scores = [
            jobs.ExpertScore(layer=la, expert=e, score=(la * 4 + e) / 10, rank=0, selected=False)
            for la in range(2)
            for e in range(4)
        ]
        ranked = sorted(scores, key=lambda x: -x.score)
        scores = [
            jobs.ExpertScore(x.layer, x.expert, x.score, rank=i + 1, selected=(i == 0))
            for i, x in enumerate(ranked)
        ]
        with db.session_scope(self.factory) as s:
            jobs.record_expert_map(s, job_id, self.owner, scores, "affinity")
        self.stage(job_id, "unlearning")
        for step in (1, 2, 3):
            self.event(job_id, step, "train", {"loss": 1.0 / step, "overlap": 0.5})
        self.stage(job_id, "evaluating_after")
        with db.session_scope(self.factory) as s:
            jobs.record_evaluations(
                s,
                job_id,
                self.owner,
                "after",
                {"forget_qa": {"acc": 0.2}, "retain_qa": {"acc": 0.79}},
            )
            jobs.record_param_changes(
                s,
                job_id,
                self.owner,
                [jobs.ParamChange("model.layers.1.mlp.experts.7.w1", "", "11" * 32, "22" * 32, 64)],
            )
        self.stage(job_id, "packaging")
        store = BlobStore.from_settings(self.settings)
        for kind, name, data in (("expert_patch", "patch.bin", artifact), *more):
            blob = store.put_artifact(job_id, name, data)
            with db.session_scope(self.factory) as s:
                jobs.record_artifact(
                    s,
                    job_id,
                    self.owner,
                    kind=kind,
                    name=name,
                    location=blob.location,
                    sha256=blob.sha256,
                    size=blob.size,
                )
        self.finish(job_id, "succeeded")

    def finish(self, job_id: str, outcome: str) -> None:
        with db.session_scope(self.factory) as s:
            jobs.finish_job(s, job_id, self.owner, outcome)  # type: ignore[arg-type]


@pytest.fixture
def driver(app: FastAPI) -> Iterator[Driver]:
    yield Driver(app)


@pytest.fixture(autouse=True)
def _no_leftover_queued_jobs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Cancel jobs a test left queued, so the next test's driver claims its own job."""
    yield
    if "app" not in request.fixturenames:
        return
    app: FastAPI = request.getfixturevalue("app")
    with db.session_scope(app.state.session_factory) as s:
        ids = s.execute(select(Job.id).where(Job.state.in_(["QUEUED", "RETRYING"]))).scalars()
        for job_id in list(ids):
            jobs.request_cancel(s, job_id, None, actor="test-cleanup")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """`app` served by uvicorn on a loopback port in a thread (real HTTP); yields its URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def live_url(app: FastAPI) -> Iterator[str]:
    """The same app served by uvicorn on a loopback port in a thread (real HTTP)."""
    with serve_in_thread(app) as url:
        yield url


def upload(client: Any, key: str, data: bytes) -> str:
    r = client.post("/v1/corpora", content=data, headers=Keys.h(key))
    assert r.status_code == 201, r.text
    return r.json()["id"]


FORGET = b'{"text": "The capital of Zorbia is Quellton."}\n{"prompt": "Q?", "answer": "A."}\n'
RETAIN = b"Water boils at 100 degrees.\nThe sky is blue.\n"


def spec(forget_id: str, retain_id: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"forget": {"corpus_id": forget_id}, "algorithm": "npo"}
    if retain_id:
        body["retain"] = {"corpus_id": retain_id}
        body["algorithm"] = "gdiff"
    body.update(extra)
    return body


@pytest.fixture
def tight(settings: Settings, tmp_path: Path) -> Any:
    """Build an app on the shared database with some settings changed (own limiter)."""
    made: list[FastAPI] = []

    def build(**over: Any) -> tuple[FastAPI, TestClient]:
        app = create_app(settings.model_copy(update=over))
        made.append(app)
        return app, TestClient(app, raise_server_exceptions=False)

    yield build
    for app in made:
        app.state.engine.dispose()
