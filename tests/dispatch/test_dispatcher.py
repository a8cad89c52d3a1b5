"""The dispatcher end to end: real Ray (2 CPUs), real databases (SQLite and PostgreSQL),
the real engine (workers.run.run_job) on a tiny MoE built in the test."""

from __future__ import annotations

import hashlib
import os
import signal
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from service import jobs
from service.certificate import build_certificate
from service.db import session_scope
from service.dispatcher import checkpoint_root, run_dispatcher
from service.storage import BlobStore
from tests.dispatch.kit import (
    actions,
    audit_entry,
    audit_ok,
    events,
    free_cpus,
    job_row,
    make_settings,
    rank_events,
    submit,
    upload,
    wait_for,
)

pytestmark = pytest.mark.slow


def test_job_runs_to_success_with_all_records(db, tmp_path, ray_cluster, tiny_model_dir):
    settings = make_settings(db, tmp_path)
    job_id = submit(db, settings, tiny_model_dir, max_steps=5)

    stats = run_dispatcher(settings, once=True)

    assert stats.claimed == 1 and stats.finished == {"SUCCEEDED": 1}
    job = job_row(db, job_id)
    assert (job.state, job.attempt, job.stage, job.failure_class) == (
        "SUCCEEDED",
        1,
        "packaging",
        None,
    )
    assert job.lease_owner is None and job.finished_at is not None

    with session_scope(db.factory) as s:
        emap = jobs.get_expert_map(s, job_id)
        evals = jobs.get_evaluations(s, job_id)
        arts = jobs.list_artifacts(s, job_id)
        cert = build_certificate(s, job_id)
    # Expert map: every routed expert of the 3 MoE layers, ranks 1..24, one selected = rank 1.
    assert len(emap) == 3 * 8
    assert sorted(r.rank for r in emap) == list(range(1, 25))
    selected = [r for r in emap if r.selected]
    assert len(selected) == 1 and selected[0].rank == 1
    assert selected[0].score == max(r.score for r in emap)

    # Evaluations before and after; gradient ascent on the forget set raised its NLL.
    ev = {(e.phase, e.task, e.metric): e.value for e in evals}
    for phase in ("before", "after"):
        assert "forget" in {t for p, t, _ in ev if p == phase}
        assert (phase, "forget", "nll") in ev and (phase, "retain", "nll") in ev
    assert ev[("after", "forget", "nll")] > ev[("before", "forget", "nll")]
    assert 0.0 <= ev[("after", "forget", "routing_overlap")] <= 1.0

    # Events: one per step of attempt 1, the stages in order, the attempt's worker.
    evs = events(db, job_id)
    steps = sorted(e.step for e in evs if e.kind == "step")
    assert steps == [1, 2, 3, 4, 5]
    assert all(e.attempt == 1 for e in evs)
    stages = [e.payload["stage"] for e in evs if e.kind == "stage"]
    assert stages == [
        "evaluating_before",
        "attribution",
        "unlearning",
        "evaluating_after",
        "packaging",
    ]
    started = [e for e in evs if e.kind == "attempt_started"]
    assert len(started) == 1
    assert (started[0].payload["runner"], started[0].payload["num_workers"]) == ("process", 1)

    # Artifacts: on disk under the job's artifact folder, hashes match the bytes.
    store = BlobStore.from_settings(settings)
    names = {a.name: a for a in arts}
    assert set(names) == {
        "expert_patch.safetensors",
        "expert_map.json",
        "spec.json",
        "result.json",
        "model_index.json",
        "model.tar",
    }
    for a in arts:
        p = Path(a.location)
        assert p.is_relative_to(store.artifact_dir(job_id) / "attempt-1")
        data = p.read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (a.sha256, a.size)
    with tarfile.open(names["model.tar"].location) as tar:
        assert "model/config.json" in tar.getnames()

    # Parameters changed: only the selected expert's slices and its layer's router.
    changed = cert["parameters_changed"]
    layer, expert = selected[0].layer, selected[0].expert
    assert changed and all(f"layers.{layer}." in c["name"] for c in changed)
    assert all(c["sha256_before"] != c["sha256_after"] for c in changed)
    sliced = [c for c in changed if c["slice"]]
    assert sliced and all(c["slice"] == f"[{expert}]" for c in sliced)
    assert cert["deletion_performed"] is True
    assert cert["experts"]["selected"][0]["expert"] == expert
    import json

    result = json.loads(Path(names["result.json"].location).read_text())
    assert cert["model"]["sha256"] == result["base_model_sha256"]

    acts = actions(db, job_id)
    for a in (
        "job_submitted",
        "job_claimed",
        "stage_changed",
        "experts_selected",
        "parameters_changed",
        "artifact_recorded",
        "job_succeeded",
    ):
        assert a in acts, a
    audit_ok(db)
    wait_for(lambda: free_cpus() == 2.0, 10, "the CPUs to be free")


