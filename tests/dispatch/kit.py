"""Helpers of the dispatcher tests: settings, corpora and jobs written through the
service's own functions, and readers of what the dispatcher recorded."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from service import audit, jobs
from service.db import session_scope
from service.dispatcher import run_dispatcher
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
    max_attempts: int = 3,
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
            # One expert unless asked: a random model holds no localised knowledge, so the
            # default (num_experts auto) would fall back to full parameters.
            "seuf": {"num_experts": 1, **(seuf or {})},
            "training": {"max_steps": max_steps, "batch_size": 4, "max_length": 16, "lr": 0.01},
            "evaluation": {"batch_size": 8},
            "distributed": distributed or {},
        }
    )
    with session_scope(db.factory) as s:
        return jobs.submit_job(s, spec, "t1", "tester", max_attempts=max_attempts).job.id


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
        "seuf": {"num_experts": 1},  # a random model: auto would fall back to full
        "training": {"max_steps": steps, "batch_size": 4, "max_length": 16, "lr": 0.01},
        "evaluation": {"batch_size": 8},
        "distributed": distributed,
    }


def dispatcher_process(
    settings: Settings, *args: str, log: Path | None = None, **env: str
) -> subprocess.Popen[bytes]:
    """`moe-unlearn dispatcher` in its own process and session, with its own private local
    Ray (2 CPUs); `env`: extra environment; `log`: a file for its stderr."""
    full = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "MOE_UNLEARN_DATA_DIR": str(settings.data_dir),
        "MOE_UNLEARN_LEASE_SECONDS": str(settings.lease_seconds),
        "MOE_UNLEARN_HEARTBEAT_S": "0.5",
        "MOE_UNLEARN_DISPATCHER_POLL_S": "0.2",
        "MOE_UNLEARN_RAY_NUM_CPUS": "2",
        **env,
    }
    full.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "api.cli", "dispatcher", *args],
        env=full,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab") if log is not None else subprocess.DEVNULL,
        start_new_session=True,  # its Ray's processes go with it, not with this test
    )


def rank_events(db: Db, job_id: str, kind: str, attempt: int) -> dict[int, JobEvent]:
    """The job's `kind` event of each rank in one attempt (rank -> event; stored as
    `<kind>[<rank>]`, service.recording.stored_kind)."""
    return {
        int(e.payload["rank"]): e
        for e in events(db, job_id)
        if e.kind.startswith(f"{kind}[") and e.attempt == attempt
    }


def result_event(db: Db, job_id: str) -> JobEvent:
    (ev,) = [e for e in events(db, job_id) if e.kind == "result"]
    return ev


class Dispatching:
    """`run_dispatcher` in a thread of this process (it joins the session's Ray); stopped
    (its jobs handed back) when the block ends."""

    def __init__(self, settings: Settings, **kw: Any) -> None:
        self.stop = threading.Event()
        self.out: dict[str, Any] = {}
        self.thread = threading.Thread(
            target=lambda: self.out.setdefault(
                "stats", run_dispatcher(settings, stop_event=self.stop, **kw)
            )
        )

    def __enter__(self) -> Dispatching:
        self.thread.start()
        return self

    def join(self, timeout: float) -> Any:
        self.thread.join(timeout=timeout)
        assert not self.thread.is_alive(), "the dispatcher did not finish"
        return self.out["stats"]

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=120)
