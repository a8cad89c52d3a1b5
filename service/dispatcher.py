"""The dispatcher: claims queued jobs, runs each attempt through an executor, and alone
writes what the attempt produces into the database.

    loop:  reclaim_expired  ->  claim_next (lease)  ->  Executor.start(attempt)
           while it runs: drain its progress -> recording.record_progress (one transaction
           per drain), heartbeat the lease (which also reports a cancel request),
           ask it to stop on cancel / timeout / lost lease / shutdown, force-stop after a
           grace period
           when it ends: recording.record_success, or finish_job(failed(class) | cancelled)

The rooms: service/executor.py (where an attempt runs: a Ray task, its progress channel,
placement groups, Ray start-up), service/recording.py (outputs -> rows),
service/failures.py (the one classification of how an attempt ended), and this loop.

Failure classes (service/failures.py): `user_input` and `internal` are never retried;
`infrastructure` and `out_of_memory` are (up to the job's max_attempts); `timeout` (over
`attempt_timeout_s`) is not. A dispatcher that dies leaves a lease that expires; the next
dispatcher's `reclaim_expired` makes the job RETRYING (or FAILED when its attempts are used
up), so nothing stays RUNNING forever. A dispatcher that is stopped (SIGTERM, SIGINT, the
stop event) asks its attempts to stop and hands their jobs back as RETRYING at once; a Ray
Train job's checkpoints are kept for the next attempt and dropped when the job is over.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from service import jobs
from service.db import check_migrated, engine_for, make_session_factory, session_scope
from service.errors import IllegalTransition, LeaseLost
from service.executor import (
    AttemptHandle,
    Executor,
    RayTaskExecutor,
    checkpoint_root,
    init_ray,
)
from service.failures import RETRYABLE, AttemptOutcome, FailureClass, classify
from service.jobs import Stage
from service.recording import read_outputs, record_progress, record_success
from service.settings import Settings, get_settings
from service.storage import BlobStore
from workers.progress import Message
from workers.results import JobResult
from workers.spec import JobSpec

log = logging.getLogger(__name__)

StopReason = Literal["cancel", "timeout", "lease_lost", "shutdown"]


@dataclass
class _Active:
    job_id: str
    attempt: int
    spec: JobSpec
    handle: AttemptHandle
    output_dir: Path
    started: float = field(default_factory=time.monotonic)
    last_heartbeat: float = field(default_factory=time.monotonic)
    stage: Stage | None = None
    stop_reason: StopReason | None = None
    stop_sent_at: float | None = None
    forced: bool = False


@dataclass
class DispatcherStats:
    claimed: int = 0  # attempts started (a retried job is claimed again)
    finished: dict[str, int] = field(default_factory=dict)  # state after an attempt -> count
    reclaimed: int = 0  # expired leases taken back (RETRYING / FAILED / CANCELLED)

    @property
    def ended(self) -> int:
        """Jobs this dispatcher brought to a terminal state."""
        return sum(self.finished.get(s, 0) for s in jobs.TERMINAL)


class Dispatcher:
    """The loop of one dispatcher process (see the module docstring). `owner` names its
    leases; several dispatchers can run against one database."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        executor: Executor,
        owner: str | None = None,
        store: BlobStore | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.executor = executor
        self.owner = (
            owner
            or f"dispatcher-{socket.gethostname()[:40]}-{os.getpid()}-" + (uuid.uuid4().hex[:8])
        )
        self.store = store or BlobStore.from_settings(settings)
        self.checkpoint_root = checkpoint_root(settings)
        self.active: list[_Active] = []
        self.stats = DispatcherStats()

    # -- the loop --------------------------------------------------------------------------

    def run(
        self,
        once: bool = False,
        max_jobs: int | None = None,
        stop_event: threading.Event | None = None,
    ) -> DispatcherStats:
        """Until `stop_event` is set; with `once`, until nothing is queued or running;
        with `max_jobs`, until this dispatcher has brought that many jobs to a terminal
        state (a retried attempt does not count)."""
        try:
            while not (stop_event is not None and stop_event.is_set()):
                self._reclaim()
                queue_empty = False  # True only when a claim found nothing to run
                while len(self.active) < self.settings.dispatcher_concurrency and (
                    max_jobs is None or self.stats.ended + len(self.active) < max_jobs
                ):
                    try:
                        started = self._claim_and_start()
                    except DBAPIError:
                        if once:
                            raise
                        log.exception("claiming a job failed (database unavailable?)")
                        break
                    if not started:
                        queue_empty = True
                        break
                for a in list(self.active):
                    if self._service(a):
                        self.active.remove(a)
                if not self.active:
                    if max_jobs is not None and self.stats.ended >= max_jobs:
                        break
                    if once and queue_empty:
                        break
                if stop_event is not None:
                    stop_event.wait(self.settings.dispatcher_poll_s)
                else:
                    time.sleep(self.settings.dispatcher_poll_s)
        finally:
            self._shutdown_active()
        return self.stats

    def _reclaim(self) -> None:
        try:
            with session_scope(self.factory) as s:
                expired = jobs.reclaim_expired(s, actor=self.owner)
                got = [(j.id, j.attempt, j.state) for j in expired]
        except Exception:  # noqa: BLE001 - a DB hiccup must not kill the loop
            log.exception("reclaim_expired failed")
            return
        for job_id, attempt, state in got:
            log.info("reclaimed job %s (attempt %s) -> %s", job_id, attempt, state)
            self._drop_checkpoints_if_over(job_id, state)
        self.stats.reclaimed += len(got)

    # -- starting an attempt ---------------------------------------------------------------

    def _claim_and_start(self) -> bool:
        with session_scope(self.factory) as s:
            job = jobs.claim_next(s, self.owner, self.settings.lease_seconds)
            if job is None:
                return False
            job_id, attempt, spec_data = job.id, job.attempt, dict(job.spec)
        self.stats.claimed += 1
        log.info("claimed job %s attempt %s", job_id, attempt)
        try:
            spec = JobSpec.model_validate(spec_data)
            corpus_paths = self._corpus_paths(spec)
            out = self.store.artifact_dir(job_id) / f"attempt-{attempt}"
            if out.exists():  # left by a crashed run of this very attempt number
                shutil.rmtree(out)
            out.mkdir(parents=True)
            handle = self.executor.start(job_id, attempt, spec, out, corpus_paths)
        except ValueError as e:
            self._finish_failed(job_id, "user_input", str(e))
            return True
        except Exception as e:  # noqa: BLE001 - Ray unavailable, disk full...
            failed = classify(e)
            self._finish_failed(job_id, failed.failure_class or "internal", failed.message)
            return True
        self.active.append(_Active(job_id, attempt, spec, handle, out))
        return True

    def _corpus_paths(self, spec: JobSpec) -> dict[str, str]:
        paths: dict[str, str] = {}
        for name, ref in spec.corpus_refs():  # forget, retain, a robustness holdout
            if ref.corpus_id is None:
                continue
            p = self.store.corpus_path(ref.corpus_id)
            if not p.is_file():
                raise ValueError(f"{name}.corpus_id: corpus {ref.corpus_id} is not in the store")
            paths[ref.corpus_id] = str(p)
        return paths

    # -- one running attempt ---------------------------------------------------------------

    def _service(self, a: _Active) -> bool:
        """Move one attempt along; True when it has ended (and was finished in the DB)."""
        now = time.monotonic()
        if a.stop_reason != "lease_lost" and now - a.last_heartbeat >= self.settings.heartbeat_s:
            self._heartbeat(a)
        self._write_progress(a, a.handle.drain())
        timeout = self.settings.attempt_timeout_s
        if timeout is not None and a.stop_reason is None and now - a.started > timeout:
            self._stop(a, "timeout")
        if (
            a.stop_sent_at is not None
            and not a.forced
            and now - a.stop_sent_at > self.settings.cancel_grace_s
        ):
            log.warning(
                "job %s did not stop in %ss: force-stopping", a.job_id, now - a.stop_sent_at
            )
            a.forced = True
            a.handle.force_stop()
        if not a.handle.done():
            return False
        outcome = a.handle.outcome()
        self._write_progress(a, a.handle.drain(final=True))  # what it sent before it ended
        a.handle.release()
        self._finish(a, outcome)
        return True

    def _stop(self, a: _Active, reason: StopReason) -> None:
        if a.stop_reason is None:
            a.stop_reason = reason
            a.stop_sent_at = time.monotonic()
            log.info("stopping job %s attempt %s (%s)", a.job_id, a.attempt, reason)
            a.handle.request_stop()

    def _heartbeat(self, a: _Active) -> None:
        try:
            with session_scope(self.factory) as s:
                cancel = jobs.heartbeat(s, a.job_id, self.owner, self.settings.lease_seconds)
            a.last_heartbeat = time.monotonic()
            if cancel:
                self._stop(a, "cancel")
        except LeaseLost:
            log.warning("lost the lease of job %s: stopping its attempt", a.job_id)
            a.stop_reason = None
            self._stop(a, "lease_lost")
        except Exception:  # noqa: BLE001 - retried at the next poll; the lease has slack
            log.exception("heartbeat of job %s failed", a.job_id)

    def _write_progress(self, a: _Active, msgs: list[Message]) -> None:
        if not msgs or a.stop_reason == "lease_lost":
            return
        try:
            with session_scope(self.factory) as s:
                for m in msgs:
                    a.stage = record_progress(s, a.job_id, self.owner, m, a.stage)
        except LeaseLost:
            self._stop(a, "lease_lost")
        except Exception:  # noqa: BLE001 - progress is best effort; results are not
            log.exception("writing progress of job %s failed", a.job_id)

    # -- ending an attempt -----------------------------------------------------------------

    def _finish(self, a: _Active, outcome: AttemptOutcome) -> None:
        reason = a.stop_reason
        if reason == "lease_lost":
            log.warning("job %s attempt %s ended after losing its lease", a.job_id, a.attempt)
            self._count("lease_lost")
            return
        if outcome.status == "succeeded" and isinstance(outcome.result, JobResult):
            try:
                self._record_success(a, outcome.result)
            except (LeaseLost, IllegalTransition) as e:
                log.warning("job %s: could not record the success: %s", a.job_id, e)
            except Exception as e:  # noqa: BLE001 - unreadable outputs: the job failed
                log.exception("recording the results of job %s failed", a.job_id)
                self._finish_failed(a.job_id, "internal", f"recording results failed: {e}")
            return
        if reason == "cancel":
            # Cancelled cooperatively, force-stopped, or killed while stopping: all CANCELLED.
            self._finish_plain(a.job_id, "cancelled")
            return
        if reason == "timeout":
            self._finish_failed(
                a.job_id,
                "timeout",
                f"attempt {a.attempt} exceeded attempt_timeout_s={self.settings.attempt_timeout_s}",
            )
            return
        if reason == "shutdown":
            self._finish_failed(a.job_id, "infrastructure", "the dispatcher stopped")
            return
        if outcome.status == "cancelled":  # stopped without our asking: treat as a crash
            self._finish_failed(a.job_id, "infrastructure", outcome.message or "stopped")
            return
        self._finish_failed(a.job_id, outcome.failure_class or "internal", outcome.message)

    def _count(self, state: str) -> None:
        self.stats.finished[state] = self.stats.finished.get(state, 0) + 1

    def _ended(self, job_id: str, state: str) -> None:
        """An attempt ended with the job in `state` (committed): count it, and drop the
        checkpoints of a job that is over for good (a RETRYING job resumes from them)."""
        self._count(state)
        self._drop_checkpoints_if_over(job_id, state)

    def _drop_checkpoints_if_over(self, job_id: str, state: str) -> None:
        if state in jobs.TERMINAL:
            shutil.rmtree(self.checkpoint_root / job_id, ignore_errors=True)

    def _finish_plain(self, job_id: str, outcome: Literal["succeeded", "cancelled"]) -> None:
        try:
            with session_scope(self.factory) as s:
                state = jobs.finish_job(s, job_id, self.owner, outcome).state
        except (LeaseLost, IllegalTransition) as e:
            log.warning("job %s: could not finish as %s: %s", job_id, outcome, e)
            return
        self._ended(job_id, state)

    def _finish_failed(self, job_id: str, fclass: FailureClass, message: str) -> None:
        try:
            with session_scope(self.factory) as s:
                job = jobs.finish_job(
                    s,
                    job_id,
                    self.owner,
                    "failed",
                    failure_class=fclass,
                    failure_message=message,
                    retryable=fclass in RETRYABLE,
                )
                state = job.state
        except (LeaseLost, IllegalTransition) as e:
            log.warning("job %s: could not record the failure: %s", job_id, e)
            return
        # the operator's log keeps the message whole; the job's copy names no server path
        log.info("job %s failed (%s: %s) -> %s", job_id, fclass, message, state)
        self._ended(job_id, state)

    def _record_success(self, a: _Active, result: JobResult) -> None:
        # a.spec names the model as the runner loaded it (a server path for a registered
        # directory or job:<id>); what a client sees is the stored spec's name for it
        with session_scope(self.factory) as s:
            model = str(jobs.get_job(s, a.job_id).spec.get("model", a.spec.model))
        out = read_outputs(
            result, a.output_dir, self.settings.model_tar_max_bytes, model=model, job_id=a.job_id
        )
        with session_scope(self.factory) as s:
            state = record_success(s, a.job_id, self.owner, out, a.stage)
        a.stage = Stage.PACKAGING
        self._ended(a.job_id, state)

    def _shutdown_active(self) -> None:
        """The dispatcher is stopping: stop its attempts and hand their jobs back
        (RETRYING, class infrastructure) instead of waiting for their leases to expire."""
        for a in self.active:
            self._stop(a, "shutdown")
        deadline = time.monotonic() + self.settings.cancel_grace_s
        for a in self.active:
            while not a.handle.done() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not a.handle.done():
                a.handle.force_stop()
            try:
                outcome = a.handle.outcome() if a.handle.done() else AttemptOutcome("cancelled")
            except Exception:  # noqa: BLE001
                outcome = AttemptOutcome("cancelled")
            self._write_progress(a, a.handle.drain(final=True))  # e.g. where each rank stopped
            a.handle.release()
            if outcome.status == "succeeded":
                a.stop_reason = None  # it finished anyway: keep the work
            self._finish(a, outcome)
        self.active.clear()