@pytest.mark.parametrize(
    ("db", "how"),
    [("sqlite", "process"), ("postgresql", "process"), ("sqlite", "ray_train"),
     ("sqlite", "ray_train_forced")],
    indirect=["db"],
)  # fmt: skip
def test_cancel_mid_training_then_next_job_runs(
    db, tmp_path, ray_cluster, tiny_model_dir, how, caplog
):
    """process: a one-worker job stops at its next step. ray_train: a 2-worker Ray Train job,
    every rank stops after the same step (each says so in a `rank_stopped` event) and the
    trainer shuts down. ray_train_forced: the
    grace period is too short for that, so the attempt's task is killed (and with it the
    trainer) and the dispatcher frees the trainer's placement group itself. Each time the
    CPUs come back and the next job (same runner) runs."""
    grace = 0.05 if how == "ray_train_forced" else 120.0
    settings = make_settings(db, tmp_path, cancel_grace_s=grace)
    dist = {"num_workers": 2, "checkpoint_every": 2} if how != "process" else None
    long_job = submit(db, settings, tiny_model_dir, max_steps=100_000, distributed=dist)
    next_job = submit(db, settings, tiny_model_dir, max_steps=3, distributed=dist)
    stop = threading.Event()
    out: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: out.setdefault(
            "stats", run_dispatcher(settings, max_jobs=2, stop_event=stop)
        )
    )
    t.start()
    try:
        wait_for(
            lambda: any(e.kind == "step" and e.step >= 3 for e in events(db, long_job)),
            300,
            "training steps of the long job",
        )
        with session_scope(db.factory) as s:
            assert jobs.request_cancel(s, long_job, "t1", "tester").state == "CANCELLING"
        wait_for(lambda: job_row(db, long_job).state == "CANCELLED", 120, "CANCELLED")
        t.join(timeout=300)
        assert not t.is_alive()
    finally:
        stop.set()
        t.join(timeout=30)
    assert out["stats"].finished == {"CANCELLED": 1, "SUCCEEDED": 1}
    job = job_row(db, long_job)
    assert job.attempt == 1 and job.failure_class is None
    last_step = max(e.step for e in events(db, long_job) if e.kind == "step")
    assert 3 <= last_step < 100_000
    if how != "ray_train_forced":  # a cooperative stop: every rank says where it stopped
        stopped = rank_events(db, long_job, "rank_stopped", 1)
        assert sorted(stopped) == ([0] if how == "process" else [0, 1])
        assert {e.payload["step"] for e in stopped.values()} == {last_step}
    assert not (checkpoint_root(settings) / long_job).exists()
    assert job_row(db, next_job).state == "SUCCEEDED"
    acts = actions(db, long_job)
    assert "cancel_requested" in acts and acts[-1] == "job_cancelled"
    audit_ok(db)
    wait_for(lambda: free_cpus() == 2.0, 30, "the CPUs to be free")
    forced = any("force-stopping" in r.getMessage() for r in caplog.records)
    assert forced == (how == "ray_train_forced")


