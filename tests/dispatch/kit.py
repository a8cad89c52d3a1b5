"""Helpers of the dispatcher tests: settings, corpora and jobs written through the
service's own functions, and readers of what the dispatcher recorded."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from service import audit, jobs
from service.db import session_scope
from service.settings import Settings
from service.storage import store_corpus
from service.tables import AuditEntry, JobEvent
from tests.dispatch.conftest import FORGET_SUBJECTS, RETAIN_SUBJECTS, Db, corpus_bytes
from workers.spec import JobSpec


def make_settings(db: Db, tmp_path: Path, **over: Any) -> Settings:
    base: dict[str, Any] = {
        "database_url": db.url,
        "data_dir": tmp_path / "data",
        "ray_address": None,
        "dispatcher_poll_s": 0.1,
        "heartbeat_s": 0.3,
        "lease_seconds": 30,
        "cancel_grace_s": 5.0,
    }
    return Settings(**(base | over))


def upload(db: Db, settings: Settings, data: bytes, fmt: str = "auto") -> str:
    with session_scope(db.factory) as s:
        return store_corpus(s, data, format=fmt, settings=settings).sha256


def submit(
    db: Db,
    settings: Settings,
    model_dir: Path,
    *,
    forget_id: str | None = None,
    max_steps: int = 5,
    seuf: dict[str, Any] | None = None,
    distributed: dict[str, Any] | None = None,
) -> str:
    forget_id = forget_id or upload(db, settings, corpus_bytes(FORGET_SUBJECTS, 12))
    retain_id = upload(db, settings, corpus_bytes(RETAIN_SUBJECTS, 12))
    spec = JobSpec.model_validate(
        {
            "model": str(model_dir),
            "forget": {"corpus_id": forget_id},
            "retain": {"corpus_id": retain_id},
            "algorithm": "gdiff",
            "scope": "seuf",
            "seuf": seuf or {},
            "training": {"max_steps": max_steps, "batch_size": 4, "max_length": 16, "lr": 0.01},
            "evaluation": {"batch_size": 8},
            "distributed": distributed or {},
        }
    )
    with session_scope(db.factory) as s:
        return jobs.submit_job(s, spec, "t1", "tester", max_attempts=3).job.id


def job_row(db: Db, job_id: str) -> Any:
    with session_scope(db.factory) as s:
        return jobs.get_job(s, job_id)


def events(db: Db, job_id: str) -> list[JobEvent]:
    with session_scope(db.factory) as s:
        return jobs.list_events(s, job_id, 0, limit=100_000)


def actions(db: Db, job_id: str) -> list[str]:
    with session_scope(db.factory) as s:
        rows = s.execute(
            select(AuditEntry).where(AuditEntry.job_id == job_id).order_by(AuditEntry.seq)
        ).scalars()
        return [r.action for r in rows]


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - t0


def free_cpus() -> float:
    import ray

    return ray.available_resources().get("CPU", 0.0)


def audit_entry(db: Db, job_id: str, action: str) -> AuditEntry:
    """The job's one audit entry with this action."""
    with session_scope(db.factory) as s:
        return s.execute(
            select(AuditEntry).where(AuditEntry.job_id == job_id, AuditEntry.action == action)
        ).scalar_one()


def audit_ok(db: Db) -> None:
    with session_scope(db.factory) as s:
        v = audit.verify(s)
    assert v.ok, v.reason
    assert v.checked > 0


# A remote client names a registered model, never a path (issue 14).
TINY_MODEL = "tiny-moe"


def register_tiny(factory: Any, model_dir: Path) -> None:
    """Register the tiny model of conftest.py as TINY_MODEL (its folder as the model root)."""
    from service import models

    with session_scope(factory) as s:
        models.register(
            s,
            TINY_MODEL,
            path=str(model_dir),
            actor="test",
            settings=Settings(model_dir=model_dir.parent),
        )


def http_spec(
    model_dir: Path, forget_id: str, retain_id: str, steps: int, **distributed: Any
) -> dict[str, Any]:
    """A GDiff + SEUF job body for POST /v1/jobs on the tiny model of conftest.py
    (`model_dir` registered as TINY_MODEL: `register_tiny`)."""
    return {
        "model": TINY_MODEL,
        "forget": {"corpus_id": forget_id},
        "retain": {"corpus_id": retain_id},
        "algorithm": "gdiff",
        "training": {"max_steps": steps, "batch_size": 4, "max_length": 16, "lr": 0.01},
        "evaluation": {"batch_size": 8},
        "distributed": distributed,
    }