# ----------------------------------------------------------------------------- entry


def run_dispatcher(
    settings: Settings | None = None,
    once: bool = False,
    max_jobs: int | None = None,
    stop_event: threading.Event | None = None,
    handle_signals: bool = False,
) -> DispatcherStats:
    """What `moe-unlearn dispatcher [--once] [--max-jobs N]` runs: check the database is
    migrated, start (or join) Ray, run the loop, and always shut down what it started.

    once: exit when nothing is queued or running; max_jobs: exit after this dispatcher
    ended that many jobs; stop_event: exit (handing running jobs back as RETRYING) when
    set. handle_signals (the CLI; main thread only): SIGINT and SIGTERM set the stop event
    (installed after ray.init, which replaces the SIGTERM handler with sys.exit).
    Returns what it did (`DispatcherStats`)."""
    settings = settings or get_settings()
    engine = engine_for(settings)
    owns_ray = False
    try:
        check_migrated(engine)
        owns_ray = init_ray(settings)
        if handle_signals and threading.current_thread() is threading.main_thread():
            import signal

            stop_event = stop_event or threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop_event.set())
        executor = RayTaskExecutor(checkpoint_root(settings))
        d = Dispatcher(settings, make_session_factory(engine), executor)
        return d.run(once=once, max_jobs=max_jobs, stop_event=stop_event)
    finally:
        engine.dispose()
        if owns_ray:
            import ray

            ray.shutdown()


__all__ = [
    "AttemptHandle",
    "AttemptOutcome",
    "Dispatcher",
    "DispatcherStats",
    "Executor",
    "RayTaskExecutor",
    "checkpoint_root",
    "init_ray",
    "run_dispatcher",
]