def test_user_input_failures_are_not_retried(db, tmp_path, ray_cluster, tiny_model_dir):
    settings = make_settings(db, tmp_path)
    # One word per record: nothing left to train on after tokenization.
    one_word = upload(db, settings, b"rabbit\nfox\nowl\n", fmt="text")
    empty_job = submit(db, settings, tiny_model_dir, forget_id=one_word)
    bad_expert = submit(
        db,
        settings,
        tiny_model_dir,
        seuf={"selection": "manual", "experts": [{"layer": 1, "expert": 99}]},
    )

    # The cluster has 2 CPUs.
    too_wide = submit(db, settings, tiny_model_dir, distributed={"num_workers": 3})

    stats = run_dispatcher(settings, once=True)

    assert stats.claimed == 3 and stats.finished == {"FAILED": 3}
    for job_id, words in (
        (empty_job, "no token to train on"),
        (bad_expert, "99"),
        (too_wide, "num_workers=3"),
    ):
        job = job_row(db, job_id)
        assert (job.state, job.failure_class, job.attempt) == ("FAILED", "user_input", 1)
        assert words in job.failure_message
        assert "job_retrying" not in actions(db, job_id)
    audit_ok(db)


def test_dead_dispatcher_job_is_reclaimed_and_finished(db, tmp_path, ray_cluster, tiny_model_dir):
    settings = make_settings(db, tmp_path)
    job_id = submit(db, settings, tiny_model_dir, max_steps=3)
    with session_scope(db.factory) as s:  # a dispatcher that claims and then dies
        claimed = jobs.claim_next(s, "dead-dispatcher", lease_seconds=1)
        assert claimed is not None and claimed.id == job_id
    time.sleep(1.2)  # the lease expires; nobody heartbeats

    stats = run_dispatcher(settings, once=True)

    assert stats.reclaimed == 1 and stats.finished == {"SUCCEEDED": 1}
    job = job_row(db, job_id)
    assert (job.state, job.attempt) == ("SUCCEEDED", 2)
    acts = actions(db, job_id)
    assert acts.count("job_claimed") == 2 and "lease_expired" in acts
    assert {e.attempt for e in events(db, job_id) if e.kind == "step"} == {2}
    audit_ok(db)


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_killed_worker_retried(db, tmp_path, ray_cluster, tiny_model_dir):
    """Injected failure: the attempt's Ray worker process (its pid comes from the
    attempt_started event; a process of this test's own Ray) is killed mid-training.
    The lease (20 heartbeats long: a loaded machine does not lose it) is kept by the
    heartbeats alone."""
    settings = make_settings(db, tmp_path, lease_seconds=10)
    job_id = submit(db, settings, tiny_model_dir, max_steps=40)
    stop = threading.Event()
    t = threading.Thread(target=lambda: run_dispatcher(settings, max_jobs=1, stop_event=stop))
    t.start()
    try:
        wait_for(
            lambda: any(e.kind == "step" and e.step >= 2 for e in events(db, job_id)),
            120,
            "training steps",
        )
        pid = next(e.payload["pid"] for e in events(db, job_id) if e.kind == "attempt_started")
        os.kill(pid, signal.SIGKILL)  # our own Ray's worker, by its id
        t.join(timeout=180)
        assert not t.is_alive()
    finally:
        stop.set()
        t.join(timeout=30)
    job = job_row(db, job_id)
    assert (job.state, job.attempt) == ("SUCCEEDED", 2)
    acts = actions(db, job_id)
    assert "job_retrying" in acts and "lease_expired" not in acts
    retry = audit_entry(db, job_id, "job_retrying")
    assert retry.payload["failure_class"] == "infrastructure"
    assert max(e.step for e in events(db, job_id) if e.kind == "step" and e.attempt == 2) == 40
    audit_ok(db)


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_attempt_over_its_time_limit_fails_as_timeout(db, tmp_path, ray_cluster, tiny_model_dir):
    settings = make_settings(db, tmp_path, attempt_timeout_s=3.0)
    job_id = submit(db, settings, tiny_model_dir, max_steps=100_000)

    stats = run_dispatcher(settings, once=True)

    assert stats.finished == {"FAILED": 1}
    job = job_row(db, job_id)
    assert (job.state, job.failure_class, job.attempt) == ("FAILED", "timeout", 1)
    assert "attempt_timeout_s=3.0" in job.failure_message
    audit_ok(db)
    wait_for(lambda: free_cpus() == 2.0, 10, "the CPUs to be free")


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_stopping_dispatcher_hands_its_job_back(db, tmp_path, ray_cluster, tiny_model_dir):
    settings = make_settings(db, tmp_path)
    job_id = submit(db, settings, tiny_model_dir, max_steps=100_000)
    stop = threading.Event()
    t = threading.Thread(target=lambda: run_dispatcher(settings, stop_event=stop))
    t.start()
    try:
        wait_for(lambda: any(e.kind == "step" for e in events(db, job_id)), 120, "training steps")
    finally:
        stop.set()
        t.join(timeout=60)
    assert not t.is_alive()
    job = job_row(db, job_id)
    # RETRYING at once (not after the lease expires), claimable by the next dispatcher.
    assert (job.state, job.failure_class, job.lease_owner) == ("RETRYING", "infrastructure", None)
    wait_for(lambda: free_cpus() == 2.0, 10, "the CPUs to be free")
    with session_scope(db.factory) as s:
        assert jobs.request_cancel(s, job_id, "t1", "tester").state == "CANCELLED"
    audit_ok(db)


