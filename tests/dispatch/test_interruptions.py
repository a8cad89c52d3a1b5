"""A Ray Train job interrupted from outside, through the whole product (dispatcher, real
Ray with 2 CPU workers, SQLite or PostgreSQL):

- a training worker SIGKILLed by the test (its pid from the `rank_started` event) at a
  random step, or while it is writing a checkpoint (announced and held by the one test
  seam, workers/faults.py): the attempt fails as infrastructure, attempt 2 resumes from the
  last committed checkpoint, and the final weights equal an uninterrupted run's;
- the same kill with no attempt left: FAILED, and the job's checkpoints are deleted;
- a real `moe-unlearn dispatcher` process sent SIGTERM mid-job: it hands the job back
  (RETRYING at once, no lease expiry) and exits 0; or SIGKILLed: its lease expires; either
  way the next dispatcher process resumes and finishes the job.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest

from service.dispatcher import checkpoint_root
from service.settings import Settings
from tests.dispatch.conftest import Db
from tests.dispatch.kit import (
    Dispatching,
    actions,
    audit_entry,
    audit_ok,
    dispatcher_process,
    events,
    free_cpus,
    job_row,
    make_settings,
    rank_events,
    result_event,
    submit,
    wait_for,
)
from workers.faults import CHECKPOINT_SEAM_ENV

pytestmark = pytest.mark.slow

CKPT_EVERY = 5
STEPS = 60  # long enough that a kill noticed a few steps late still lands mid-run
DIST = {"num_workers": 2, "backend": "ddp", "checkpoint_every": CKPT_EVERY}
SEAM_HOLD_S = 2.0  # the killed rank sits in the seam: the kill lands mid-checkpoint
# Wide enough never to expire on a loaded 2-core machine while heartbeats run.
LEASE_S = 60

# The unlearned weights of the uninterrupted job (the same spec, so the same for every
# test and database): computed by the first test that needs it.
_REFERENCE: dict[str, str] = {}


def _unlearned_sha(db: Db, job_id: str) -> str:
    return str(result_event(db, job_id).payload["unlearned_model_sha256"])


def _reference_sha(db: Db, settings: Settings, model_dir: Path) -> str:
    if "sha" not in _REFERENCE:
        job_id = submit(db, settings, model_dir, max_steps=STEPS, distributed=DIST)
        with Dispatching(settings, max_jobs=1) as d:
            assert d.join(600).finished == {"SUCCEEDED": 1}
        assert job_row(db, job_id).attempt == 1
        _REFERENCE["sha"] = _unlearned_sha(db, job_id)
    return _REFERENCE["sha"]


def _seam_lines(path: Path) -> list[dict[str, int]]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _kill_rank_at_step(db: Db, job_id: str, step: int, rank: int) -> int:
    """SIGKILL `rank` of attempt 1 once the job recorded `step`; returns the pid."""
    wait_for(
        lambda: any(e.kind == "step" and e.step >= step for e in events(db, job_id)),
        300,
        f"step {step}",
    )
    pid = int(rank_events(db, job_id, "rank_started", 1)[rank].payload["pid"])
    os.kill(pid, signal.SIGKILL)  # a process of this test's own Ray
    return pid


def _kill_rank_in_checkpoint(seam: Path, step: int, rank: int) -> int:
    """SIGKILL `rank` while it holds in the checkpoint seam at `step` (attempt 1)."""

    def announced() -> list[dict[str, int]]:
        return [x for x in _seam_lines(seam) if x["step"] == step and x["rank"] == rank]

    wait_for(lambda: bool(announced()), 300, f"rank {rank} writing checkpoint {step}")
    pid = announced()[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.fixture
def seed() -> int:
    """The random step / rank of a kill: printed, so a failure can be replayed."""
    value = int(os.environ.get("MOEU_KILL_SEED", random.SystemRandom().randrange(10**6)))
    print(f"kill seed {value} (MOEU_KILL_SEED={value} replays it)")
    return value


@pytest.mark.parametrize("when", ["random_step", "checkpoint"])
@pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
def test_worker_killed_from_outside_resumes_to_the_same_weights(
    db, tmp_path, ray_cluster, tiny_model_dir, monkeypatch, when, seed
):
    settings = make_settings(db, tmp_path, lease_seconds=LEASE_S)
    reference = _reference_sha(db, settings, tiny_model_dir)
    rng = random.Random(seed)
    rank = rng.randrange(2)
    seam = tmp_path / "checkpoint-seam.jsonl"
    if when == "checkpoint":
        # Read by the dispatcher when it starts the attempt, and forwarded to the ranks.
        monkeypatch.setenv(CHECKPOINT_SEAM_ENV, f"{seam},{SEAM_HOLD_S}")
        kill_step = CKPT_EVERY * rng.randint(2, 4)  # a checkpoint after a committed one
    else:
        kill_step = rng.randint(3, STEPS // 2)
    job_id = submit(db, settings, tiny_model_dir, max_steps=STEPS, distributed=DIST)

    with Dispatching(settings, max_jobs=1) as d:
        if when == "checkpoint":
            _kill_rank_in_checkpoint(seam, kill_step, rank)
        else:
            _kill_rank_at_step(db, job_id, kill_step, rank)
        stats = d.join(600)

    job = job_row(db, job_id)
    why = (job.failure_class, job.failure_message, actions(db, job_id))
    assert stats.claimed == 2 and stats.finished == {"RETRYING": 1, "SUCCEEDED": 1}, why
    assert (job.state, job.attempt) == ("SUCCEEDED", 2)
    retry = audit_entry(db, job_id, "job_retrying")
    assert retry.payload["failure_class"] == "infrastructure"
    evs = events(db, job_id)
    first = [e.step for e in evs if e.kind == "step" and e.attempt == 1]
    killed_at = max(first)
    assert killed_at >= kill_step and first == list(range(1, killed_at + 1))
    resumes = [e for e in evs if e.kind == "resumed"]
    assert len(resumes) <= 1 and all(e.attempt == 2 for e in resumes), resumes
    # No resume: the kill came before the first checkpoint was committed (a random step
    # from 3 can be under checkpoint_every), so attempt 2 started over from step 0.
    from_step = resumes[0].payload["from_step"] if resumes else 0
    assert resumes or when == "random_step", "a checkpoint kill always has one to resume"
    # ...and no later than the second checkpoint's step: by then the first one committed.
    assert resumes or killed_at < 2 * CKPT_EVERY, (killed_at, "no resume")
    assert from_step % CKPT_EVERY == 0
    if when == "checkpoint":
        # The checkpoint being written when its rank died never counted; the one before
        # did (the seam announces a checkpoint once every earlier one is committed).
        assert from_step == kill_step - CKPT_EVERY
    else:
        assert 0 <= from_step <= killed_at
    steps2 = [e.step for e in evs if e.kind == "step" and e.attempt == 2]
    assert steps2 == list(range(from_step + 1, STEPS + 1))
    # Exactly the weights of the uninterrupted run: the checkpoint holds the trained
    # slices and the optimizer state, and the batches are a function of the step.
    assert _unlearned_sha(db, job_id) == reference
    assert actions(db, job_id)[-1] == "job_succeeded"
    assert not (checkpoint_root(settings) / job_id).exists()
    audit_ok(db)
    wait_for(lambda: free_cpus() == 2.0, 30, "the CPUs to be free")


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_failed_ray_train_job_has_its_checkpoints_deleted(
    db, tmp_path, ray_cluster, tiny_model_dir
):
    """A rank killed with no attempt left: FAILED (infrastructure), checkpoints gone."""
    settings = make_settings(db, tmp_path, lease_seconds=LEASE_S)
    job_id = submit(db, settings, tiny_model_dir, max_steps=STEPS, distributed=DIST, max_attempts=1)
    run_dir = checkpoint_root(settings) / job_id
    with Dispatching(settings, max_jobs=1) as d:
        wait_for(lambda: any(run_dir.glob("checkpoint_*")), 300, "a checkpoint on disk")
        _kill_rank_at_step(db, job_id, 2 * CKPT_EVERY, 1)
        assert d.join(300).finished == {"FAILED": 1}
    job = job_row(db, job_id)
    assert (job.state, job.failure_class, job.attempt) == ("FAILED", "infrastructure", 1)
    assert not run_dir.exists()
    audit_ok(db)
    wait_for(lambda: free_cpus() == 2.0, 30, "the CPUs to be free")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_dispatcher_process_stopped_mid_job_then_the_next_one_finishes_it(
    db, tmp_path, tiny_model_dir, sig
):
    """SIGTERM: the dispatcher asks the attempt to stop (every rank stops after the same
    step), hands the job back at once (RETRYING, no lease to wait for) and exits 0.
    SIGKILL of its whole process group (its Ray goes with it): nothing is handed back, the
    lease expires (short here, but 20 heartbeats long) and the next dispatcher reclaims the
    job. Either way the next dispatcher process resumes from the checkpoint and finishes."""
    term = sig == "SIGTERM"
    settings = make_settings(db, tmp_path, lease_seconds=LEASE_S if term else 10)
    steps = 120  # the first dispatcher is still mid-run when the signal comes
    job_id = submit(db, settings, tiny_model_dir, max_steps=steps, distributed=DIST)
    log = tmp_path / "dispatcher.log"
    first = dispatcher_process(settings, log=log)
    try:
        wait_for(
            lambda: any(e.kind == "step" and e.step > CKPT_EVERY for e in events(db, job_id)),
            300,
            "training steps under the first dispatcher",
        )
        if term:
            first.send_signal(signal.SIGTERM)
            assert first.wait(timeout=120) == 0, log.read_text()[-3000:]
        else:
            os.killpg(first.pid, signal.SIGKILL)  # the dispatcher and the Ray it started
            first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    last = max(e.step for e in events(db, job_id) if e.kind == "step")
    assert last < steps
    if term:
        assert "1 attempt(s), 0 job(s) ended {'RETRYING': 1}" in log.read_text()
        job = job_row(db, job_id)
        assert (job.state, job.failure_class, job.lease_owner) == (
            "RETRYING",
            "infrastructure",
            None,
        )
        stopped = rank_events(db, job_id, "rank_stopped", 1)
        assert sorted(stopped) == [0, 1]
        assert {e.payload["step"] for e in stopped.values()} == {last}
    else:
        assert job_row(db, job_id).state == "RUNNING"  # until its lease expires

    # The next dispatcher's own lease is wide: only the first one's had to expire.
    second = dispatcher_process(
        settings, "--max-jobs", "1", log=log, MOE_UNLEARN_LEASE_SECONDS=str(LEASE_S)
    )
    try:
        assert second.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    job = job_row(db, job_id)
    why = (job.failure_class, job.failure_message, actions(db, job_id), log.read_text()[-3000:])
    assert (job.state, job.attempt) == ("SUCCEEDED", 2), why
    acts = actions(db, job_id)
    assert acts.count("job_claimed") == 2 and ("lease_expired" in acts) == (not term)
    evs = events(db, job_id)
    assert [e.step for e in evs if e.kind == "step" and e.attempt == 1] == list(range(1, last + 1))
    (resumed,) = [e for e in evs if e.kind == "resumed"]
    from_step = resumed.payload["from_step"]
    assert resumed.attempt == 2 and from_step % CKPT_EVERY == 0 and from_step >= CKPT_EVERY
    # After a SIGKILL the progress sent after the dispatcher's last write died with it,
    # while the workers' checkpoints are on disk: attempt 2 may resume past `last`.
    assert from_step <= last if term else from_step < steps
    steps2 = [e.step for e in evs if e.kind == "step" and e.attempt == 2]
    assert steps2 == list(range(from_step + 1, steps + 1))
    assert not (checkpoint_root(settings) / job_id).exists()
    audit_ok(db)