def _processes_mentioning(needle: str) -> list[int]:
    """Pids whose command line mentions `needle` (read-only scan of /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            pids.append(int(d.name))
    return pids


def test_run_dispatcher_starts_and_stops_its_own_ray(tmp_path, sqlite_template):
    """In a fresh process (no Ray yet): run_dispatcher starts a private local Ray in
    ray_temp_dir, finds nothing to do with --once, shuts Ray down and leaves no process."""
    import shutil
    import subprocess
    import sys
    import tempfile

    db_path = tmp_path / "d.db"
    shutil.copyfile(sqlite_template, db_path)
    ray_tmp = tempfile.mkdtemp(prefix="moeu-rd-")
    code = (
        "from service.dispatcher import run_dispatcher\n"
        "from service.settings import Settings\n"
        f"s = Settings(database_url='sqlite:///{db_path}', data_dir='{tmp_path / 'data'}', "
        f"ray_address=None, ray_num_cpus=1, ray_temp_dir='{ray_tmp}')\n"
        "import ray\n"
        "st = run_dispatcher(s, once=True)\n"
        "print('claimed', st.claimed, 'ray_up', ray.is_initialized())\n"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "claimed 0 ray_up False" in proc.stdout
        assert any(Path(ray_tmp).glob("session_*")), "Ray did not use ray_temp_dir"
        wait_for(lambda: not _processes_mentioning(ray_tmp), 15, "Ray processes to exit")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_two_attempts_run_side_by_side(db, tmp_path, ray_cluster, tiny_model_dir):
    """dispatcher_concurrency=2 on a 2-CPU Ray: two 1-CPU jobs train at the same time
    (both keep producing steps while both hold a CPU); then both are cancelled."""
    settings = make_settings(db, tmp_path, dispatcher_concurrency=2)
    ids = [submit(db, settings, tiny_model_dir, max_steps=100_000) for _ in range(2)]
    stop = threading.Event()
    t = threading.Thread(target=lambda: run_dispatcher(settings, max_jobs=2, stop_event=stop))
    t.start()
    try:

        def steps(job_id: str) -> int:
            return max((e.step for e in events(db, job_id) if e.kind == "step"), default=0)

        wait_for(lambda: all(steps(j) >= 1 for j in ids), 120, "both jobs to train")
        before = [steps(j) for j in ids]
        assert free_cpus() == 0.0
        wait_for(
            lambda: all(steps(j) > n for j, n in zip(ids, before, strict=True)),
            60,
            "both jobs to make progress",
        )
        with session_scope(db.factory) as s:
            for j in ids:
                jobs.request_cancel(s, j, "t1", "tester")
        t.join(timeout=60)
        assert not t.is_alive()
    finally:
        stop.set()
        t.join(timeout=30)
    assert [job_row(db, j).state for j in ids] == ["CANCELLED", "CANCELLED"]
    wait_for(lambda: free_cpus() == 2.0, 10, "the CPUs to be free")
    audit_ok(db)
